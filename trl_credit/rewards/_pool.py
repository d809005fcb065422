"""A bounded pool of verification worker processes with a hard wall-clock deadline per item.

Why not `concurrent.futures.ProcessPoolExecutor` or `multiprocessing.Pool`: neither can kill the one worker stuck on an
item (a hung worker blocks the pool, or a killed one breaks it: `BrokenProcessPool`), and with the `fork` start method
they copy a parent that holds CUDA, vLLM and tokenizer threads. Here each worker is a fresh interpreter
(`python -m trl_credit.rewards._worker`) talking over its own pipe pair, so that:

- an item that overruns its deadline scores as `"timeout"`, its worker is killed (`SIGKILL`) and replaced, and the
  other workers keep going;
- a worker that dies (segfault, out of memory) costs its current item (`"error"`) and is replaced;
- the parent never uses signals: deadlines are `multiprocessing.connection.wait` timeouts, so `map` works from any
  thread (calls are serialized by a lock);
- a fresh interpreter never re-imports the user's `__main__` (unlike `spawn`/`forkserver`), so training scripts without
  an `if __name__ == "__main__":` guard are safe.
"""

from __future__ import annotations

import atexit
import math
import numbers
import os
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any


# How a worker's start-up report begins when it ran out of memory (see _worker.py).
_OUT_OF_MEMORY = "out of memory"
# Items sent ahead to a busy worker: hides the pipe round trip without starving the other workers.
_PREFETCH = 2
# The longest deadline accepted: the pool waits with `multiprocessing.connection.wait`, whose epoll timeout overflows
# past about 24 days, and a deadline of a day per completion is already no deadline for a reward.
MAX_TIMEOUT_S = 86400.0


def check_timeout(timeout) -> float:
    """`timeout` as a float, or `ValueError`/`TypeError` naming the problem: a finite number of seconds in
    (0, `MAX_TIMEOUT_S`]. `None`, `inf` and `nan` are refused: a reward without a deadline can hang training."""
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"timeout must be a number of seconds, got {type(timeout).__name__} {timeout!r}.")
    timeout = float(timeout)
    if not math.isfinite(timeout):
        raise ValueError(
            f"timeout must be a finite number of seconds, got {timeout}: every completion needs a deadline, or one "
            f"stuck parse could hang training. Give a generous finite value instead (at most {MAX_TIMEOUT_S:.0f})."
        )
    if not 0 < timeout <= MAX_TIMEOUT_S:
        raise ValueError(f"timeout must be > 0 and <= {MAX_TIMEOUT_S:.0f} seconds, got {timeout}.")
    return timeout


def check_num_workers(num_workers) -> int | None:
    """`num_workers` (`None` = the default) or `ValueError`/`TypeError`: an integer >= 1."""
    if num_workers is None:
        return None
    if isinstance(num_workers, bool) or not isinstance(num_workers, numbers.Integral):
        raise TypeError(f"num_workers must be an integer >= 1 or None, got {type(num_workers).__name__} "
                        f"{num_workers!r}.")  # fmt: skip
    if num_workers < 1:
        raise ValueError(
            f"num_workers must be >= 1 (or None for half the CPU cores), got {num_workers}: verification always runs "
            "in worker processes, which is what enforces the deadline."
        )
    return int(num_workers)


def check_max_memory_mb(max_memory_mb) -> int:
    """`max_memory_mb` or `ValueError`/`TypeError`: an integer >= 0 (`0` disables the limit)."""
    if isinstance(max_memory_mb, bool) or not isinstance(max_memory_mb, numbers.Integral):
        raise TypeError(f"max_memory_mb must be an integer (MiB; 0 disables the limit), got "
                        f"{type(max_memory_mb).__name__} {max_memory_mb!r}.")  # fmt: skip
    if max_memory_mb < 0:
        raise ValueError(f"max_memory_mb must be >= 0 (MiB; 0 disables the limit), got {max_memory_mb}.")
    return int(max_memory_mb)


def default_num_workers() -> int:
    """Worker processes used when none is given: half the usable CPU cores (at least 1, at most 8).

    Half, because the trainer (and vLLM) need cores too, and because on small machines two verifiers on shared cores
    burn more CPU per completion than one (measured on a 2-vCPU VM: about 1.6x, see docs/rewards.md).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, min(8, cores // 2))


class _Worker:
    __slots__ = ("proc", "inbox", "outbox", "ready", "inflight", "head_start", "last_key", "startup_error")

    def __init__(self, proc: subprocess.Popen, inbox: Connection, outbox: Connection):
        self.proc = proc
        self.inbox = inbox  # parent -> worker
        self.outbox = outbox  # worker -> parent
        self.ready = False
        self.inflight: deque[tuple[int, int]] = deque()  # (task_id, item index), in the worker's processing order
        self.head_start = 0.0  # when the worker started the first in-flight item
        self.last_key: Hashable = None  # key of the last item sent (its caches are warm for it)
        self.startup_error: str | None = None  # what the worker reported before exiting during start-up


class _Pending:
    """Items not sent yet, in order within each key."""

    def __init__(self, keys: list):
        self.keys = keys
        self.by_key: dict[Hashable, deque[int]] = {}
        for index, key in enumerate(keys):
            self.by_key.setdefault(key, deque()).append(index)
        self.count = len(keys)

    def __len__(self) -> int:
        return self.count

    def pop(self, last_key: Hashable, busy_keys: set) -> int:
        """The next item of `last_key`, else of the first key no other worker is on, else of the first key."""
        queue = self.by_key.get(last_key)
        if not queue:
            queue = next((q for k, q in self.by_key.items() if k not in busy_keys), None)
            queue = queue or next(iter(self.by_key.values()))
        index = queue.popleft()
        if not queue:
            del self.by_key[self.keys[index]]
        self.count -= 1
        return index

    def push_front(self, index: int) -> None:
        self.by_key.setdefault(self.keys[index], deque()).appendleft(index)
        self.count += 1


class VerifierPool:
    """
    Worker processes that run `target(*args)` for many items, each under a hard wall-clock deadline.

    Args:
        target (`str`):
            The function the workers call, as `"module:function"`. It must return something small and picklable.
        num_workers (`int`, *optional*):
            Number of worker processes. Defaults to half the usable CPU cores, at least 1 and at most 8.
        max_memory_mb (`int`, *optional*, defaults to `4096`):
            Address-space limit of each worker (`RLIMIT_AS`); an item over it scores as `"error"`. `0` disables it.
        start_timeout (`float`, *optional*, defaults to `120.0`):
            Seconds to wait for a first worker to start before `map` raises.
        soft_deadline (`bool`, *optional*, defaults to `True`):
            Let a worker end an overrunning item itself (`SIGALRM`, just before the hard deadline), which keeps the
            process. With `False` every overrun waits for the hard deadline and costs a worker restart.
    """

    def __init__(
        self,
        target: str,
        num_workers: int | None = None,
        max_memory_mb: int = 4096,
        start_timeout: float = 120.0,
        soft_deadline: bool = True,
    ):
        num_workers = check_num_workers(num_workers)
        self.target = target
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.max_memory_mb = check_max_memory_mb(max_memory_mb)
        self.start_timeout = start_timeout
        self.soft_deadline = soft_deadline
        self.stats = {"timeouts": 0, "errors": 0, "restarts": 0}
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._next_task_id = 0
        self._startup_failures = 0
        self._pid = os.getpid()
        self._closed = False
        # Linux kills a worker when the *thread* that started it exits (PR_SET_PDEATHSIG, see _worker.py), so every
        # worker is started from this one long-lived thread, whichever thread calls `map`.
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trl-credit-verifier-spawner")
        self._finalizer = weakref.finalize(self, _shutdown, self._workers, self._spawner)

    # ── public API ─────────────────────────────────────────────────────────────────────────────────────────────────
    def map(
        self,
        args_list: Sequence[tuple],
        timeout: float,
        keys: Sequence[Hashable] | None = None,
        on_done: Callable[[int], None] | None = None,
    ) -> list[tuple[str, Any]]:
        """
        Run `target(*args)` for every `args` of `args_list`, at most `timeout` seconds each (wall clock, from the moment
        a worker starts the item). Returns one `(status, value)` per item, in order: `("ok", result)`,
        `("timeout", None)` or `("error", message)`.

        `keys` (one per item, optional) groups items that share work a worker caches, e.g. the gold answer of a GRPO
        group: a worker is given items of the key it last had, and idle workers take keys no other worker is on.
        `on_done(n)` (optional) is called from the calling thread each time `n` more items are finished (a progress
        bar's `update`).
        """
        if keys is not None and len(keys) != len(args_list):
            raise ValueError(f"{len(keys)} keys for {len(args_list)} items.")
        timeout = check_timeout(timeout)
        if os.getpid() != self._pid:
            raise RuntimeError("This VerifierPool belongs to the parent process; create a new one after fork().")
        if self._closed:
            raise RuntimeError("This VerifierPool is closed.")
        if not args_list:
            return []
        with self._lock:
            try:
                keys = list(keys) if keys is not None else [None] * len(args_list)
                return self._map(list(args_list), timeout, keys, on_done)
            except BaseException:
                # Interrupted (KeyboardInterrupt...): in-flight answers would reach the next call; start clean.
                for worker in list(self._workers):
                    if worker.inflight:
                        self._replace(worker)
                raise

    def close(self) -> None:
        """Stop the workers (idempotent; also runs at interpreter exit)."""
        self._closed = True
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ── internals ──────────────────────────────────────────────────────────────────────────────────────────────────
    def _map(self, args_list: list[tuple], timeout: float, keys: list, on_done=None) -> list[tuple[str, Any]]:
        results: list[tuple[str, Any] | None] = [None] * len(args_list)
        pending = _Pending(keys)
        remaining = len(args_list)
        reported = 0
        # Let the worker's own SIGALRM end Python-level overruns just before the hard kill, which costs a restart.
        soft_timeout = max(0.9 * timeout, timeout - 0.25) if self.soft_deadline else 0.0
        self._fill()
        waiting_since = time.monotonic()
        while remaining:
            now = time.monotonic()
            # ── dispatch ──
            for worker in self._workers:
                if not worker.ready:
                    continue
                while pending and len(worker.inflight) < _PREFETCH:
                    busy = {w.last_key for w in self._workers if w is not worker and w.inflight}
                    index = pending.pop(worker.last_key, busy)
                    task_id = self._next_task_id
                    self._next_task_id += 1
                    try:
                        worker.inbox.send((task_id, soft_timeout, args_list[index]))
                    except (BrokenPipeError, OSError):
                        pending.push_front(index)
                        break  # the worker died; its read end reports it below
                    if not worker.inflight:
                        worker.head_start = now
                    worker.inflight.append((task_id, index))
                    worker.last_key = keys[index]
            if not any(w.ready for w in self._workers) and now - waiting_since > self.start_timeout:
                raise RuntimeError(
                    f"No verification worker started within {self.start_timeout:.0f} s (`{sys.executable} -m "
                    "trl_credit.rewards._worker`); check that `math-verify` imports in this environment and that the "
                    "machine is not out of memory or processes."
                )
            # ── wait for answers until the earliest deadline ──
            deadlines = [w.head_start + timeout for w in self._workers if w.inflight]
            wait_s = max(0.0, min(deadlines) - now) if deadlines else 0.5
            readable = wait([w.outbox for w in self._workers], timeout=wait_s)
            now = time.monotonic()
            for worker in [w for w in self._workers if w.outbox in readable]:
                while worker.outbox.poll():
                    try:
                        task_id, status, value = worker.outbox.recv()
                    except (EOFError, OSError):
                        remaining -= self._fail(worker, results, pending, "error", "verification worker died")
                        break
                    if task_id == "ready":
                        worker.ready = True
                        self._startup_failures = 0
                        continue
                    if task_id == "startup_error":
                        worker.startup_error = value
                        continue
                    if not worker.inflight or worker.inflight[0][0] != task_id:
                        continue  # cannot happen (a worker with in-flight items is replaced on error); guard anyway
                    _, index = worker.inflight.popleft()
                    results[index] = (status, value)
                    remaining -= 1
                    if status == "timeout":
                        self.stats["timeouts"] += 1
                    elif status == "error":
                        self.stats["errors"] += 1
                    worker.head_start = now
            # ── hard deadlines ──
            for worker in list(self._workers):
                if worker.inflight and now - worker.head_start >= timeout:
                    remaining -= self._fail(worker, results, pending, "timeout", None)
            if any(w.ready for w in self._workers):
                waiting_since = now
            if on_done is not None and len(args_list) - remaining > reported:
                on_done(len(args_list) - remaining - reported)
                reported = len(args_list) - remaining
        return results  # type: ignore[return-value]

    def _fail(self, worker: _Worker, results, pending: _Pending, status: str, value) -> int:
        """Score the worker's current item as `status`, requeue the rest of its items, replace it; returns the number
        of items scored (0 for an idle worker)."""
        if not worker.ready:
            self._startup_failures += 1
            out_of_memory = worker.startup_error is not None and worker.startup_error.startswith(_OUT_OF_MEMORY)
            if out_of_memory or self._startup_failures >= 3:
                code = worker.proc.wait()
                self._replace(worker, restart=False)
                raise RuntimeError(self._startup_message(code, worker.startup_error))
        scored = 0
        if worker.inflight:
            _, index = worker.inflight.popleft()
            results[index] = (status, value)
            self.stats["timeouts" if status == "timeout" else "errors"] += 1
            scored = 1
        for _, queued in reversed(worker.inflight):
            pending.push_front(queued)
        worker.inflight.clear()
        self._replace(worker)
        return scored

    def _startup_message(self, code: int, error: str | None) -> str:
        if error is not None and error.startswith(_OUT_OF_MEMORY) and self.max_memory_mb > 0:
            return (
                f"Verification workers run out of memory during start-up ({error[len(_OUT_OF_MEMORY) + 2 :]}): "
                f"max_memory_mb="
                f"{self.max_memory_mb} MiB of address space is too little to import math-verify and its "
                "dependencies (about 70 MiB on Linux x86-64 with Python 3.11, more with other builds). Raise "
                "max_memory_mb (default 4096) or pass 0 to disable the limit."
            )
        reported = f": {error}" if error else "; their traceback is on stderr"
        hint = (
            f" If the address-space limit is the cause, raise max_memory_mb (now {self.max_memory_mb} MiB; 0 disables "
            "it)." if self.max_memory_mb > 0 else ""
        )  # fmt: skip
        return (
            f"Verification workers exit during start-up (exit code {code}{reported}). Check that `{sys.executable} "
            f"-m trl_credit.rewards._worker` can import trl_credit and math-verify.{hint}"
        )

    def _fill(self) -> None:
        for worker in list(self._workers):
            if worker.proc.poll() is not None and not worker.inflight:
                self._replace(worker)
        while len(self._workers) < self.num_workers:
            self._workers.append(self._spawner.submit(self._start_worker).result())

    def _replace(self, worker: _Worker, restart: bool = True) -> None:
        self._workers.remove(worker)
        _kill(worker)
        self.stats["restarts"] += 1
        if restart and not self._closed:
            self._workers.append(self._spawner.submit(self._start_worker).result())

    def _start_worker(self) -> _Worker:
        to_worker_r, to_worker_w = os.pipe()
        from_worker_r, from_worker_w = os.pipe()
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])
        if package_root not in _site_dirs():
            # A source checkout or editable install: the worker must import this very trl_credit. (Never prepend a
            # site-packages directory: it would come before the standard library.)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        cmd = [
            sys.executable, "-m", "trl_credit.rewards._worker", str(to_worker_r), str(from_worker_w), self.target,
            str(os.getpid()), str(self.max_memory_mb),
        ]  # fmt: skip
        try:
            proc = subprocess.Popen(
                cmd, pass_fds=(to_worker_r, from_worker_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                env=env, close_fds=True,
            )  # fmt: skip
        finally:
            os.close(to_worker_r)
            os.close(from_worker_w)
        return _Worker(proc, Connection(to_worker_w, readable=False), Connection(from_worker_r, writable=False))


def _site_dirs() -> set[str]:
    import site

    dirs = set(site.getsitepackages()) if hasattr(site, "getsitepackages") else set()
    dirs.add(site.getusersitepackages())
    return {str(Path(d).resolve()) for d in dirs}


def _kill(worker: _Worker) -> None:
    for conn in (worker.inbox, worker.outbox):
        try:
            conn.close()
        except OSError:
            pass
    if worker.proc.poll() is None:
        worker.proc.kill()
    try:
        worker.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _shutdown(workers: list[_Worker], spawner: ThreadPoolExecutor) -> None:
    for worker in workers:
        try:
            worker.inbox.send(None)
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + 1.0
    for worker in workers:
        try:
            worker.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        _kill(worker)
    workers.clear()
    spawner.shutdown(wait=False)


_POOLS: dict[tuple, VerifierPool] = {}
_POOLS_LOCK = threading.Lock()


def get_pool(target: str, num_workers: int | None = None, max_memory_mb: int = 4096) -> VerifierPool:
    """The process-wide pool for these settings, created on first use (a forked child gets its own)."""
    num_workers = check_num_workers(num_workers)
    key = (target, default_num_workers() if num_workers is None else num_workers, check_max_memory_mb(max_memory_mb),
           os.getpid())  # fmt: skip
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None or pool._closed:
            pool = _POOLS[key] = VerifierPool(target, num_workers=key[1], max_memory_mb=max_memory_mb)
        return pool


@atexit.register
def _close_all() -> None:
    for pool in list(_POOLS.values()):
        if pool._pid == os.getpid():
            pool.close()
