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
import os
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any


# Items sent ahead to a busy worker: hides the pipe round trip without starving the other workers.
_PREFETCH = 2


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
    __slots__ = ("proc", "inbox", "outbox", "ready", "inflight", "head_start", "last_key")

    def __init__(self, proc: subprocess.Popen, inbox: Connection, outbox: Connection):
        self.proc = proc
        self.inbox = inbox  # parent -> worker
        self.outbox = outbox  # worker -> parent
        self.ready = False
        self.inflight: deque[tuple[int, int]] = deque()  # (task_id, item index), in the worker's processing order
        self.head_start = 0.0  # when the worker started the first in-flight item
        self.last_key: Hashable = None  # key of the last item sent (its caches are warm for it)


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
        if num_workers is not None and num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}.")
        self.target = target
        self.num_workers = num_workers or default_num_workers()
        self.max_memory_mb = max_memory_mb
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
        self, args_list: Sequence[tuple], timeout: float, keys: Sequence[Hashable] | None = None
    ) -> list[tuple[str, Any]]:
        """
        Run `target(*args)` for every `args` of `args_list`, at most `timeout` seconds each (wall clock, from the moment
        a worker starts the item). Returns one `(status, value)` per item, in order: `("ok", result)`,
        `("timeout", None)` or `("error", message)`.

        `keys` (one per item, optional) groups items that share work a worker caches, e.g. the gold answer of a GRPO
        group: a worker is given items of the key it last had, and idle workers take keys no other worker is on.
        """
        if keys is not None and len(keys) != len(args_list):
            raise ValueError(f"{len(keys)} keys for {len(args_list)} items.")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}.")
        if os.getpid() != self._pid:
            raise RuntimeError("This VerifierPool belongs to the parent process; create a new one after fork().")
        if self._closed:
            raise RuntimeError("This VerifierPool is closed.")
        if not args_list:
            return []
        with self._lock:
            try:
                return self._map(list(args_list), timeout, list(keys) if keys is not None else [None] * len(args_list))
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
    def _map(self, args_list: list[tuple], timeout: float, keys: list) -> list[tuple[str, Any]]:
        results: list[tuple[str, Any] | None] = [None] * len(args_list)
        pending = _Pending(keys)
        remaining = len(args_list)
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
        return results  # type: ignore[return-value]

    def _fail(self, worker: _Worker, results, pending: _Pending, status: str, value) -> int:
        """Score the worker's current item as `status`, requeue the rest of its items, replace it; returns the number
        of items scored (0 for an idle worker)."""
        if not worker.ready:
            self._startup_failures += 1
            if self._startup_failures >= 3:
                code = worker.proc.wait()
                raise RuntimeError(
                    f"Verification workers exit during start-up (exit code {code}; their traceback is on stderr). "
                    f"Check that `{sys.executable} -m trl_credit.rewards._worker` can import trl_credit and "
                    "math-verify."
                )
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

    def _fill(self) -> None:
        for worker in list(self._workers):
            if worker.proc.poll() is not None and not worker.inflight:
                self._replace(worker)
        while len(self._workers) < self.num_workers:
            self._workers.append(self._spawner.submit(self._start_worker).result())

    def _replace(self, worker: _Worker) -> None:
        self._workers.remove(worker)
        _kill(worker)
        self.stats["restarts"] += 1
        if not self._closed:
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
    key = (target, num_workers or default_num_workers(), max_memory_mb, os.getpid())
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
