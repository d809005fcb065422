"""Train a few steps under `accelerate launch`; save, per rank, what reached the loss (for tests/test_distributed.py).

usage: record_credit.py MODEL_DIR OUT_DIR ESTIMATOR [--mixed-truncation] [key=value ...]   (values: Python literals)
Each rank writes OUT_DIR/rank{r}.pt: a list (one per generation batch) of dicts with its local `advantages`,
`completion_ids`, `completion_mask` (TRL's, the loss mask), `generated_mask` (the real completion lengths) and the
gathered `rewards` the estimator saw.

`--mixed-truncation`: fixed completions instead of sampling (`MIXED_COMPLETIONS`, by global row), rewarded by their
length, with `mask_truncated_completions=True` and `max_completion_length=6`: groups mix finished rows and rows cut at
the budget, one of them straddling the ranks.
"""

import sys

from _recording import run_recording

from trl_credit import GRPOTrainer
from trl_credit.testing import shaped_math_reward


EOS = -1  # replaced by the tokenizer's EOS id
# Global row → completion (3 rows per rank, groups of 2: rows 2 and 3 straddle the ranks). Every row starts with 7;
# rows 1 and 3 reach the 6-token budget without EOS (truncated, masked out of the loss by TRL).
MIXED_COMPLETIONS = [[7, 8, EOS], [7, 9, 10, 11, 12, 13], [7, 9, EOS], [7, 9, 10, 11, 12, 13], [7, 9, 10, EOS],
                     [7, 8, EOS]]  # fmt: skip


def mixed_rollout(prompts, trainer):
    eos = trainer.eos_token_ids[0]
    start = trainer.accelerator.process_index * len(prompts)
    rows = [[eos if t == EOS else t for t in MIXED_COMPLETIONS[(start + i) % len(MIXED_COMPLETIONS)]]
            for i in range(len(prompts))]  # fmt: skip
    return {"prompt_ids": [[5, 6]] * len(prompts), "completion_ids": rows,
            "logprobs": [[0.0] * len(c) for c in rows]}  # fmt: skip


def length_reward(completions, completion_ids, **kwargs):
    return [len(ids) / 10 for ids in completion_ids]


class RecordingTrainer(GRPOTrainer):
    records = []

    def _assign_credit(self, out, ctx):
        super()._assign_credit(out, ctx)
        fields = self._credit_batch_fields(out, ctx)
        self.records.append(
            {
                "advantages": out["advantages"].detach().cpu(),
                "completion_ids": out["completion_ids"].cpu(),
                "completion_mask": out["completion_mask"].cpu(),
                "generated_mask": self._generated_mask(out, ctx).cpu(),
                "rewards": fields["rewards"].cpu(),
            }
        )


def main():
    if "--mixed-truncation" in sys.argv:
        sys.argv.remove("--mixed-truncation")
        run_recording(RecordingTrainer, length_reward, positional=("advantage_estimator",), max_steps=1,
                      max_completion_length=6, mask_truncated_completions=True,
                      trainer_kwargs={"rollout_func": mixed_rollout})  # fmt: skip
    else:
        run_recording(RecordingTrainer, shaped_math_reward, positional=("advantage_estimator",),
                      max_completion_length=8)  # fmt: skip


if __name__ == "__main__":
    main()
