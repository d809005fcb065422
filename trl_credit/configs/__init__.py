from .credit import CreditArguments
from .grpo import GRPOConfig
from .macro import MacroActionArguments
from .ppo import PPOConfig
from .spo import SPOArguments
from .vineppo import VinePPOArguments
from .weighting import TokenWeightingArguments


__all__ = [
    "CreditArguments",
    "GRPOConfig",
    "MacroActionArguments",
    "PPOConfig",
    "SPOArguments",
    "TokenWeightingArguments",
    "VinePPOArguments",
]
