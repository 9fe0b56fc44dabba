"""How a command stops. Ctrl-C, a SIGTERM (kill, timeout, systemd, a batch scheduler) or the
death of the `mlflow run` process that started us: each ends the MLflow run KILLED, registers
nothing, and leaves no process behind.

Why this needs care: `mlflow run` starts us as a child (`bash -c` execs python). When only the
`mlflow run` process is stopped, the child was reparented to PID 1 and trained on, and the run
`mlflow run` had created stayed RUNNING. So every entry point calls `handle_stops()` first:
stop signals become KeyboardInterrupt (which `mlflow_run.tracked_run` turns into KILLED), the
kernel sends us SIGTERM when our parent dies (Linux `PR_SET_PDEATHSIG`), and a stop that comes
before our own run context still ends the run `mlflow run` created (`end_started_run`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from covid_xray.errors import first_line

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Test hook: a process started with COVID_XRAY_PAUSE_AT=<point> says "paused at <point>" there
# and waits for a stop signal, so tests can stop it at an exact phase (before data, while
# caching, mid-epoch, while registering). Unset, `pause_point` costs one dict lookup.
PAUSE_VARIABLE = "COVID_XRAY_PAUSE_AT"
_received: list[int] = []  # the stop signals that arrived, for the exit code
_held: list[list[int]] = []  # signals recorded inside each active stops_deferred()
_paused: set[str] = set()  # pause points already passed (each pauses once)
_started_run: list[str] = []  # MLFLOW_RUN_ID as handle_stops() found it


def handle_stops() -> None:
    """Turn stop signals into KeyboardInterrupt and die with the parent process."""
    # Remember the run `mlflow run` made for us now: mlflow.start_run() removes MLFLOW_RUN_ID
    # from the environment when it resumes that run.
    _started_run[:] = [os.environ.get("MLFLOW_RUN_ID", "")]
    _install_stop_handlers()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM))


def forget_started_run() -> None:
    """This process must not end the run `mlflow run` made (a training process other than
    rank 0, which owns it)."""
    _started_run[:] = [""]


def record_stop(number: int) -> None:
    """A stop signal that another handler caught (torchrun's launcher) counts as ours."""
    _received.append(number)


def _install_stop_handlers() -> dict[int, Any]:
    """The one place SIGTERM and SIGHUP are made to raise a stop; returns what they did
    before."""
    return {number: signal.signal(number, raise_stop) for number in (signal.SIGTERM,
                                                                      signal.SIGHUP)}


@contextlib.contextmanager
def stops_raise() -> Iterator[None]:
    """Inside the block, SIGTERM and SIGHUP raise like Ctrl-C (then restored), so a run
    started by library code (a notebook, a test) also ends KILLED on a stop. Entry points have
    installed this for the whole process already (`handle_stops`). Only the main thread may
    set signal handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = _install_stop_handlers()
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def end_if_running(run_ids: Iterable[str], status: str, tags: dict[str, str] | None = None
                   ) -> list[str]:
    """End each of these MLflow runs that is still RUNNING with `status` (tagged `tags`):
    the one way a stopped, failed or orphaned run is closed by id (the command's own run, a
    lost tune worker's trial, stopped workers' runs). Never raises, since the tracking server
    may be what went away: returns one line per run it could not end."""
    from mlflow.tracking import MlflowClient  # here: download never imports MLflow

    problems = []
    client = MlflowClient()
    for run_id in run_ids:
        try:
            if client.get_run(run_id).info.status == "RUNNING":
                for key, value in (tags or {}).items():
                    client.set_tag(run_id, key, value)
                client.set_terminated(run_id, status)
        except Exception as error:  # stopping must not fail on a tracking hiccup
            reason = first_line(error)
            problems.append(f"could not end MLflow run {run_id} as {status} ({reason})")
    return problems


def exit_code() -> int:
    """128 + the signal that stopped us (130 for Ctrl-C), as shells report it."""
    return 128 + (_received[-1] if _received else int(signal.SIGINT))


def started_run_id() -> str:
    """The run `mlflow run` created for this command ("" when none)."""
    return (_started_run or [""])[0] or os.environ.get("MLFLOW_RUN_ID", "")


def end_started_run(status: str = "KILLED") -> str | None:
    """End with `status` (KILLED after a stop, FAILED after a user error) the run `mlflow run`
    created for us (MLFLOW_RUN_ID) and any run this process still has open, when RUNNING;
    return the first id. Never raises: the tracking server may be what went away.

    After a stop, further stop signals are ignored from here on: a stopped `mlflow run` also
    signals its child, so a second SIGTERM often follows the first and must not cut this
    cleanup short. SIGCHLD goes back to default: torch's DataLoader handler raises when a
    worker dies. (Left to `mlflow run`, a failed command's run would be ended by it, which
    prints the tracking URI as it was given, login included.)"""
    if status == "KILLED":
        for number in STOP_SIGNALS:
            signal.signal(number, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    run_ids = [run_id for run_id in [started_run_id()] if run_id]
    if "mlflow" in sys.modules:  # else nothing of MLflow ran here (download)
        import mlflow

        # A run whose own ending was cut short is still on MLflow's active-run stack.
        active = mlflow.active_run()
        if active is not None and active.info.run_id not in run_ids:
            run_ids.append(active.info.run_id)
    if not run_ids:
        return None  # no run to end: the tracking store is not touched
    problems = end_if_running(run_ids, status)
    for problem in problems:
        print(problem, file=sys.stderr)
    if "mlflow" in sys.modules and not problems:
        # Off MLflow's active-run stack too: at exit MLflow ends what is left there FINISHED,
        # over our status (seen once after a stop mid-epoch).
        with contextlib.suppress(BaseException):
            while mlflow.active_run() is not None:
                mlflow.end_run(status)
    return run_ids[0]


def stopping() -> bool:
    """A stop signal has arrived in this process."""
    return bool(_received)


@contextlib.contextmanager
def stops_quieted() -> Iterator[None]:
    """While cleaning up after a stop: ignore further stop signals (a stopped `mlflow run`
    and `timeout` signal the whole group, so a second SIGTERM often follows the first) and
    take SIGCHLD back from torch, whose DataLoader handler raises when a worker dies of the
    same stop. The handlers come back afterwards (tests run this in-process)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, signal.SIG_IGN) for number in STOP_SIGNALS}
    previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)


def stop_pending() -> bool:
    """A stop signal arrived while stops were deferred."""
    return bool(_held and _held[-1])


@contextlib.contextmanager
def stops_deferred() -> Iterator[None]:
    """Hold stop signals during a step that must not be cut in half (registering a model
    version): they are recorded, not acted on, and the stop happens when the step ends. The
    step checks `stop_pending()` to undo itself first. (Not pthread_sigmask: Python runs its
    handlers for a signal that any thread receives, and torch and MLflow keep threads.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {number: signal.signal(number, lambda number, frame: held.append(number))
                for number in STOP_SIGNALS}
    _held.append(held)
    try:
        yield
    finally:
        _held.pop()
        for number, handler in previous.items():
            signal.signal(number, handler)
        if held:
            _received.append(held[0])
            raise KeyboardInterrupt(f"signal {signal.Signals(held[0]).name}")


def pause_point(name: str) -> None:
    """The test hook (see PAUSE_VARIABLE): wait here, once per process and up to 2 minutes,
    for a stop."""
    if os.environ.get(PAUSE_VARIABLE) != name or name in _paused:
        return
    _paused.add(name)
    print(f"paused at {name}", flush=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not stop_pending():
        time.sleep(0.05)  # a stop that is not deferred raises KeyboardInterrupt in here


def raise_stop(number: int, frame: object) -> None:
    """Signal handler: a stop is a KeyboardInterrupt, which every run context ends KILLED."""
    _received.append(number)
    raise KeyboardInterrupt(f"signal {signal.Signals(number).name}")
