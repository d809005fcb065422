"""`trl_credit.GRPOConfig`: TRL's `GRPOConfig` plus the credit-assignment fields."""

from __future__ import annotations

from dataclasses import dataclass

from trl import GRPOConfig as _TRLGRPOConfig

from .credit import CreditArguments
from .macro import MacroActionArguments
from .vineppo import VinePPOArguments
from .weighting import TokenWeightingArguments


@dataclass
class GRPOConfig(VinePPOArguments, MacroActionArguments, TokenWeightingArguments, CreditArguments, _TRLGRPOConfig):
    def __post_init__(self):
        super().__post_init__()
        self._validate_credit()
        self._validate_vineppo()
        self._validate_macro_action()
        self._validate_token_weighting()


GRPOConfig.__doc__ = (
    (_TRLGRPOConfig.__doc__ or "").replace("[`GRPOTrainer`]", "[`trl_credit.GRPOTrainer`]").rstrip()
    + "\n\n"
    + "\n".join("    " + line if line.strip() else "" for line in CreditArguments.__doc__.strip("\n").splitlines())
    + "\n\n"
    + "\n".join("    " + line if line.strip() else "" for line in VinePPOArguments.__doc__.strip("\n").splitlines())
    + "\n\n"
    + "\n".join("    " + line if line.strip() else "" for line in MacroActionArguments.__doc__.strip("\n").splitlines())
    + "\n\n"
    + "\n".join(
        "    " + line if line.strip() else "" for line in TokenWeightingArguments.__doc__.strip("\n").splitlines()
    )
    + "\n"
)
