"""Train SPO-chain a few steps under `accelerate launch` and save, per rank, what the segmentation, the Monte-Carlo
values and the loss saw (for tests/test_spo.py).

usage: spo_record.py MODEL_DIR OUT_DIR [key=value ...]   (values parsed as Python literals)
Each rank writes OUT_DIR/rank{r}.pt: a list (one per generation batch) of dicts with the global `segment_ids`,
`estimated_states`, `cutpoint_mask`, `segment_values`, `rewards`, `loss_mask` and the gathered log-probs it computed,
and its local `advantages`, `tool_mask`, `completion_mask` and `num_items_in_batch`.
"""

from _recording import run_recording

from trl_credit import GRPOTrainer
from trl_credit.testing import length_reward


class RecordingTrainer(GRPOTrainer):
    records = []

    def _spo_segments(self, out, batch_fields):
        result = super()._spo_segments(out, batch_fields)
        logps, source = self._spo_local_logps(out)
        self.records.append({k: v.detach().cpu().clone() for k, v in result.items()})
        self.records[-1].update(logps=self._gather_rows(logps.float().contiguous(), 0.0).cpu(), source=source,
                                completion_mask_global=batch_fields["completion_mask"].cpu().clone())  # fmt: skip
        return result

    def _vine_mc_values(self, out, ctx, batch_fields):
        result = super()._vine_mc_values(out, ctx, batch_fields)
        self.records[-1].update(segment_values=result["segment_values"].cpu().clone(),
                                vine_segment_ids=result["segment_ids"].cpu().clone(),
                                rewards=result["rewards"].cpu().clone(),
                                loss_mask=batch_fields["loss_mask"].cpu().clone())  # fmt: skip
        return result

    def _assign_credit(self, out, ctx):
        super()._assign_credit(out, ctx)
        self.records[-1].update({k: out[k].detach().cpu().clone() for k in ("advantages", "tool_mask",
                                                                            "completion_mask")})  # fmt: skip
        self.records[-1]["num_items_in_batch"] = float(out["num_items_in_batch"])


def main():
    run_recording(RecordingTrainer, length_reward, advantage_estimator="spo_chain", max_completion_length=10,
                  vine_num_rollouts=2, spo_cutpoint_threshold=0.004, spo_cutpoints_per_segment=2,
                  vine_rollout_batch_size=4)  # fmt: skip


if __name__ == "__main__":
    main()
