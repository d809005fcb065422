"""Fail loudly at import when the installed TRL is not one whose private seams trl_credit was tested against.

trl_credit overrides private `GRPOTrainer` methods (TRL declined a public advantage hook, huggingface/trl#7291, #7298),
so a TRL release that moved them would otherwise train silently wrong. Set `TRL_CREDIT_SKIP_COMPAT_CHECK=1` to try
an untested TRL at your own risk.
"""

from __future__ import annotations

import inspect
import os

from packaging.version import Version


TRL_MIN, TRL_MAX_EXCLUSIVE = Version("1.16.0"), Version("1.17.0")
SUPPORTED_RANGE = f">={TRL_MIN},<{TRL_MAX_EXCLUSIVE}"

# method -> the parameters (after self) trl_credit calls it with
SEAMS = {
    "_calculate_rewards": ("inputs", "prompts", "completions", "completion_ids_list"),
    "_generate_and_score_completions": ("inputs",),
    "_generate_single_turn": ("prompt_ids", "images", "multimodal_fields", "num_generations"),
    "_compute_loss": ("model", "inputs"),
}
# `_compute_loss` must still broadcast (B, T) advantages instead of assuming (B,) (grpo_trainer.py:3055-3059 in 1.16.0).
LOSS_MARKER = "advantages.dim() == 1"


class IncompatibleTRLError(ImportError):
    pass


def check_trl_compatibility(trl_version: str | None = None, trainer_cls=None) -> None:
    """Raise `IncompatibleTRLError` naming the problem and the fix if TRL's version or seams are not the tested ones."""
    if os.environ.get("TRL_CREDIT_SKIP_COMPAT_CHECK") == "1":
        return
    fix = f"Install a supported TRL with `pip install 'trl{SUPPORTED_RANGE}'`."
    if trl_version is None:
        import trl

        trl_version = trl.__version__
    v = Version(trl_version)
    if not (TRL_MIN <= Version(v.base_version) < TRL_MAX_EXCLUSIVE):
        raise IncompatibleTRLError(
            f"trl_credit supports trl{SUPPORTED_RANGE} (it overrides private GRPOTrainer methods), but trl=={v} is "
            f"installed. {fix} (or set TRL_CREDIT_SKIP_COMPAT_CHECK=1 to try anyway)."
        )
    if trainer_cls is None:
        from trl import GRPOTrainer as trainer_cls
    for name, params in SEAMS.items():
        method = getattr(trainer_cls, name, None)
        if method is None:
            raise IncompatibleTRLError(
                f"trl.GRPOTrainer.{name} no longer exists in trl=={v}; trl_credit needs it. {fix}"
            )
        got = tuple(inspect.signature(method).parameters)[1 : 1 + len(params)]
        if got != params:
            raise IncompatibleTRLError(
                f"trl.GRPOTrainer.{name} changed its signature in trl=={v}: expected parameters {params}, found {got}. "
                f"{fix}"
            )
    if LOSS_MARKER not in inspect.getsource(trainer_cls._compute_loss):
        raise IncompatibleTRLError(
            f"trl.GRPOTrainer._compute_loss in trl=={v} no longer accepts per-token (B, T) advantages "
            f"(missing `{LOSS_MARKER}`). {fix}"
        )
