from .credit import CreditArguments
from .grpo import GRPOConfig
from .weighting import TokenWeightingArguments


__all__ = ["CreditArguments", "GRPOConfig", "TokenWeightingArguments"]
