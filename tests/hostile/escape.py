"""Attacks on the judge's files, processes and signals from inside a backend call.

Each attack that succeeds answers correctly (so a judge that let it through would say
``pass``); each that is blocked raises, or answers wrongly. ``HOSTILE_CANARY`` is a file
of the project the write attack appends to, ``HOSTILE_SLEEP`` the argument of the
``sleep`` an escaped grandchild runs, ``HOSTILE_REPORT_DIR`` where the journal is,
``HOSTILE_FLAG_DIR`` where one-shot attacks note that they happened.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sysconfig
import time
from pathlib import Path

import lmspec

from . import Base, uniform


def _judge() -> int:
    ppid = os.getppid()
    if ppid <= 1:
        raise PermissionError("the judge is not visible from here")
    return ppid


def write_installed(x, axis):
    with open(os.environ["HOSTILE_CANARY"], "a") as f:
        f.write("\nraise SystemExit('code from a backend ran in the judge')\n")
    return lmspec.softmax(x, axis)


def write_pth(x, axis):
    path = Path(sysconfig.get_paths()["purelib"]) / "zz_lmspec_hostile_test.pth"
    path.write_text("# written by a hostile backend\n")
    return lmspec.softmax(x, axis)


def escape(x, axis):
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execvp("sleep", ["sleep", os.environ.get("HOSTILE_SLEEP", "3617")])
        os._exit(0)
    time.sleep(0.2)
    return uniform(x, axis)


def forge_journal(x, axis):
    d = Path(os.environ["HOSTILE_REPORT_DIR"])
    journals = list(d.glob(".*.journal.jsonl"))
    if not journals:
        raise FileNotFoundError("no journal visible")
    forged = {"backend": "hostile-escape-forge-journal", "op": "softmax", "dtype": "float64",
              "check": "forward", "status": "pass", "examples": 5, "max_abs_err": 0.0,
              "max_rel_err": 0.0, "worst_ratio": 0.0, "tolerance": None, "message": "",
              "counterexample": None, "reproduce": None}
    with open(journals[0], "a") as f:
        f.write(json.dumps(forged) + "\n")
    os.kill(_judge(), signal.SIGKILL)
    time.sleep(3600)


def ptrace(x, axis):
    libc = ctypes.CDLL(None, use_errno=True)
    pid = _judge()
    if libc.ptrace(16, pid, None, None) != 0:  # PTRACE_ATTACH
        raise PermissionError(f"ptrace refused (errno {ctypes.get_errno()})")
    libc.ptrace(17, pid, None, None)  # PTRACE_DETACH: it worked
    return lmspec.softmax(x, axis)


def sigstop(x, axis):
    os.kill(_judge(), signal.SIGSTOP)
    return uniform(x, axis)


def sigint(x, axis):
    try:
        os.kill(_judge(), signal.SIGINT)
        os.kill(_judge(), signal.SIGTERM)
    except PermissionError:
        pass
    time.sleep(0.2)
    return uniform(x, axis)


def kill_sibling(x, axis):
    flag = Path(os.environ.get("HOSTILE_FLAG_DIR", "/nonexistent")) / "killed-sibling"
    if not flag.exists():
        me, parent = os.getpid(), os.getppid()
        for p in Path("/proc").iterdir():
            if not p.name.isdigit() or int(p.name) == me:
                continue
            try:
                cmd = (p / "cmdline").read_bytes()
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if b"lmspec.backends.host" in cmd and ppid == parent:
                os.kill(int(p.name), signal.SIGKILL)
        try:
            flag.write_text("done")
        except OSError:
            pass
    return uniform(x, axis)


ATTACKS = {"write-installed": write_installed, "write-pth": write_pth, "escape": escape,
           "forge-journal": forge_journal, "ptrace": ptrace, "sigstop": sigstop,
           "sigint": sigint, "kill-sibling": kill_sibling}


class Escape(Base):
    def __init__(self, attack: str):
        super().__init__(f"hostile-escape-{attack}")
        self.attack = ATTACKS[attack]  # type: ignore[method-assign]


@lmspec.hookimpl
def register_backends(register):
    for a in ATTACKS:
        register(Escape(a))
