r"""
`SPOMixin`: the trainer side of SPO-chain ([SPO](https://huggingface.co/papers/2505.23564)), orchestration only.

For an estimator that declares cutpoint segments (`credit_segmentation = "cutpoints"`: `advantage_estimator=
"spo_chain"`), the trainer's `"segments"` requirement is answered here:

1. the sampling policy's per-token log-probs of the generation batch, at the sampling temperature, from what TRL already
   computed when it did (`spo_cutpoint_logps="policy"`: TRL's `old_per_token_logps`, present with vLLM importance
   sampling correction or when generation and optimizer steps are misaligned; `"sampling"`: vLLM's
   `sampling_per_token_logps`), else from one no-grad forward pass of the policy (`MacroActionMixin._policy_logps`);
2. gathered over the processes, cut by `trl_credit.credit.spo.cutpoint_boundaries` into `segment_ids`,
   `estimated_states` (the boundary states that need a value) and `cutpoint_mask` (the probability mask).

The `"mc_values"` requirement is then `VinePPOMixin._vine_mc_values`, which estimates exactly the chosen states with
the rollout engine (every backend, dedup, budgets, the truncation rule), and the estimator returns the probability mask
as `CreditOutput.loss_mask`, which `GRPOTrainer` multiplies into TRL's loss mask.

Logged under `credit/`: `spo_logps_extra_pass` (1 when the log-probs needed a no-grad pass of their own, 0 when TRL's
or vLLM's were reused) and `spo_logps_nan` (vLLM sampling log-probs that were `NaN`, treated as `p = 1`: never a
cutpoint), next to the estimator's `spo_*` metrics and the Monte-Carlo `mc_*` metrics.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from ..credit import spo as _spo  # noqa: F401  (registers the "spo_chain" estimator)
from ..credit.spo import cutpoint_boundaries
from .hooks import CreditHooks


logger = logging.getLogger(__name__)

_SOURCES = {
    "old_per_token_logps": "TRL's old_per_token_logps (no extra forward pass)",
    "sampling_per_token_logps": "vLLM's sampling log-probs (no extra forward pass)",
    "policy_pass": "one no-grad forward pass of the policy (TRL computed no old log-probs for this batch)",
}


class SPOMixin(CreditHooks):
    """
    Answers the `"segments"` credit requirement with SPO's cutpoint segmentation when the estimator declares
    `credit_segmentation = "cutpoints"`; other requirements, and other estimators, go to the next class in the MRO.
    Place it before `MacroActionMixin` among the bases of `trl_credit.GRPOTrainer`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        estimator = getattr(self, "credit_estimator", None)
        self._spo_cutpoints = getattr(estimator, "credit_segmentation", None) == "cutpoints"
        self._spo_logged_source: str | None = None

    def _credit_requirement(self, requirement: str, out, ctx, batch_fields) -> dict[str, Any]:
        if requirement == "segments" and self._spo_cutpoints:
            return self._spo_segments(out, batch_fields)
        return super()._credit_requirement(requirement, out, ctx, batch_fields)

    # ── the "segments" requirement ─────────────────────────────────────────────────────────────────────────────────
    def _spo_segments(self, out: dict[str, Any], batch_fields: dict[str, Any]) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        args = self.args
        logps, source = self._spo_local_logps(out)
        nan = torch.isnan(logps)
        logps = torch.where(nan, torch.zeros_like(logps), logps)  # p = 1: never a cutpoint
        global_logps = self._gather_rows(logps.float().contiguous(), 0.0)
        mask = batch_fields["completion_mask"]
        width = mask.size(1)
        if global_logps.size(1) < width:  # defensive: pad the columns TRL's tensors may lack
            global_logps = torch.nn.functional.pad(global_logps, (0, width - global_logps.size(1)))
        segments = cutpoint_boundaries(
            global_logps[:, :width],
            mask,
            rho=args.spo_cutpoint_threshold,
            k=args.spo_cutpoints_per_segment,
        )
        if self._spo_logged_source != source:
            self._spo_logged_source = source
            logger.info("SPO cutpoints and probability mask from %s.", _SOURCES[source])
        metrics = self._metrics["train"]
        metrics["credit/spo_logps_extra_pass"].append(float(source == "policy_pass"))
        if args.spo_cutpoint_logps == "sampling":
            nan_count = self._gather_rows(nan.float().sum().reshape(1, 1), 0.0).sum()
            metrics["credit/spo_logps_nan"].append(float(nan_count))
        metrics["credit/spo_time_s"].append(time.perf_counter() - start)
        return {
            "segment_ids": segments.segment_ids,
            "estimated_states": segments.estimated_states,
            "cutpoint_mask": segments.cutpoint_mask,
        }

    def _spo_local_logps(self, out: dict[str, Any]) -> tuple[torch.Tensor, str]:
        """This rank's `(B, T)` log-probs of the sampled tokens under the sampling policy, and where they came from."""
        if self.args.spo_cutpoint_logps == "sampling":
            logps = out.get("sampling_per_token_logps")
            if logps is None:
                raise RuntimeError(
                    "spo_cutpoint_logps='sampling' needs vLLM's sampling log-probs, but TRL returned none for this "
                    "batch; use spo_cutpoint_logps='policy'."
                )
            return logps.detach(), "sampling_per_token_logps"
        if out.get("old_per_token_logps") is not None:
            return out["old_per_token_logps"].detach(), "old_per_token_logps"
        return self._policy_logps(out), "policy_pass"
