from .credit import CreditArguments
from .grpo import GRPOConfig


__all__ = ["CreditArguments", "GRPOConfig"]
