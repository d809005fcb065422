"""`mask_truncated_completions=True`: TRL's zeroed mask is only the loss mask; the structure every estimator derives
(prefix trees, segments, the last token of a completion) comes from the real generated lengths."""

import pytest
import torch
from datasets import Dataset

from trl_credit import GRPOConfig, GRPOTrainer, PPOConfig, PPOTrainer
from trl_credit.credit import CreditBatch, call_estimator, get_advantage_estimator, ngram_segments
from trl_credit.testing import CPU_TEST_ARGS, record_batches


GRPO_TOKEN_0 = [0.8659, 0.8659, -0.8659, 0.0]  # rewards [1, 1, 0, 0]: (r − 0.5) / (0.5774 + 1e-4), row 3 masked


def four_completions(eos):
    """All start with tokens 7, 7; rows 0-2 end with EOS, row 3 is cut at max_completion_length=5 (truncated)."""
    return [[7, 7, 8, eos], [7, 7, 8, eos], [7, 7, 9, eos], [7, 7, 9, 10, 11]]


def fixed_rollout(prompts, trainer):
    completions = four_completions(trainer.eos_token_ids[0]) * (len(prompts) // 4)
    return {"prompt_ids": [[5, 6]] * len(prompts), "completion_ids": completions,
            "logprobs": [[0.0] * len(c) for c in completions]}  # fmt: skip


def half_correct(completions, **kwargs):
    return [1.0 if i % 4 < 2 else 0.0 for i in range(len(completions))]


def first_batch(model_dir, tmp_path, trainer_cls=GRPOTrainer, config_cls=GRPOConfig, **kw):
    args = config_cls(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, num_generations=4,
        max_completion_length=5, mask_truncated_completions=True, **CPU_TEST_ARGS, **kw,
    )  # fmt: skip
    trainer = trainer_cls(model=model_dir, reward_funcs=half_correct, args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["a"] * 4}), rollout_func=fixed_rollout)
    seen = record_batches(trainer)
    trainer.train()
    return trainer, seen[0]


def expected_advantages(trainer, estimator, ids, generated, trl_mask):
    """The estimator on the real tree: generated lengths as `completion_mask`, TRL's mask as `loss_mask`."""
    fields = dict(completion_ids=ids, completion_mask=generated, loss_mask=trl_mask,
                  rewards=torch.tensor([1.0, 1.0, 0.0, 0.0]), num_generations=4)  # fmt: skip
    if estimator == "macro_tempo":
        fields["segment_ids"] = ngram_segments(generated, 2, last_singleton=trainer.args.macro_action_last_singleton)
    return call_estimator(get_advantage_estimator(estimator), CreditBatch(**fields), trainer.args).advantages


@pytest.mark.slow
@pytest.mark.parametrize(
    "estimator, extra",
    [("tempo", {}), ("gigpo", {}), ("macro_tempo", {"macro_action": "ngram", "macro_action_n": 2})],
)
def test_a_masked_truncated_row_stays_in_the_tree(tiny_model_dir, tmp_path, estimator, extra):
    trainer, out = first_batch(tiny_model_dir, tmp_path, advantage_estimator=estimator, **extra)
    trl_mask = out["completion_mask"]
    assert trl_mask[3].sum() == 0  # TRL masked the truncated row out of the loss
    adv = out["advantages"]
    assert torch.count_nonzero(adv[3]) == 0
    ids = torch.tensor([c + [0] * (5 - len(c)) for c in four_completions(trainer.eos_token_ids[0])])
    generated = (torch.arange(5)[None, :] < torch.tensor([4, 4, 4, 5])[:, None]).long()
    torch.testing.assert_close(adv, expected_advantages(trainer, estimator, ids, generated, trl_mask))
    # Before: the tree was built from TRL's zeroed mask, where row 3 belongs to no node below the root.
    assert not torch.allclose(adv, expected_advantages(trainer, estimator, ids, trl_mask, trl_mask))
    # The first tokens (the first 2-gram macro) are shared by the whole group: no branch, GRPO's advantage.
    torch.testing.assert_close(adv[:, 0], torch.tensor(GRPO_TOKEN_0), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_grpo_keeps_a_masked_truncated_row_in_the_baseline_with_zero_advantage(tiny_model_dir, tmp_path):
    _, out = first_batch(tiny_model_dir, tmp_path, advantage_estimator="grpo")
    torch.testing.assert_close(out["advantages"], torch.tensor(GRPO_TOKEN_0), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_ppo_leaves_a_masked_truncated_row_out_like_padding(tiny_model_dir, tmp_path):
    _, out = first_batch(tiny_model_dir, tmp_path, PPOTrainer, PPOConfig, whiten_advantages=True)
    assert torch.count_nonzero(out["advantages"][3]) == 0 and torch.isfinite(out["advantages"]).all()
    assert torch.isfinite(out["returns"]).all()


def test_credit_batch_masks_come_from_generated_lengths(tiny_model_dir, tmp_path):
    args = GRPOConfig(output_dir=str(tmp_path), advantage_estimator="tempo", num_generations=4,
                      per_device_train_batch_size=4, mask_truncated_completions=True, **CPU_TEST_ARGS)  # fmt: skip
    trainer = GRPOTrainer(model=tiny_model_dir, reward_funcs=half_correct, args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["a"] * 4}))  # fmt: skip
    eos, pad = trainer.eos_token_ids[0], trainer._tokenizer.pad_token_id
    completions = four_completions(eos)
    out = {
        "completion_ids": torch.tensor([c + [pad] * (5 - len(c)) for c in completions]),
        "completion_mask": torch.tensor([[1, 1, 1, 1, 0]] * 3 + [[0] * 5]),  # what TRL hands over
    }
    ctx = {"completion_ids_list": completions, "rewards_per_func": torch.tensor([[1.0], [1.0], [0.0], [0.0]])}
    fields = trainer._credit_batch_fields(out, ctx)
    assert fields["completion_mask"].tolist() == [[1, 1, 1, 1, 0]] * 3 + [[1] * 5]
    assert torch.equal(fields["loss_mask"], out["completion_mask"])
    with pytest.raises(RuntimeError, match="do not fit"):
        trainer._credit_batch_fields(out, {**ctx, "completion_ids_list": completions[:3]})


def test_gae_leaves_rows_outside_the_loss_out_like_padding():
    # The same batch, with the truncated row given as real tokens outside the loss (now) or as padding (before):
    # identical advantages and value targets, whitening included.
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 9, (4, 5), generator=g)
    lengths = torch.tensor([3, 5, 4, 5])
    real = (torch.arange(5)[None, :] < lengths[:, None]).float()
    loss = real.clone()
    loss[3] = 0
    common = dict(completion_ids=ids, rewards=torch.tensor([1.0, 0.0, 1.0, 0.0]), num_generations=4,
                  values=torch.rand(4, 5, generator=g) * real, old_logps=-torch.rand(4, 5, generator=g),
                  ref_logps=-torch.rand(4, 5, generator=g))  # fmt: skip
    est = get_advantage_estimator("gae")
    kw = dict(kl_coef=0.1, whiten_rewards=True, whiten_advantages=True)
    now = est(CreditBatch(completion_mask=real, loss_mask=loss, **common), **kw)
    before = est(CreditBatch(completion_mask=loss, loss_mask=loss, **common), **kw)
    torch.testing.assert_close(now.advantages, before.advantages)
    torch.testing.assert_close(now.returns, before.returns)
    assert now.metrics == before.metrics
