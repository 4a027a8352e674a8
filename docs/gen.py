"""mkdocs hook: the pages generated from the code, filled in at build time.

A page holds a marker comment where generated text goes; this hook replaces it, so
nothing generated is committed and the site cannot drift from the code:

- ``<!-- gen:cli -->``: ``lmspec --help`` and every subcommand's ``--help``, from the
  argparse parser itself (:func:`lmspec.conformance.cli.parser`);
- ``<!-- gen:catalogue -->``: the table of ``lmspec ops --markdown``, then one section
  per op of ``lmspec.OPS`` with its reference's docstring (rendered by mkdocstrings).

The output depends only on the code: the help is formatted at a fixed width, and the
ops come in the catalogue's order.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

try:
    from mkdocs.plugins import event_priority
except ImportError:  # the tests import this module without mkdocs installed
    def event_priority(priority: float) -> Any:
        return lambda f: f

WIDTH = "88"  # argparse wraps help to $COLUMNS


def cli_reference() -> str:
    from lmspec.conformance.cli import parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        top = parser()
        sub = next(a for a in top._actions if a.__class__.__name__ == "_SubParsersAction")
        out = ["## lmspec", "", "```text", top.format_help().rstrip(), "```", ""]
        for name, sp in sub.choices.items():
            out += [f"## lmspec {name}", "", "```text", sp.format_help().rstrip(), "```", ""]
            nested = [a for a in sp._actions if a.__class__.__name__ == "_SubParsersAction"]
            for a in nested:
                for sub_name, ssp in a.choices.items():
                    out += [f"### lmspec {name} {sub_name}", "", "```text",
                            ssp.format_help().rstrip(), "```", ""]
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return "\n".join(out)


def catalogue() -> str:
    import lmspec
    from lmspec.conformance.cli import catalogue_markdown

    out = [catalogue_markdown(), ""]
    for family in lmspec.FAMILIES:
        refs = [d.reference for d in lmspec.OPS.values() if d.family == family]
        if not refs:
            continue
        out += [f"## {family}", ""]
        for ref in refs:
            out += [f"::: {ref.__module__}.{ref.__qualname__}", "    options:",
                    "      heading_level: 3", ""]
    return "\n".join(out)


SOURCES = Path("build/docs-src")
"""Where mkdocstrings finds ``lmspec`` (``paths`` in mkdocs.yml): the package as installed,
``spec/`` with ``backends/`` and ``conformance/`` inside it, made of symlinks."""


class _DynamicAll(logging.Filter):
    """``lmspec.__all__`` ends with ``*OPS`` (the catalogue's names, known at import), which
    griffe cannot read statically; the ops are documented one by one in the catalogue."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Unsupported item in lmspec.__all__" not in record.getMessage()


@event_priority(100)  # before mkdocstrings reads its `paths`, which must exist by then
def on_config(config: Any) -> Any:
    for name in ("griffe", "mkdocs.plugins.griffe", "mkdocs.plugins.mkdocstrings"):
        logging.getLogger(name).addFilter(_DynamicAll())
    root = Path(config.config_file_path).parent
    pkg = root / SOURCES / "lmspec"
    pkg.mkdir(parents=True, exist_ok=True)
    links = {p.name: p for p in (root / "spec").iterdir() if p.name != "__pycache__"}
    links.update(backends=root / "backends", conformance=root / "conformance")
    for name, target in links.items():
        link = pkg / name
        if not link.is_symlink():
            link.symlink_to(target.resolve())
    return config


GENERATORS = {"<!-- gen:cli -->": cli_reference, "<!-- gen:catalogue -->": catalogue}


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    for marker, gen in GENERATORS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, gen())
    return markdown
