"""What every ``lmspec`` subcommand shares: exit statuses, usage errors, suggestions for a
mistyped name, and the table of backends loaded in their hosts."""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence
from typing import Any

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a reader that went away


class UsageError(Exception):
    """Bad usage or configuration: exit 2."""


def did_you_mean(word: str, known: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the names of ``known`` close to ``word``, else ``""``."""
    close = difflib.get_close_matches(word, list(known), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def backend_table(args: argparse.Namespace, names: Sequence[str] = ()) -> Any:
    """The backends, each loaded in a host process of its plugin; when every name asked
    for is a built-in one, only the built-in plugin is loaded."""
    from lmspec.backends.discovery import BackendTable
    from lmspec.backends.registry import BUILTIN_NAMES

    only_builtin = bool(names) and all(n in BUILTIN_NAMES for n in names)
    timeout = getattr(args, "timeout", None) or 30.0
    # `lmspec backends --timeout` bounds loading and available(); `lmspec run --timeout`
    # bounds each op call, and the first available() (an engine's import) gets a minute
    probe = timeout if args.command == "backends" else max(timeout, 60.0)
    return BackendTable.default(args.plugin, timeout, only_builtin=only_builtin,
                                probe_timeout=probe)
