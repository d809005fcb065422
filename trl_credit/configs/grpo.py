"""`trl_credit.GRPOConfig`: TRL's `GRPOConfig` plus the credit-assignment fields."""

from __future__ import annotations

from dataclasses import dataclass

from trl import GRPOConfig as _TRLGRPOConfig

from .credit import CreditArguments
from .macro import MacroActionArguments
from .spo import SPOArguments
from .vineppo import VinePPOArguments
from .vllm_cpu import VLLMCPUArguments
from .weighting import TokenWeightingArguments


@dataclass
class GRPOConfig(
    SPOArguments,
    VinePPOArguments,
    MacroActionArguments,
    TokenWeightingArguments,
    CreditArguments,
    VLLMCPUArguments,
    _TRLGRPOConfig,
):
    def __post_init__(self):
        self._resolve_vllm_cpu()  # before TRL's checks, which read vllm_importance_sampling_correction
        super().__post_init__()
        self._validate_credit()
        self._validate_vineppo()
        self._validate_macro_action()
        self._validate_token_weighting()
        self._validate_spo()


GRPOConfig.__doc__ = (
    (_TRLGRPOConfig.__doc__ or "")
    .replace("[`GRPOTrainer`]", "[`trl_credit.GRPOTrainer`]")
    .replace(
        "vllm_importance_sampling_correction (`bool`, *optional*, defaults to `True`):",
        "vllm_importance_sampling_correction (`bool` or `None`, *optional*, defaults to `None`, i.e. `True` except "
        "with vLLM's CPU build; see below):",
    )
    .rstrip()
    + "\n\n"
    + "\n".join("    " + line if line.strip() else "" for line in CreditArguments.__doc__.strip("\n").splitlines())
    + "\n\n"
    + "\n".join("    " + line if line.strip() else "" for line in VinePPOArguments.__doc__.strip("\n").splitlines())
    + "\n\n"
    + "\n".join("    " + line if line.strip() else "" for line in SPOArguments.__doc__.strip("\n").splitlines())
    + "\n\n"
    + "\n".join("    " + line if line.strip() else "" for line in MacroActionArguments.__doc__.strip("\n").splitlines())
    + "\n\n"
    + "\n".join(
        "    " + line if line.strip() else "" for line in TokenWeightingArguments.__doc__.strip("\n").splitlines()
    )
    + "\n\n"
    + "\n".join("    " + line if line.strip() else "" for line in VLLMCPUArguments.__doc__.strip("\n").splitlines())
    + "\n"
)
