from lmspec.conformance.cli import main

raise SystemExit(main())
