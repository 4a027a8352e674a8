"""A plugin module that raises at import (used by the registry and CLI tests)."""

raise RuntimeError("this plugin is broken on purpose")
