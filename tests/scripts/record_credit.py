"""Train a few steps under `accelerate launch`; save, per rank, what reached the loss (for tests/test_distributed.py).

usage: record_credit.py MODEL_DIR OUT_DIR ESTIMATOR [key=value ...]   (values parsed as Python literals)
Each rank writes OUT_DIR/rank{r}.pt: a list (one per generation batch) of dicts with its local `advantages`,
`completion_ids`, `completion_mask` and the gathered `rewards` the estimator saw.
"""

from _recording import run_recording

from trl_credit import GRPOTrainer
from trl_credit.testing import shaped_math_reward


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
    run_recording(RecordingTrainer, shaped_math_reward, positional=("advantage_estimator",), max_completion_length=8)


if __name__ == "__main__":
    main()
