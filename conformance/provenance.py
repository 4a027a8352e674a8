"""What ran: the sandbox level and hashes of the installed code (CONTRACT §6, 2026-12-06).

A report records how its backends were isolated and what code judged and was judged:
a hash of lmspec's own files (its three packages, whatever way it is installed) and, for
each plugin of a backend that ran, its distribution's name, version and a hash of the
files its ``RECORD`` lists. Without a sandbox a backend could rewrite the judge's files
or drop a ``.pth`` file into the environment (code that every later Python process runs),
so the judge takes a :func:`snapshot` before the first host starts and refuses to write a
report when :func:`changed_since` finds a difference at the end.
"""

from __future__ import annotations

import hashlib
import site
import sys
from collections.abc import Iterable, Sequence
from importlib import metadata, util
from pathlib import Path
from typing import Any

PACKAGES = ("lmspec", "lmspec.backends", "lmspec.conformance")


def _digest(files: Iterable[tuple[str, Path]]) -> str:
    h = hashlib.sha256()
    for name, path in sorted(files):
        try:
            data = path.read_bytes()
        except OSError:
            data = b"<unreadable>"
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return "sha256:" + h.hexdigest()


def _package_files() -> list[tuple[str, Path]]:
    out = []
    for pkg in PACKAGES:
        spec = util.find_spec(pkg)
        for d in (spec.submodule_search_locations or []) if spec else []:
            for p in Path(d).iterdir():
                if p.is_file() and p.suffix in (".py", ".json", ".toml", ".typed"):
                    out.append((f"{pkg}/{p.name}", p))
    return out


def lmspec_hash() -> str:
    """The hash of lmspec's installed files (its packages' modules and data)."""
    return _digest(_package_files())


def _site_dirs() -> list[Path]:
    dirs = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    user = site.getusersitepackages() if site.ENABLE_USER_SITE else None
    dirs += [user] if isinstance(user, str) else []
    dirs += [p for p in sys.path if p.endswith("-packages")]
    return sorted({Path(d) for d in dirs if Path(d).is_dir()})


def pth_hash() -> str:
    """The hash of every ``.pth`` file of the environment's site directories."""
    return _digest((str(p), p) for d in _site_dirs() for p in d.glob("*.pth"))


def distribution_hash(dist: metadata.Distribution) -> str:
    """The hash of the files a distribution's ``RECORD`` lists (bytecode excepted)."""
    files = [f for f in (dist.files or []) if not str(f).endswith(".pyc")]
    return _digest((str(f), Path(str(dist.locate_file(f)))) for f in files)


def snapshot() -> dict[str, str]:
    """What must not change while a run is on."""
    return {"lmspec": lmspec_hash(), "pth": pth_hash()}


def changed_since(before: dict[str, str]) -> str:
    """Why the run's code cannot be trusted any more ('' when nothing changed)."""
    now = snapshot()
    what = [{"lmspec": "lmspec's installed files", "pth": "the environment's .pth files"}[k]
            for k in before if before[k] != now.get(k)]
    return " and ".join(what) + " changed during the run" if what else ""


def _dist(name: str) -> metadata.Distribution | None:
    try:
        return metadata.distribution(name) if name else None
    except metadata.PackageNotFoundError:
        return None


def record(sandbox_level: str, sources: Sequence[Any]) -> dict[str, Any]:
    """The report's provenance: the sandbox level, lmspec's hash and each plugin source
    (objects with ``name``, ``kind``, ``distribution``, ``version``) with its hash."""
    import lmspec

    plugins = []
    for s in sources:
        dist = _dist(getattr(s, "distribution", "") or "")
        plugins.append({"plugin": s.name, "source": s.kind,
                        "distribution": dist.metadata["Name"] if dist else "",
                        "version": dist.version if dist else getattr(s, "version", ""),
                        "files_sha256": (lmspec_hash() if dist.metadata["Name"] == "lmspec"
                                         else distribution_hash(dist)) if dist else None})
    return {"sandbox": sandbox_level, "lmspec": {"version": lmspec.__version__,
                                                 "files_sha256": lmspec_hash()},
            "plugins": plugins}


def consistency(rep: dict[str, Any]) -> list[str]:
    """What is wrong inside a report (``lmspec verify``): counts, statuses, the results
    against the selection in its settings, and lmspec's hash where the same version is
    installed here."""
    import lmspec

    from .report import summarize

    problems = []
    statuses = {"pass", "fail", "error", "deviation", "unsupported", "skipped"}
    results = rep.get("results", [])
    bad = sorted({str(r.get("status")) for r in results} - statuses)
    if bad:
        problems.append(f"unknown statuses {', '.join(bad)}")
        return problems
    counts = summarize(results)
    if {k: rep.get("summary", {}).get(k) for k in counts} != counts:
        problems.append("its summary does not count its results")
    s = rep.get("settings", {})
    names = set(s.get("backends") or [b.get("name") for b in rep.get("backends", [])])
    ops, dtypes, checks = s.get("ops"), s.get("dtypes"), s.get("checks")
    checks = checks if isinstance(checks, list) else None
    for r in results:
        if r.get("backend") not in names or (ops and r.get("op") not in ops) or (
                dtypes and r.get("dtype") not in dtypes) or (
                checks and r.get("check") not in checks):
            problems.append(f"result {r.get('backend')}/{r.get('op')}/{r.get('dtype')} is "
                            "outside the selection in its settings")
            break
    keys = [(r.get("backend"), r.get("op"), r.get("dtype"), r.get("check")) for r in results]
    if len(set(keys)) != len(keys):
        problems.append("a check has more than one result")
    prov = rep.get("environment", {}).get("provenance") or {}
    mine = prov.get("lmspec", {})
    if mine.get("version") == lmspec.__version__ and mine.get("files_sha256") not in (
            None, lmspec_hash()):
        problems.append(f"lmspec {lmspec.__version__} here is not the code that wrote it "
                        "(its files hash differently)")
    return problems


def stamp(rep: dict[str, Any], sandbox_level: str, sources: Sequence[Any]) -> dict[str, Any]:
    """``rep`` with its sandbox level and provenance in ``environment`` (id recomputed)."""
    from .report import report_id

    rep["environment"]["sandbox"] = sandbox_level
    rep["environment"]["provenance"] = record(sandbox_level, sources)
    rep["report_id"] = report_id(rep)
    return rep


def preload() -> None:
    """Import every judge module now, before the first host starts: a file a backend
    rewrites later is never imported by this judge."""
    import importlib
    import pkgutil

    import lmspec.conformance

    for m in pkgutil.iter_modules(lmspec.conformance.__path__):
        if m.name != "pytest_lmspec":
            importlib.import_module(f"lmspec.conformance.{m.name}")
    for m in ("discovery", "remote", "wire", "validate", "guard", "sandbox"):
        importlib.import_module(f"lmspec.backends.{m}")
