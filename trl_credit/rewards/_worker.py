"""One verification worker process of `trl_credit.rewards._pool.VerifierPool` (not imported by the package).

    python -m trl_credit.rewards._worker IN_FD OUT_FD TARGET PARENT_PID MAX_MEMORY_MB

Runs the target module's `_worker_init()` if it has one, says `("ready", pid, None)` (or `("startup_error", pid,
message)` before exiting if the start-up fails; the message starts with "out of memory" when the address-space limit
was hit), then receives `(task_id, soft_timeout_s, args)` on `IN_FD` (`soft_timeout_s == 0`: no soft deadline), calls
`TARGET(*args)` (`"module:function"`) and answers `(task_id, status, value)` on `OUT_FD` with status `"ok"`,
`"timeout"` or `"error"`. `None` or end of file stops it.

The soft deadline (`SIGALRM`, this process's main thread) ends items stuck in Python code and keeps the process; items
stuck in C code (a huge integer power in sympy) never see it, and the parent kills the process at the hard deadline.
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import logging
import os
import resource
import signal
import sys
from multiprocessing.connection import Connection


class _SoftDeadline(BaseException):
    # BaseException: math-verify and sympy catch `Exception` broadly and would turn the deadline into "no answer".
    pass


def _raise_deadline(signum, frame):
    raise _SoftDeadline


def _die_with_parent(parent_pid: int) -> None:
    # Linux: SIGKILL this process when the thread that started it exits, even while it is stuck in C code (the pool
    # starts workers from one long-lived thread). Elsewhere the closed pipe ends an idle worker.
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl
        os._exit(0)


def _start(target: str):
    module_name, func_name = target.split(":")
    module = importlib.import_module(module_name)
    func = getattr(module, func_name)
    if hasattr(module, "_worker_init"):  # warm caches (compiled regexes...) before the first deadline starts
        module._worker_init()
    return func


def main(argv: list[str]) -> None:
    in_fd, out_fd, target, parent_pid, max_memory_mb = int(argv[0]), int(argv[1]), argv[2], int(argv[3]), int(argv[4])
    _die_with_parent(parent_pid)
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    if max_memory_mb > 0:
        # A runaway sympy computation gets a MemoryError instead of taking the machine down (Math-Verify#63). Only the
        # soft limit is lowered, so that a failed start-up can be retried without it to tell whether it was the cause.
        limit = max_memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    inbox, outbox = Connection(in_fd, writable=False), Connection(out_fd, readable=False)
    try:
        func = _start(target)
    except BaseException as e:
        # Tell the parent why before dying: under a small `max_memory_mb` the imports themselves fail, and the parent
        # must name that limit rather than the installation. "out of memory" starts the report in that case.
        out_of_memory = isinstance(e, MemoryError) or (isinstance(e, OSError) and e.errno == errno.ENOMEM)
        if not out_of_memory and max_memory_mb > 0:
            # Under an address-space limit a C extension can fail in other ways (e.g. `SystemError: error return
            # without exception set` inside sympy's imports): the limit was the cause iff start-up works without it.
            try:
                resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
                _start(target)
                out_of_memory = True
            except BaseException:  # noqa: BLE001 - it fails without the limit too: report the original error
                pass
        report = f"{'out of memory: ' if out_of_memory else ''}{type(e).__name__}{f': {e}' if str(e) else ''}"
        try:
            outbox.send(("startup_error", os.getpid(), report[:300]))
        except Exception:  # noqa: BLE001 - the exit status still tells the parent
            pass
        if out_of_memory:
            sys.exit(3)  # the parent's message says it all; a traceback of the failed import would only confuse
        raise
    signal.signal(signal.SIGALRM, _raise_deadline)
    outbox.send(("ready", os.getpid(), None))
    while True:
        try:
            message = inbox.recv()
        except (EOFError, OSError):
            break
        if message is None:
            break
        task_id, soft_timeout, args = message
        try:
            signal.setitimer(signal.ITIMER_REAL, soft_timeout)
            try:
                value = func(*args)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            reply = (task_id, "ok", value)
        except _SoftDeadline:
            reply = (task_id, "timeout", None)
        except MemoryError:
            reply = (task_id, "error", "MemoryError")
        except Exception as e:  # a bug or an unexpected input must cost one item, not the worker
            reply = (task_id, "error", f"{type(e).__name__}: {e}"[:300])
        try:
            outbox.send(reply)
        except (BrokenPipeError, OSError):
            break


if __name__ == "__main__":
    main(sys.argv[1:])
