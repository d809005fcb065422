"""Train SPO-tree a few steps under `accelerate launch` and save, per rank, the trees and the credit it computed (for
tests/test_spo_tree.py).

usage: spo_tree_record.py MODEL_DIR OUT_DIR [key=value ...]   (values parsed as Python literals)
Each rank writes OUT_DIR/rank{r}.pt: a list (one per generation batch) of dicts with the global trained completions,
the trained slots, `segment_ids`, `segment_values`, `tree_paths`, `cutpoint_mask`, `rewards`, `completion_mask`, its
local completions and advantages, and the number of value-only leaves it scored.
"""

from _recording import run_recording

from trl_credit import GRPOTrainer
from trl_credit.testing import shaped_math_reward


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
    run_recording(RecordingTrainer, shaped_math_reward, advantage_estimator="spo_tree", max_completion_length=10,
                  spo_tree_shape=[2, 2],  # 4 slots, 2 trained: the others are scored for values only
                  spo_tree_segment_tokens=4,
                  vine_rollout_batch_size=2)  # several generate calls per level, so that call counts can differ if wrong


if __name__ == "__main__":
    main()
