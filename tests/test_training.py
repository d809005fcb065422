"""Short training runs on the tiny local model: each estimator with LoRA, num_iterations=2, beta>0, and bad inputs."""

import math

import pytest
import torch
from peft import LoraConfig

from trl_credit import GRPOConfig, GRPOTrainer
from trl_credit.credit import ADVANTAGE_ESTIMATORS, CreditOutput, register_advantage_estimator
from trl_credit.testing import CPU_TEST_ARGS, record_batches, shaped_math_reward, tiny_math_dataset


pytestmark = pytest.mark.slow


def make_args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=10,
        learning_rate=1e-2,
        **CPU_TEST_ARGS,
        seed=3,
    )
    base.update(kw)
    return GRPOConfig(**base)


def run(model_dir, tmp_path, reward_funcs=shaped_math_reward, dataset=None, peft_config=None, **kw):
    trainer = GRPOTrainer(
        model=model_dir,
        reward_funcs=reward_funcs,
        args=make_args(tmp_path, **kw),
        train_dataset=dataset if dataset is not None else tiny_math_dataset(32),
        peft_config=peft_config,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    batches = record_batches(trainer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(math.isfinite(h["loss"]) for h in logs)
    for batch in batches:
        assert torch.isfinite(batch["advantages"]).all()
    moved = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    return trainer, logs, batches, moved


@pytest.mark.parametrize("estimator", ["tempo", "gigpo"])
@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"num_iterations": 2},
        {"beta": 0.1},
        {"peft": True, "beta": 0.1},
    ],
    ids=["plain", "num_iterations2", "beta", "lora_beta"],
)
def test_token_level_estimators_train(tiny_model_dir, tmp_path, estimator, variant):
    variant = dict(variant)
    peft = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if variant.pop("peft", False) else None
    trainer, logs, batches, moved = run(
        tiny_model_dir, tmp_path, advantage_estimator=estimator, peft_config=peft, **variant
    )
    assert moved, "no trainable parameter changed"
    if peft is not None:
        assert all("lora_" in n for n in moved)
    adv = batches[0]["advantages"]
    assert adv.dim() == 2  # per-token advantages reached the loss
    mask = batches[0]["completion_mask"]
    assert torch.count_nonzero(adv[mask == 0]) == 0
    assert any(h["credit/extra_credit_token_frac"] > 0 for h in logs)
    if "beta" in variant:
        assert all("kl" in h for h in logs)
    # the completions table keeps one number per completion
    assert all(isinstance(a, float) for a in trainer._logs["advantages"])


def abstaining_reward(completions, **kwargs):
    """None for half of the completions (unscorable rows), NaN for a quarter."""
    out = []
    for i, _ in enumerate(completions):
        out.append(None if i % 2 == 0 else (float("nan") if i % 4 == 1 else 1.0 + i % 3))
    return out


@pytest.mark.parametrize("estimator", ["grpo", "tempo", "gigpo"])
def test_none_and_nan_rewards_never_reach_the_loss_as_nan(tiny_model_dir, tmp_path, estimator):
    _, _, batches, _ = run(tiny_model_dir, tmp_path, reward_funcs=abstaining_reward, advantage_estimator=estimator)
    adv = batches[0]["advantages"]
    rows = adv if adv.dim() == 1 else adv.abs().sum(1)
    assert torch.count_nonzero(rows[0::2]) == 0  # unscorable completions carry no signal


@pytest.mark.parametrize("estimator", ["tempo", "gigpo"])
def test_completions_cut_at_max_length_and_masked_truncations(tiny_model_dir, tmp_path, estimator):
    # every completion hits the length limit; mask_truncated_completions turns them into empty rows
    run(tiny_model_dir, tmp_path, advantage_estimator=estimator, max_completion_length=3)
    _, logs, batches, _ = run(
        tiny_model_dir, tmp_path, advantage_estimator=estimator, max_completion_length=3,
        mask_truncated_completions=True,
    )
    batch = batches[0]
    assert torch.count_nonzero(batch["advantages"][batch["completion_mask"] == 0]) == 0


@pytest.mark.parametrize("estimator", ["tempo", "gigpo"])
def test_group_of_identical_completions_gives_zero_advantages(tiny_model_dir, tmp_path, estimator):
    # a near-greedy temperature makes every completion of a prompt identical, so rewards and tree values agree
    _, logs, batches, _ = run(
        tiny_model_dir, tmp_path, advantage_estimator=estimator, temperature=1e-4, per_device_train_batch_size=4
    )
    ids = batches[0]["completion_ids"]
    assert all(torch.equal(ids[0], ids[i]) for i in range(4))
    assert torch.count_nonzero(batches[0]["advantages"]) == 0


BROKEN_OUTPUTS = {
    # The three cases of the issue: before the check they failed later with a shape error, were silently zeroed, or
    # were silently cropped to T.
    "one_row_short": (lambda b: torch.zeros(b.completion_ids.size(0) - 1, b.completion_ids.size(1)), "shape"),
    "all_nan": (lambda b: torch.full(b.completion_ids.shape, float("nan")), "non-finite advantage"),
    "five_tokens_too_many": (lambda b: torch.zeros(b.completion_ids.size(0), b.completion_ids.size(1) + 5), "shape"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_OUTPUTS))
def test_a_broken_estimator_output_stops_training_naming_the_estimator(tiny_model_dir, tmp_path, case):
    make, match = BROKEN_OUTPUTS[case]
    name = f"test_broken_estimator_{case}"
    register_advantage_estimator(name)(lambda batch: CreditOutput(advantages=make(batch)))
    try:
        with pytest.raises(ValueError, match=f"advantage estimator '{name}' returned .*{match}"):
            run(tiny_model_dir, tmp_path, advantage_estimator=name)
    finally:
        ADVANTAGE_ESTIMATORS.pop(name)


def test_custom_estimator_by_dotted_path_trains(tiny_model_dir, tmp_path):
    _, logs, batches, moved = run(tiny_model_dir, tmp_path, advantage_estimator="test_training.position_weighted")
    adv = batches[0]["advantages"]
    assert adv.dim() == 2 and moved


def position_weighted(batch, *, scale_rewards="group"):
    """A user estimator: GRPO advantages that decay along the completion."""
    from trl_credit.credit import compute_grpo_advantages

    base = compute_grpo_advantages(batch.rewards, batch.num_generations, scale_rewards)
    decay = 0.9 ** torch.arange(batch.completion_ids.size(1), dtype=torch.float32)
    return CreditOutput(advantages=base[:, None] * decay * batch.mask)
