"""Train VinePPO a few steps under `accelerate launch` and save, per rank, what the MC values and the loss saw (for
tests/test_rollouts.py).

usage: vineppo_record.py MODEL_DIR OUT_DIR [key=value ...]   (values parsed as Python literals)
Each rank writes OUT_DIR/rank{r}.pt: a list (one per generation batch) of dicts with the global `segment_ids`,
`segment_values`, `rewards` and `completion_mask` it computed, its local `advantages`, and the sizes of the prompt lists
it passed to the rollout backend, call by call.
"""

from _recording import run_recording

from trl_credit import GRPOTrainer
from trl_credit.testing import shaped_math_reward


class RecordingTrainer(GRPOTrainer):
    records = []
    call_sizes = []

    def _vine_mc_values(self, out, ctx, batch_fields):
        if self._vine_backend is None:
            from trl_credit.generation.rollouts import make_rollout_backend

            self._vine_backend = make_rollout_backend(self, self.args.vine_rollout_batch_size)
            generate = self._vine_backend.generate

            def counting_generate(prefixes, budgets, call_budget):
                self.call_sizes.append(len(prefixes))
                return generate(prefixes, budgets, call_budget)

            self._vine_backend.generate = counting_generate
        result = super()._vine_mc_values(out, ctx, batch_fields)
        self.records.append(
            {
                "segment_ids": result["segment_ids"].clone(),
                "segment_values": result["segment_values"].clone(),
                "rewards": batch_fields["rewards"].cpu().clone(),
                "loss_mask": batch_fields["loss_mask"].cpu().clone(),
                "call_sizes": list(self.call_sizes),
            }
        )
        self.call_sizes.clear()
        return result

    def _assign_credit(self, out, ctx):
        super()._assign_credit(out, ctx)
        self.records[-1]["advantages"] = out["advantages"].detach().cpu().clone()


def main():
    run_recording(RecordingTrainer, shaped_math_reward, advantage_estimator="vineppo", max_completion_length=10,
                  vine_num_rollouts=3, step_split="token_chunks", vine_chunk_tokens=3,
                  vine_rollout_batch_size=4)  # several generate calls per step, so that call counts can differ if wrong


if __name__ == "__main__":
    main()
