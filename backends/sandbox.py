"""How a backend host is started: under bubblewrap where it works, isolated Python always.

``bwrap`` level: the whole filesystem read-only; a private ``/tmp`` and home; one
writable cache directory of the host's own (per plugin source: ``XDG_CACHE_HOME``, and
for the built-in plugin the JAX compilation cache); its own PID, IPC and (unless the
network is allowed) network namespace; no capabilities; killed with the judge
(``--die-with-parent``; the judge kills the whole namespace by killing ``bwrap``).
``none`` level: the same Python isolation (``python -I``: the working directory and the
user site cannot shadow lmspec) and nothing else; the judge makes itself undumpable and a
child subreaper (:mod:`lmspec.backends.guard`) and refuses to write a report if lmspec's
installed files or the environment's ``.pth`` files changed during the run
(:mod:`lmspec.conformance.provenance`).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

LEVELS = ("auto", "bwrap", "none")


class SandboxUnavailable(RuntimeError):
    """``--sandbox bwrap`` was asked for and bubblewrap cannot run here."""


@dataclass(frozen=True)
class Sandbox:
    """A resolved sandbox: ``level`` is ``"bwrap"`` or ``"none"``."""

    level: str
    allow_network: bool = False
    bwrap: str = ""
    extra: tuple[str, ...] = ()  # e.g. ("--unshare-user",) where plain bwrap fails

    def command(self, argv: list[str], source: str) -> tuple[list[str], dict[str, str]]:
        """The command line and environment that start ``argv`` (a host) for ``source``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("LMSPEC_RUN_")}
        if self.level != "bwrap":
            return argv, env
        home = Path.home()
        cache = host_cache(source)
        cache.mkdir(parents=True, exist_ok=True)
        args = [self.bwrap, *self.extra, "--ro-bind", "/", "/", "--dev", "/dev", "--proc",
                "/proc", "--tmpfs", "/tmp", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
                "--die-with-parent", "--new-session"]
        hidden = [Path("/tmp")]
        if str(home) not in ("/", "", "/tmp"):
            args += ["--tmpfs", str(home)]
            hidden.append(home)
        for path in _python_paths(hidden):  # the interpreter, plugins on PYTHONPATH
            args += ["--ro-bind", path, path]
        args += ["--bind", str(cache), str(cache)]
        env["XDG_CACHE_HOME"] = str(cache)
        if source.split(":")[0] == "lmspec.backends.builtin":
            jax_dir = Path(os.environ.get("LMSPEC_JAX_CACHE_DIR") or _user_cache() / "lmspec"
                           / "jax")
            jax_dir.mkdir(parents=True, exist_ok=True)
            args += ["--bind", str(jax_dir), str(jax_dir)]
            env["LMSPEC_JAX_CACHE_DIR"] = str(jax_dir)
        if not self.allow_network:
            args.append("--unshare-net")
        if os.geteuid() == 0:
            args += ["--cap-drop", "ALL"]
        return [*args, "--", *argv], env


def _python_paths(hidden: list[Path]) -> list[str]:
    """The directories under the ``hidden`` ones (the home, /tmp) that the host's Python
    needs: its installation, the environment, ``sys.path`` and ``PYTHONPATH`` entries,
    outermost only; they are mounted back read-only."""
    import lmspec.backends
    import lmspec.conformance

    packages = {os.path.dirname(os.path.dirname(m.__file__ or ""))  # an editable install's
                for m in (lmspec, lmspec.backends, lmspec.conformance)}  # source tree
    found = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable)), *sys.path, *packages,
             *os.environ.get("PYTHONPATH", "").split(os.pathsep)}
    inside = sorted({os.path.realpath(p) for p in found if p}
                    | {os.path.abspath(p) for p in found if p})
    inside = [p for p in inside if any(Path(p).is_relative_to(h) and Path(p) != h
                                       for h in hidden) and os.path.exists(p)]
    return [p for p in inside if not any(p != q and Path(p).is_relative_to(q) for q in inside)]


def _user_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def host_cache(source: str) -> Path:
    """The one directory a sandboxed host of ``source`` may write (besides its /tmp)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", source)[:100] or "_"
    return _user_cache() / "lmspec" / "hosts" / slug


@functools.cache
def _probe() -> tuple[str, tuple[str, ...]] | None:
    """The bwrap binary and the extra options it needs here, or None if it cannot run."""
    exe = shutil.which("bwrap")
    if exe is None:
        return None
    base = ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
            "--unshare-pid", "--unshare-net", "--die-with-parent", "--new-session"]
    if os.geteuid() == 0:
        base += ["--cap-drop", "ALL"]
    for path in _python_paths([Path("/tmp")]):  # an interpreter or venv under /tmp
        base += ["--ro-bind", path, path]
    for extra in ((), ("--unshare-user",)):
        try:
            r = subprocess.run([exe, *extra, *base, "--", sys.executable, "-I", "-c", "0"],
                               capture_output=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            continue
        if r.returncode == 0:
            return exe, extra
    return None


def resolve(level: str = "auto", allow_network: bool = False) -> Sandbox:
    """The sandbox for ``--sandbox level``: ``auto`` takes bwrap when it works here and
    otherwise warns and runs hosts unsandboxed; ``bwrap`` raises
    :class:`SandboxUnavailable` when it cannot run."""
    if level not in LEVELS:
        raise ValueError(f"--sandbox must be one of {', '.join(LEVELS)}, not {level!r}")
    if level == "none":
        return Sandbox("none", allow_network)
    found = _probe()
    if found is None:
        if level == "bwrap":
            raise SandboxUnavailable("bubblewrap (bwrap) is not installed or cannot create "
                                     "namespaces here")
        warnings.warn("bubblewrap (bwrap) cannot run here: backend hosts run without a "
                      "sandbox (see docs/security.md)", stacklevel=2)
        return Sandbox("none", allow_network)
    return Sandbox("bwrap", allow_network, found[0], found[1])


_current: list[Sandbox] = []


def current() -> Sandbox:
    """The sandbox this judge starts hosts in (``LMSPEC_SANDBOX``, default ``auto``)."""
    if not _current:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _current.append(resolve(os.environ.get("LMSPEC_SANDBOX", "auto"),
                                    os.environ.get("LMSPEC_SANDBOX_NETWORK") == "1"))
        for w in caught:
            print(f"lmspec: warning: {w.message}", file=sys.stderr)
    return _current[0]


def use(sandbox: Sandbox) -> None:
    """Start every later host of this process in ``sandbox``; its workers inherit it."""
    _current[:] = [sandbox]
    os.environ["LMSPEC_SANDBOX"] = sandbox.level
    os.environ["LMSPEC_SANDBOX_NETWORK"] = "1" if sandbox.allow_network else "0"
