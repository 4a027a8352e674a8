"""The judge's own signals: who may stop a run, and what is left when it ends.

A backend host runs plugin code under the judge's user id; without a PID namespace it
can signal the judge. So the judge blocks ``SIGINT``/``SIGTERM``/``SIGHUP`` in every
thread and a watcher thread takes them with :func:`signal.sigwaitinfo`, which tells the
sender's pid (a Python signal handler cannot): a signal from one of the judge's own
descendants (a host, or anything a host started) is ignored and recorded; any other
sender stops the run at once (``on_stop`` runs in the watcher, then the main thread gets
:class:`Interrupted`). The judge is a child subreaper, so a host's descendants that leave
their session stay its descendants and are killed by :func:`kill_descendants`.
"""

from __future__ import annotations

import _thread
import contextlib
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

WATCHED = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
_WAKE = signal.SIGURG  # default: ignored; wakes the main thread out of a system call

_lock = threading.Lock()
_state: dict[str, object] = {"signum": None, "installed": False, "on_stop": None,
                             "effective": True}
ignored: list[tuple[int, int]] = []
"""``(signal, sender pid)`` of every signal a descendant sent the judge."""
_hosts: set[int] = set()


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal from outside the judge (``signum``)."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signal.Signals(signum).name}")
        self.signum = signum


def _prctl(option: int, arg: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux
        pass


def harden() -> None:
    """No ptrace from processes without ``CAP_SYS_PTRACE`` (``PR_SET_DUMPABLE`` 0) and
    escaped descendants reparented here (``PR_SET_CHILD_SUBREAPER``)."""
    _prctl(4, 0)  # PR_SET_DUMPABLE
    _prctl(36, 1)  # PR_SET_CHILD_SUBREAPER


def adopt(pid: int) -> None:
    """Remember a host's pid: its signals are ignored even after it is reaped."""
    _hosts.add(pid)


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def is_descendant(pid: int, root: int | None = None) -> bool:
    """Whether ``pid`` is a (known or live) descendant of ``root`` (this process)."""
    root = os.getpid() if root is None else root
    if pid in _hosts:
        return True
    seen = 0
    while pid > 1 and seen < 256:
        parent = _ppid(pid)
        if parent is None:
            return False
        if parent == root:
            return True
        pid, seen = parent, seen + 1
    return False


def descendants(root: int | None = None) -> list[int]:
    """Every live descendant of ``root`` (this process), from /proc."""
    root = os.getpid() if root is None else root
    out = []
    for d in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if d.isdigit() and int(d) != root and is_descendant(int(d), root):
            out.append(int(d))
    return out


def kill_descendants(spare: Callable[[int], bool] = lambda pid: False) -> list[int]:
    """SIGKILL every descendant (escaped ones included) and reap what was reparented
    here; the pids killed."""
    killed = [p for p in descendants() if not spare(p)]
    for p in killed:
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)
    for p in killed:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(p, 0)
    return killed


def stopping() -> int | None:
    """The signal that is stopping this judge, if any."""
    return _state["signum"]  # type: ignore[return-value]


def _handler(signum: int, frame: object) -> None:
    if _state["signum"] is not None:  # the watcher tripped this on purpose
        raise Interrupted(int(_state["signum"]))  # type: ignore[arg-type]
    if not _state["effective"]:  # a thread that cannot say who sent it took the signal
        _state["signum"] = signum
        on_stop = _state["on_stop"]
        if callable(on_stop):
            on_stop(signum)
        raise Interrupted(signum)


def _watch() -> None:
    while True:
        info = signal.sigwaitinfo(WATCHED)
        if info.si_pid and info.si_pid != os.getpid() and is_descendant(info.si_pid):
            ignored.append((info.si_signo, info.si_pid))
            continue
        with _lock:
            if _state["signum"] is not None:
                continue
            _state["signum"] = info.si_signo
            on_stop = _state["on_stop"]
        if callable(on_stop):
            with contextlib.suppress(Exception):
                on_stop(info.si_signo)
        _thread.interrupt_main(info.si_signo)
        with contextlib.suppress(Exception):
            signal.pthread_kill(threading.main_thread().ident, _WAKE)  # type: ignore[arg-type]


def _other_threads_block() -> bool:
    """Whether every thread but this one blocks the watched signals (else the kernel may
    hand one of them to a thread that cannot say who sent it)."""
    mask = sum(1 << (int(s) - 1) for s in WATCHED)
    try:
        tids = [t for t in os.listdir("/proc/self/task") if int(t) != threading.get_native_id()]
        for t in tids:
            with open(f"/proc/self/task/{t}/status") as f:
                blk = next(int(line.split()[1], 16) for line in f if line.startswith("SigBlk:"))
            if blk & mask != mask:
                return False
    except (OSError, StopIteration, ValueError):
        return True  # not Linux: nothing better to do
    return True


def exec_blocked() -> None:
    """Start this command again with the watched signals blocked from its first
    instruction, when a thread started before :func:`install` (a BLAS pool that importing
    NumPy starts) does not block them; the process keeps its pid and arguments."""
    if os.environ.pop("LMSPEC_SIGNALS_BLOCKED", "") == "1" or _other_threads_block():
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)
    os.environ["LMSPEC_SIGNALS_BLOCKED"] = "1"
    try:
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    except OSError:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, WATCHED)


def install() -> None:
    """Take the judge's signals (main thread, before any other thread starts)."""
    if _state["installed"] or threading.current_thread() is not threading.main_thread():
        return
    harden()
    _state["effective"] = _other_threads_block()
    for s in WATCHED:
        signal.signal(s, _handler)
    signal.signal(_WAKE, lambda s, f: None)
    signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)
    threading.Thread(target=_watch, name="lmspec-signals", daemon=True).start()
    _state["installed"] = True


def set_on_stop(action: Callable[[int], None] | None) -> None:
    """Run ``action(signum)`` (in the watcher thread) when the judge is stopped."""
    _state["on_stop"] = action


@contextlib.contextmanager
def on_stop(action: Callable[[int], None]) -> Iterator[None]:
    """:func:`set_on_stop` for a block (the guard is installed if it was not)."""
    install()
    old = _state["on_stop"]
    _state["on_stop"] = action
    try:
        yield
    finally:
        _state["on_stop"] = old
