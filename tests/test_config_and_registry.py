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
    return CreditOutput(advantages=torch.full(batch.completion_ids.shape, branch_td_coef))


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
    assert out.advantages.tolist() == [[0.25] * 3] * 2


def _output_check_batch():
    # N = 4 completions of T = 3 tokens; row 3 has no loss token (a masked truncation), row 2 one padding token.
    loss = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0], [0, 0, 0]])
    return CreditBatch(torch.zeros(4, 3, dtype=torch.long), torch.ones(4, 3), torch.tensor([1.0, 0.0, 1.0, 0.0]), 2,
                       loss_mask=loss)  # fmt: skip


NAN, INF = float("nan"), float("inf")
BAD_OUTPUTS = {
    "fewer_rows": (lambda b: CreditOutput(torch.zeros(3, 3)), r"advantages of shape \(3, 3\), expected \(4, 3\)"),
    "more_tokens": (lambda b: CreditOutput(torch.zeros(4, 8)), r"advantages of shape \(4, 8\), expected \(4, 3\)"),
    "all_nan": (lambda b: CreditOutput(torch.full((4, 3), NAN)), r"8 non-finite advantage\(s\).*\(0, 0\)"),
    "inf_on_a_loss_token": (lambda b: CreditOutput(torch.zeros(4, 3).index_put_((torch.tensor([1]),
                            torch.tensor([2])), torch.tensor(INF))), r"1 non-finite advantage\(s\).*\(1, 2\)"),
    "per_completion_undeclared": (lambda b: CreditOutput(torch.zeros(4)), r"register the estimator with "
                                  r"sequence_level=True"),  # fmt: skip
    "integer_dtype": (lambda b: CreditOutput(torch.zeros(4, 3, dtype=torch.long)), "expected a floating dtype"),
    "not_a_tensor": (lambda b: CreditOutput([[0.0] * 3] * 4), "expected a torch.Tensor of shape"),
    "returns_shape": (lambda b: CreditOutput(torch.zeros(4, 3), returns=torch.zeros(4, 2)), r"returns of shape"),
    "returns_inf": (lambda b: CreditOutput(torch.zeros(4, 3), returns=torch.full((4, 3), -INF)), "infinite value"),
    "returns_integer": (lambda b: CreditOutput(torch.zeros(4, 3), returns=torch.zeros(4, 3, dtype=torch.int32)),
                        "returns of dtype"),  # fmt: skip
    "metric_not_a_number": (lambda b: CreditOutput(torch.zeros(4, 3), metrics={"x": "high"}), "metric 'x'"),
    "not_credit_output": (lambda b: torch.zeros(4, 3), "returned Tensor, not CreditOutput"),
}


@pytest.mark.parametrize("case", sorted(BAD_OUTPUTS))
def test_estimator_outputs_are_checked_naming_the_estimator_and_the_expected_shape(case):
    make, match = BAD_OUTPUTS[case]
    name = f"test_bad_output_{case}"
    try:
        fn = register_advantage_estimator(name)(lambda batch: make(batch))
        with pytest.raises((ValueError, TypeError), match=f"advantage estimator '{name}' .*" + match):
            call_estimator(fn, _output_check_batch())
    finally:
        ADVANTAGE_ESTIMATORS.pop(name, None)


def test_estimator_outputs_that_are_valid_pass_the_check():
    batch = _output_check_batch()
    adv = torch.zeros(4, 3)
    adv[2, 2] = adv[3] = NAN  # outside the loss mask: the trainer zeroes them
    returns = torch.zeros(4, 3)
    returns[1] = NAN  # NaN = no value target
    call_estimator(lambda b: CreditOutput(adv, returns=returns, metrics={"m": torch.tensor(1.0), "n": 2}), batch)
    names = ("test_sequence_level_ok", "test_sequence_level_2d")
    try:
        per_completion = torch.tensor([0.5, -0.5, 0.0, NAN])  # row 3 has no loss token
        ok = register_advantage_estimator(names[0], sequence_level=True)(lambda b: CreditOutput(per_completion))
        call_estimator(ok, batch)
        two_d = register_advantage_estimator(names[1], sequence_level=True)(lambda b: CreditOutput(torch.zeros(4, 3)))
        with pytest.raises(ValueError, match=r"shape \(4, 3\), expected \(4,\): one advantage per completion"):
            call_estimator(two_d, batch)
    finally:
        for name in names:
            ADVANTAGE_ESTIMATORS.pop(name, None)


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
