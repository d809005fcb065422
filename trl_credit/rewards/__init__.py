"""Reward functions for TRL trainers. Math rewards verify in worker processes with a hard deadline (see `math.py`).

    from trl_credit.rewards import math_reward, gsm8k_reward, format_reward, math_verify_reward
"""

from .math import (
    MathVerifyReward,
    Verdict,
    completion_text,
    format_reward,
    gsm8k_reward,
    math_reward,
    math_verify_reward,
)


__all__ = [
    "MathVerifyReward",
    "Verdict",
    "completion_text",
    "format_reward",
    "gsm8k_reward",
    "math_reward",
    "math_verify_reward",
]
