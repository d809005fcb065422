"""Config validation at construction, the estimator registry, and the import-time TRL compatibility guard."""

import pytest
import torch
import trl

from trl_credit import GRPOConfig, GRPOTrainer
from trl_credit._compat import IncompatibleTRLError, check_trl_compatibility
from trl_credit.credit import (
    ADVANTAGE_ESTIMATORS,
    CreditBatch,
    CreditOutput,
    call_estimator,
    get_advantage_estimator,
    register_advantage_estimator,
)


def cfg(**kw):
    return GRPOConfig(output_dir="/tmp/trl_credit_cfg", use_cpu=True, bf16=False, report_to="none", **kw)


# ── config validation ──────────────────────────────────────────────────────────────────────────────────────────────
def test_unknown_estimator_is_rejected_naming_the_registered_ones():
    with pytest.raises(ValueError, match=r"Unknown advantage_estimator 'tempoo'.*'gigpo'.*'grpo'.*'tempo'"):
        cfg(advantage_estimator="tempoo")


def test_sequence_level_importance_sampling_is_rejected_with_token_level_credit():
    with pytest.raises(ValueError, match="importance_sampling_level='token'"):
        cfg(advantage_estimator="tempo", importance_sampling_level="sequence")
    cfg(advantage_estimator="grpo", importance_sampling_level="sequence")  # GSPO with GRPO advantages is fine


def test_liger_loss_is_rejected_with_token_level_credit():
    with pytest.raises(ValueError, match="use_liger_kernel=False"):
        cfg(advantage_estimator="gigpo", use_liger_kernel=True)


def test_tree_estimators_need_sum_then_normalize():
    with pytest.raises(ValueError, match="sum_then_normalize"):
        cfg(advantage_estimator="tempo", multi_objective_aggregation="normalize_then_sum")


def test_ungated_gigpo_is_rejected_with_per_sequence_loss_normalization():
    for loss_type in ("grpo", "sapo"):
        with pytest.raises(ValueError, match="length-correlated bias"):
            cfg(advantage_estimator="gigpo", gigpo_branch_only=False, loss_type=loss_type)
    cfg(advantage_estimator="gigpo", gigpo_branch_only=False, loss_type="dapo")
    cfg(advantage_estimator="gigpo", loss_type="grpo")  # the gated default is safe with every loss


def test_critic_estimators_need_the_ppo_config():
    with pytest.raises(ValueError, match="use trl_credit.PPOConfig with trl_credit.PPOTrainer"):
        cfg(advantage_estimator="gae")


def test_non_finite_coefficients_are_rejected():
    with pytest.raises(ValueError, match="branch_td_coef must be a finite number"):
        cfg(advantage_estimator="tempo", branch_td_coef=float("nan"))


def test_trainer_rejects_a_plain_trl_config_with_the_fix(tiny_model_dir):
    args = trl.GRPOConfig(output_dir="/tmp/trl_credit_cfg", use_cpu=True, bf16=False, report_to="none")
    with pytest.raises(TypeError, match="from trl_credit import GRPOConfig"):
        GRPOTrainer(model=tiny_model_dir, reward_funcs=lambda completions, **k: [0.0] * len(completions), args=args)


def test_config_fields_have_help_and_docstring_entries():
    import dataclasses

    from trl_credit.configs import CreditArguments

    for f in dataclasses.fields(CreditArguments):
        assert f.metadata.get("help"), f.name
        assert f"{f.name} (`" in GRPOConfig.__doc__, f.name


def test_yaml_style_parsing_through_hf_argument_parser():
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(GRPOConfig).parse_args_into_dataclasses(
        ["--output_dir", "/tmp/x", "--use_cpu", "--bf16", "false", "--advantage_estimator", "gigpo",
         "--gigpo_step_weight", "0.5", "--gigpo_branch_only", "false"]
    )  # fmt: skip
    assert (args.advantage_estimator, args.gigpo_step_weight, args.gigpo_branch_only) == ("gigpo", 0.5, False)


# ── registry ──────────────────────────────────────────────────────────────────────────────────────────────────────
def _constant(batch, *, scale_rewards="group", branch_td_coef=1.0):
    return CreditOutput(advantages=torch.full_like(batch.rewards, branch_td_coef))


def test_registry_duplicate_name_raises_and_same_function_is_allowed():
    name = "test_constant_estimator"
    try:
        register_advantage_estimator(name)(_constant)
        register_advantage_estimator(name)(_constant)  # same function again: fine
        with pytest.raises(ValueError, match="already registered"):
            register_advantage_estimator(name)(lambda batch: CreditOutput(advantages=batch.rewards))
        assert get_advantage_estimator(name) is _constant
    finally:
        ADVANTAGE_ESTIMATORS.pop(name, None)


def test_registry_resolves_dotted_paths_and_rejects_unknown_requirements():
    fn = get_advantage_estimator("test_config_and_registry._constant")
    assert fn is _constant and fn.credit_requires == frozenset()
    with pytest.raises(ValueError, match="Could not import"):
        get_advantage_estimator("no_such_module.fn")
    with pytest.raises(ValueError, match="Unknown requirement"):
        register_advantage_estimator("x", requires=("telepathy",))


def test_estimator_hyper_parameters_come_from_config_fields_of_the_same_name():
    batch = CreditBatch(
        completion_ids=torch.zeros(2, 3, dtype=torch.long),
        completion_mask=torch.ones(2, 3),
        rewards=torch.tensor([1.0, 0.0]),
        num_generations=2,
    )
    out = call_estimator(_constant, batch, cfg(advantage_estimator="tempo", branch_td_coef=0.25))
    assert out.advantages.tolist() == [0.25, 0.25]


def test_credit_batch_rejects_inconsistent_shapes_with_a_clear_message():
    with pytest.raises(ValueError, match=r"rewards has shape \(3,\), expected \(2,\)"):
        CreditBatch(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), torch.zeros(3), 2)
    with pytest.raises(ValueError, match="not made of whole groups"):
        CreditBatch(torch.zeros(3, 3, dtype=torch.long), torch.ones(3, 3), torch.zeros(3), 2)


# ── compatibility guard ───────────────────────────────────────────────────────────────────────────────────────────
def test_guard_rejects_trl_outside_the_supported_range():
    with pytest.raises(IncompatibleTRLError, match=r"trl>=1.16.0,<1.17.0.*trl==1.17.0"):
        check_trl_compatibility("1.17.0")
    with pytest.raises(IncompatibleTRLError, match="trl==1.15.2"):
        check_trl_compatibility("1.15.2")
    check_trl_compatibility("1.16.0")
    check_trl_compatibility("1.16.3.dev0")


def test_guard_detects_moved_seams():
    class Missing(trl.GRPOTrainer):
        _calculate_rewards = None

    class Renamed(trl.GRPOTrainer):
        def _generate_single_turn(self, prompts, images, multimodal_fields, num_generations):
            pass

    class NoTokenLevelLoss(trl.GRPOTrainer):
        def _compute_loss(self, model, inputs):
            return inputs["advantages"].unsqueeze(1)

    with pytest.raises(IncompatibleTRLError, match="_calculate_rewards no longer exists"):
        check_trl_compatibility("1.16.0", Missing)
    with pytest.raises(IncompatibleTRLError, match="_generate_single_turn changed its signature"):
        check_trl_compatibility("1.16.0", Renamed)
    with pytest.raises(IncompatibleTRLError, match=r"per-token \(B, T\) advantages"):
        check_trl_compatibility("1.16.0", NoTokenLevelLoss)


def test_installed_trl_passes_the_guard():
    check_trl_compatibility()
