"""Train SPO-tree a few steps under `accelerate launch` and save, per rank, the trees and the credit it computed (for
tests/test_spo_tree.py).

usage: spo_tree_record.py MODEL_DIR OUT_DIR [key=value ...]   (values parsed as Python literals)
Each rank writes OUT_DIR/rank{r}.pt: a list (one per generation batch) of dicts with the global trained completions,
the trained slots, `segment_ids`, `segment_values`, `tree_paths`, `cutpoint_mask`, `rewards`, `completion_mask`, its
local completions and advantages, and the number of value-only leaves it scored.
"""

import ast
import sys

import torch

from trl_credit import GRPOConfig, GRPOTrainer
from trl_credit.testing import CPU_TEST_ARGS, shaped_math_reward, tiny_math_dataset


class RecordingTrainer(GRPOTrainer):
    records = []

    def _spo_tree_fields(self, out, ctx, batch_fields):
        state = self._spo_tree_batch
        fields = super()._spo_tree_fields(out, ctx, batch_fields)
        self.records.append(
            {
                "completion_ids": state["completion_ids"],
                "trained": state["trained"],
                **{k: v.clone() for k, v in fields.items()},
                "rewards": batch_fields["rewards"].cpu().clone(),
                "completion_mask": batch_fields["completion_mask"].cpu().clone(),
                "local_ids": [list(c) for c in ctx["completion_ids_list"]],
                "B": len(ctx["completion_ids_list"]),
                "value_only_leaves": self._metrics["train"]["credit/spo_tree_value_only_leaves"][-1],
            }
        )
        return fields

    def _assign_credit(self, out, ctx):
        super()._assign_credit(out, ctx)
        self.records[-1]["advantages"] = out["advantages"].detach().cpu().clone()


def main():
    model_dir, out_dir, *extra = sys.argv[1:]
    overrides = {k: ast.literal_eval(v) for k, v in (e.split("=", 1) for e in extra)}
    kw = dict(
        output_dir=out_dir,
        advantage_estimator="spo_tree",
        max_steps=2,
        per_device_train_batch_size=3,  # with num_generations=2 and 2 ranks, the middle group straddles the ranks
        num_generations=2,
        max_completion_length=10,
        learning_rate=1e-2,
        **CPU_TEST_ARGS,
        seed=11,
        spo_tree_shape=[2, 2],  # 4 slots, 2 trained: the others are scored for values only
        spo_tree_segment_tokens=4,
        vine_rollout_batch_size=2,  # several generate calls per level, so that call counts can differ if wrong
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
