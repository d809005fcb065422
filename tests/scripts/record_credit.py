"""Train a few steps under `accelerate launch`; save, per rank, what reached the loss (for tests/test_distributed.py).

usage: record_credit.py MODEL_DIR OUT_DIR ESTIMATOR [key=value ...]   (values parsed as Python literals)
Each rank writes OUT_DIR/rank{r}.pt: a list (one per generation batch) of dicts with its local `advantages`,
`completion_ids`, `completion_mask` and the gathered `rewards` the estimator saw.
"""

import ast
import sys

import torch

from trl_credit import GRPOConfig, GRPOTrainer
from trl_credit.testing import CPU_TEST_ARGS, shaped_math_reward, tiny_math_dataset


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
                "rewards": fields["rewards"].cpu(),
            }
        )


def main():
    model_dir, out_dir, estimator, *extra = sys.argv[1:]
    overrides = {k: ast.literal_eval(v) for k, v in (e.split("=", 1) for e in extra)}
    kw = dict(
        output_dir=out_dir,
        advantage_estimator=estimator,
        max_steps=2,
        per_device_train_batch_size=3,  # with num_generations=2 and 2 ranks, the middle group straddles the ranks
        num_generations=2,
        max_completion_length=8,
        learning_rate=1e-2,
        **CPU_TEST_ARGS,
        seed=11,
    )
    kw.update(overrides)
    trainer = RecordingTrainer(
        model=model_dir, reward_funcs=shaped_math_reward, args=GRPOConfig(**kw), train_dataset=tiny_math_dataset(24)
    )
    trainer.train()
    rank = trainer.accelerator.process_index
    torch.save(trainer.records, f"{out_dir}/rank{rank}.pt")
    if trainer.accelerator.is_main_process:
        print("world_size", trainer.accelerator.num_processes, "steps", trainer.state.global_step, flush=True)


if __name__ == "__main__":
    main()
