"""No non-finite number reaches a loss: ±inf rewards are unscorable (one rule, every estimator), and estimator outputs
are validated before anything uses them."""

import math

import pytest
import torch

from trl_credit import GRPOConfig, GRPOTrainer, PPOConfig, PPOTrainer
from trl_credit.credit import CreditBatch
from trl_credit.credit.batch import nonfinite_rewards_to_nan
from trl_credit.testing import CPU_TEST_ARGS, record_batches, shaped_math_reward, tiny_math_dataset


INF = float("inf")


# ── the rule ───────────────────────────────────────────────────────────────────────────────────────────────────────
def test_infinite_rewards_become_nan_and_are_counted():
    rewards = torch.tensor([[1.0, INF], [-INF, float("nan")], [2.0, 0.0]])
    out, replaced = nonfinite_rewards_to_nan(rewards)
    assert replaced == 2
    torch.testing.assert_close(out, torch.tensor([[1.0, math.nan], [math.nan, math.nan], [2.0, 0.0]]), equal_nan=True)
    finite = torch.tensor([[1.0, 2.0], [float("nan"), 0.5]])
    assert nonfinite_rewards_to_nan(finite, torch.ones(2)) == (finite, 0)  # the same tensor: TRL parity is untouched


def test_a_weighted_reward_that_overflows_makes_the_completion_unscorable():
    rewards = torch.tensor([[3e38, 3e38], [1.0, 2.0]])
    out, replaced = nonfinite_rewards_to_nan(rewards, torch.tensor([1.0, 1.0]))
    assert replaced == 2 and torch.isnan(out[0]).all() and torch.equal(out[1], rewards[1])


def test_credit_batch_refuses_infinite_rewards_naming_the_rule():
    with pytest.raises(ValueError, match="rewards holds 1 infinite.*nonfinite_rewards_to_nan"):
        CreditBatch(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), torch.tensor([1.0, -INF]), 2)
    with pytest.raises(ValueError, match="rewards_per_func holds 1 infinite"):
        CreditBatch(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), torch.tensor([1.0, 0.0]), 2,
                    rewards_per_func=torch.tensor([[1.0], [INF]]))  # fmt: skip


def test_missing_eos_penalty_must_be_finite(tmp_path):
    for bad in (INF, -INF, float("nan")):
        with pytest.raises(ValueError, match="missing_eos_penalty must be a finite number"):
            PPOConfig(output_dir=str(tmp_path), missing_eos_penalty=bad, use_cpu=True, bf16=False, report_to="none")


@pytest.mark.parametrize("weight", [INF, float("nan")])
def test_non_finite_reward_weights_are_refused_at_construction(tiny_model_dir, tmp_path, weight):
    args = GRPOConfig(output_dir=str(tmp_path), reward_weights=[weight], num_generations=4,
                      per_device_train_batch_size=4, **CPU_TEST_ARGS)  # fmt: skip
    with pytest.raises(ValueError, match="reward_weights must be finite numbers"):
        GRPOTrainer(model=tiny_model_dir, reward_funcs=shaped_math_reward, args=args,
                    train_dataset=tiny_math_dataset(8))  # fmt: skip


# ── every estimator, end to end ────────────────────────────────────────────────────────────────────────────────────
def infinite_reward(completions, **kwargs):
    """The shaped reward, with +inf on row 1 and −inf on row 6 of every eight."""
    base = shaped_math_reward(completions, **kwargs)
    return [INF if i % 8 == 1 else -INF if i % 8 == 6 else r for i, r in enumerate(base)]


def abstaining_reward(completions, **kwargs):
    """The same rows return None instead (unscorable, as TRL defines it)."""
    base = shaped_math_reward(completions, **kwargs)
    return [None if i % 8 in (1, 6) else r for i, r in enumerate(base)]


# Every registered estimator. Before the rule, PPO's critic path turned every policy and critic weight into NaN while
# logging a loss of 0 (`nan_to_num` made ±inf ±3.4e38); with whitening, and for the group estimators, the whole batch
# silently lost its signal (all-zero advantages).
ESTIMATORS = {
    "grpo": ("grpo", GRPOTrainer, GRPOConfig, {}),
    "tempo": ("tempo", GRPOTrainer, GRPOConfig, {}),
    "gigpo": ("gigpo", GRPOTrainer, GRPOConfig, {}),
    "macro_tempo": ("macro_tempo", GRPOTrainer, GRPOConfig, {"macro_action": "ngram", "macro_action_n": 2}),
    "vineppo": ("vineppo", GRPOTrainer, GRPOConfig, {"vine_num_rollouts": 2, "step_split": "token_chunks",
                                                     "vine_chunk_tokens": 3}),  # fmt: skip
    "gae": ("gae", PPOTrainer, PPOConfig, {}),
    "gae_whitened": ("gae", PPOTrainer, PPOConfig, {"whiten_rewards": True, "whiten_advantages": True}),
}


def train(model_dir, case, reward, tmp_path):
    estimator, trainer_cls, config_cls, extra = ESTIMATORS[case]
    args = config_cls(
        output_dir=str(tmp_path), advantage_estimator=estimator, max_steps=2, per_device_train_batch_size=8,
        num_generations=4, max_completion_length=6, learning_rate=1e-2, seed=5, **CPU_TEST_ARGS, **extra,
    )  # fmt: skip
    trainer = trainer_cls(model=model_dir, reward_funcs=reward, args=args, train_dataset=tiny_math_dataset(16))
    seen = record_batches(trainer)
    trainer.train()
    return trainer, seen


def parameters(trainer):
    params = {f"policy.{n}": p.detach().clone() for n, p in trainer.model.named_parameters()}
    if getattr(trainer, "value_model", None) is not None:
        params.update({f"critic.{n}": p.detach().clone() for n, p in trainer.value_model.named_parameters()})
    return params


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(ESTIMATORS))
def test_infinite_rewards_train_exactly_like_unscorable_ones(tiny_model_dir, tmp_path, case):
    trainer, seen = train(tiny_model_dir, case, infinite_reward, tmp_path / "inf")
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert [h["credit/nonfinite_rewards"] for h in logs] == [2.0, 2.0]  # one +inf and one −inf per batch of eight
    params = parameters(trainer)
    assert all(torch.isfinite(p).all() for p in params.values()), "a weight became non-finite"
    for out in seen:
        assert torch.isfinite(out["advantages"]).all()
        rows = out["advantages"] if out["advantages"].dim() == 1 else out["advantages"].abs().sum(1)
        assert rows[1] == 0 and rows[6] == 0  # the ±inf completions carry no signal
        if "returns" in out:  # the critic gets no value target from them, and finite targets elsewhere
            assert torch.isnan(out["returns"][[1, 6]]).all()
            assert not torch.isinf(out["returns"]).any()
    assert not any(math.isinf(r) for r in trainer._logs["rewards"]["infinite_reward"])  # TRL's completions table
    if case.startswith("gae"):
        assert all(math.isfinite(h["value/loss"]) for h in logs)

    # The same completions with None in place of ±inf train to the same weights, bit for bit.
    reference, _ = train(tiny_model_dir, case, abstaining_reward, tmp_path / "none")
    ref_params = parameters(reference)
    assert [h["loss"] for h in reference.state.log_history if "loss" in h] == [h["loss"] for h in logs]
    assert all(torch.equal(params[n], ref_params[n]) for n in params)


@pytest.mark.slow
def test_trl_advantage_path_gets_no_infinite_reward_in_evaluation(tiny_model_dir, tmp_path):
    # Evaluation batches keep TRL's own advantage; with scale_rewards="none", TRL alone turns ±inf into ±3.4e38
    # advantages (nan_to_num) and a non-finite eval loss.
    args = GRPOConfig(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8, per_device_eval_batch_size=8,
        num_generations=4, max_completion_length=6, scale_rewards="none", seed=5, **CPU_TEST_ARGS,
    )  # fmt: skip
    trainer = GRPOTrainer(model=tiny_model_dir, reward_funcs=infinite_reward, args=args,
                          train_dataset=tiny_math_dataset(8), eval_dataset=tiny_math_dataset(8))  # fmt: skip
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and abs(metrics["eval_loss"]) < 1e3
    assert metrics["eval_credit/nonfinite_rewards"] == 2.0
