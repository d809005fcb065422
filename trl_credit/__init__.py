"""trl-credit: token-level credit assignment for RL with verifiable rewards, as drop-in TRL trainers.

    from trl_credit import GRPOTrainer, GRPOConfig      # instead of: from trl import GRPOTrainer, GRPOConfig

Trainers and configs are imported lazily so that `trl_credit.credit` (pure torch math) stays importable without
loading TRL.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING


__version__ = "0.1.0.dev0"

_LAZY = {
    "GRPOConfig": "trl_credit.configs",
    "GRPOTrainer": "trl_credit.trainers.grpo",
    "PPOConfig": "trl_credit.configs",
    "PPOTrainer": "trl_credit.trainers.ppo",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'trl_credit' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .configs import GRPOConfig, PPOConfig
    from .trainers.ppo import PPOTrainer
    from .trainers.grpo import GRPOTrainer
