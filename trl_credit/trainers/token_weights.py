"""
`TokenWeightingMixin`: multiplies any estimator's advantages by detached per-token weights (attention rhythm or
high-entropy forking tokens). Orchestration only; the math is in `trl_credit.credit.attention` and
`trl_credit.credit.weights`, the attention capture in `trl_credit.generation.attention_capture`.

Where it hooks in (training only; evaluation keeps the estimator's advantages):

1. `_generate_and_score_completions`: notes whether TRL is about to run its no-grad `old_per_token_logps` pass with
   the current policy (vLLM importance-sampling correction, or generation misaligned with optimizer steps); if so,
2. `_get_per_token_logps_and_entropies` rides along that pass: it asks for the entropies, or routes the attention
   through the capture function (`stop_early=False`, outputs identical to SDPA's) and keeps the per-head statistics;
3. `_credit_local_postprocess` (after the estimator, on this rank's rows): runs its own no-grad pass if nothing was
   kept (the attention pass stops after the last sampled layer), computes the weights, and returns
   `apply_token_weights(advantages, weights, loss_mask, ...)`.

The weights therefore always come from the policy that generated the batch (π_old of the update), as in the paper.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import torch

from ..credit.attention import aggregate_heads, group_heads, masked_row_mean, rhythm_gammas, rhythm_layer_indices
from ..credit.weights import apply_token_weights, entropy_threshold, entropy_token_weights
from ..generation.attention_capture import (
    AttentionStats,
    attention_capture,
    capture_attention_stats,
    check_attention_capture,
    collect_stats,
    num_hidden_layers,
    text_config,
)
from .hooks import CreditHooks


# Multimodal inputs TRL's `_get_per_token_logps_and_entropies` slices per micro-batch (forwarded as they are in `out`).
_FORWARD_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "spatial_shapes",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
    "num_images",
    "num_tiles",
)


class TokenWeightingMixin(CreditHooks):
    """
    Token weighting for `trl_credit.GRPOTrainer` (`args.token_weighting`): place it before TRL's `GRPOTrainer` in
    the bases. Attention weightings check at construction that the model's attention can be captured.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._tw_pending = False
        self._tw_stash: dict[str, Any] | None = None
        self._tw_static_groups: tuple[torch.Tensor, torch.Tensor] | None = None
        self._tw_cycle_start: float | None = None
        self._tw_last_time: float | None = None
        self._tw_layers: list[int] = []
        if self.args.uses_attention_weighting:
            if self.args.rhythm_layers is not None:
                self._tw_layers = sorted(set(int(l) for l in self.args.rhythm_layers))
            else:
                self._tw_layers = rhythm_layer_indices(num_hidden_layers(self.model), self.args.rhythm_num_layers)
            # Sharded parameters are gathered by hooks that expect complete forwards: never cut those short.
            zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
            self._tw_stop_early = not (zero3 or self.is_fsdp_enabled)
            gathered = contextlib.nullcontext()
            if zero3:
                # zero.Init partitioned the weights at loading and the engine's gathering hooks come only with the
                # first step: gather them for the check's tiny forward (what TRL's generation gathers every step).
                import deepspeed

                gathered = deepspeed.zero.GatheredParameters(list(self.model.parameters()))
            with gathered:
                check_attention_capture(
                    self.model,
                    self._tw_layers,
                    stop_early=self._tw_stop_early,
                    gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
                )

    # ── piggyback on TRL's old-logp pass when it runs anyway ────────────────────────────────────────────────────────
    def _generate_and_score_completions(self, inputs):
        self._tw_stash = None
        active = self.args.token_weighting != "none" and self.model.training
        if active:
            now = time.perf_counter()
            if self._tw_cycle_start is not None and self._tw_last_time is not None:
                # Share of the previous generation cycle (generation + its optimizer steps) spent on weighting.
                cycle = now - self._tw_cycle_start
                self._metrics["train"]["credit/weight_time_share"].append(self._tw_last_time / max(cycle, 1e-9))
            self._tw_cycle_start = now
            self._tw_pending = self._tw_can_piggyback()
        try:
            return super()._generate_and_score_completions(inputs)
        finally:
            self._tw_pending = False

    def _tw_can_piggyback(self) -> bool:
        generate_every = self.args.steps_per_generation * self.num_iterations
        old_logps_pass = self.args.gradient_accumulation_steps % generate_every != 0 or (
            self.use_vllm and self.vllm_importance_sampling_correction
        )
        if not old_logps_pass:
            return False
        if self.args.uses_attention_weighting:
            # Only then are the capture's outputs bit-identical to the model's own attention (it wraps SDPA).
            return text_config(self.model)._attn_implementation == "sdpa"
        return True

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False, **kwargs
    ):
        # TRL's first call with the policy inside `_generate_and_score_completions` is the old-logp pass (the
        # reference pass, which may also use the policy with its adapter disabled, comes after it).
        if not self._tw_pending or model is not self.model:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, **kwargs
            )
        self._tw_pending = False
        if self.args.token_weighting == "entropy":
            logps, entropies, aux = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, True, **kwargs
            )
            self._tw_stash = {"entropies": entropies.detach(), "capture_time": 0.0}
            return logps, (entropies if compute_entropy else None), aux
        with attention_capture(model, self._tw_layers, stop_early=False, **self._tw_capture_kwargs()) as state:
            state.completion_length = logits_to_keep
            state.timed = True
            result = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, **kwargs
            )
        self._tw_stash = {"attention": collect_stats(state, logits_to_keep), "capture_time": state.stats_time}
        return result

    def _tw_capture_kwargs(self) -> dict[str, Any]:
        a = self.args
        return {"window": a.rhythm_window, "h_lo": a.rhythm_horizon_lo, "h_hi": a.rhythm_horizon_hi,
                "row_shift": a.rhythm_waad_row_shift}  # fmt: skip

    # ── the weights, after the estimator ───────────────────────────────────────────────────────────────────────────
    def _credit_local_postprocess(self, advantages: torch.Tensor, out: dict[str, Any], ctx) -> torch.Tensor:
        advantages = super()._credit_local_postprocess(advantages, out, ctx)
        if self.args.token_weighting == "none":
            return advantages
        start = time.perf_counter()
        completion_mask = out["completion_mask"]
        loss_mask = completion_mask if "tool_mask" not in out else completion_mask * out["tool_mask"]
        stash, self._tw_stash = self._tw_stash or {}, None
        logs: dict[str, torch.Tensor] = {}
        if self.args.token_weighting == "entropy":
            raw, logs, capture_time = self._tw_entropy_weights(out, loss_mask, stash)
        else:
            raw, logs, capture_time = self._tw_rhythm_weights(out, completion_mask, loss_mask, stash)
        weighted, weights = apply_token_weights(
            advantages,
            raw,
            loss_mask,
            sign=self.args.token_weight_sign,
            renormalize=self.args.token_weight_renormalize,
        )
        valid = loss_mask.bool()
        logs["weight_mean"] = _masked(weights, valid)
        logs["frac_amplified"] = _masked((weights > 1).float(), valid)
        if self.args.entropy_mode == "mask" and self.args.token_weighting == "entropy":
            logs["frac_zero_weight"] = _masked((weights == 0).float(), valid)
        self._tw_log(logs, weight_max=torch.where(valid, weights, torch.zeros_like(weights)).max())
        elapsed = time.perf_counter() - start + capture_time
        self._tw_last_time = elapsed
        self._metrics["train"]["credit/weight_time_s"].append(elapsed)
        self._metrics["train"]["credit/capture_piggyback"].append(float("capture_time" in stash))
        return weighted

    def _tw_policy_inputs(self, out):
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
        am = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
        extra = {k: out[k] for k in _FORWARD_KEYS if k in out}
        return ids, am, extra

    def _tw_entropy_weights(self, out, loss_mask, stash):
        entropies = stash.get("entropies")
        if entropies is None:
            from trl.models.utils import disable_gradient_checkpointing

            ids, am, extra = self._tw_policy_inputs(out)
            T = out["completion_ids"].size(1)
            with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
                _, entropies, _ = super()._get_per_token_logps_and_entropies(
                    self.model, ids, am, T, self.args.per_device_train_batch_size, True, **extra
                )
        a = self.args
        threshold = None
        if a.entropy_scope == "batch":
            threshold = self._tw_global_entropy_threshold(entropies, loss_mask, a.entropy_rho)
        raw, selected = entropy_token_weights(
            entropies, loss_mask, rho=a.entropy_rho, mode=a.entropy_mode, boost=a.entropy_boost,
            scope=a.entropy_scope, threshold=threshold,
        )  # fmt: skip
        valid = loss_mask.bool()
        logs = {
            "entropy_mean": _masked(entropies.float(), valid),
            "frac_high_entropy": _masked(selected.float(), valid),
        }
        if threshold is not None and math.isfinite(float(threshold)):
            self._metrics["train"]["credit/entropy_threshold"].append(float(threshold))
        return raw, logs, 0.0

    def _tw_global_entropy_threshold(self, entropies, loss_mask, rho):
        local = entropies[loss_mask.bool()].float()
        if self.accelerator.num_processes > 1:
            # Entropies are >= 0, so a negative sentinel marks the padding added to equalize lengths (as TRL does).
            padded = self.accelerator.pad_across_processes(local, dim=0, pad_index=-1e9)
            local = self.accelerator.gather(padded)
            local = local[local != -1e9]
        return entropy_threshold(local, torch.ones_like(local, dtype=torch.bool), rho)

    def _tw_rhythm_weights(self, out, completion_mask, loss_mask, stash):
        a = self.args
        stats: AttentionStats | None = stash.get("attention")
        capture_time = stash.get("capture_time", 0.0)
        if stats is None:
            t0 = time.perf_counter()
            stats = self._tw_capture(out)
            capture_time = 0.0  # inside this method's own timing
            self._metrics["train"]["credit/capture_time_s"].append(time.perf_counter() - t0)
        else:
            self._metrics["train"]["credit/capture_time_s"].append(capture_time)
        local, glob = self._tw_head_groups(stats, completion_mask)
        waad = aggregate_heads(stats.waad, local)
        fai = aggregate_heads(stats.fai, glob)
        gamma, classes = rhythm_gammas(
            waad, fai, loss_mask, a.token_weighting, quantile=a.rhythm_quantile, gamma_amp=a.rhythm_gamma_amp,
            alpha=a.rhythm_alpha, k=a.rhythm_k, waad_tau_quantile=a.rhythm_waad_tau_quantile,
        )  # fmt: skip
        valid = loss_mask.bool()
        dist_sum, dist_count = masked_row_mean(stats.row_distance, completion_mask)
        head_dist = dist_sum.sum(0) / dist_count.sum().clamp(min=1)  # (K,) this rank's pooled distances
        logs = {
            "gamma_mean": _masked(gamma, valid),
            "frac_preplan": _masked(classes["preplan"].float(), valid),
            "frac_anchor": _masked(classes["anchor"].float(), valid),
            "frac_dominated": _masked(classes["dominated"].float(), valid),
            "frac_intro": _masked(classes["intro"].float(), valid),
            "waad_mean": _masked(waad, valid),
            "waad_delta_mean": _masked(classes["delta"], valid),
            "fai_mean": _masked(fai, valid & torch.isfinite(fai)),
            "head_distance_local": _group_mean(head_dist, local),
            "head_distance_global": _group_mean(head_dist, glob),
        }
        return gamma, logs, capture_time

    def _tw_capture(self, out) -> AttentionStats:
        a = self.args
        ids, am, extra = self._tw_policy_inputs(out)
        T = out["completion_ids"].size(1)
        batch_size = a.rhythm_capture_batch_size or a.per_device_train_batch_size
        if "pixel_values" in extra:
            # TRL's loop slices multimodal inputs per micro-batch; run it whole with the capture riding along.
            from trl.models.utils import disable_gradient_checkpointing

            with torch.no_grad(), disable_gradient_checkpointing(self.model, a.gradient_checkpointing_kwargs):
                with attention_capture(self.model, self._tw_layers, stop_early=False, **self._tw_capture_kwargs()) as s:
                    s.completion_length = T
                    super()._get_per_token_logps_and_entropies(self.model, ids, am, T, batch_size, False, **extra)
            return collect_stats(s, T)
        with self.accelerator.autocast():  # the same numerics as TRL's own no-grad passes
            return capture_attention_stats(
                self.model, ids, am, T, self._tw_layers, batch_size=batch_size, stop_early=self._tw_stop_early,
                gradient_checkpointing_kwargs=a.gradient_checkpointing_kwargs, **self._tw_capture_kwargs(),
            )  # fmt: skip

    def _tw_head_groups(self, stats: AttentionStats, completion_mask) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.args
        sums, counts = masked_row_mean(stats.row_distance, completion_mask)  # (B, K), (B,)
        if a.rhythm_head_groups == "sequence":
            return group_heads(sums / counts.clamp(min=1).unsqueeze(-1), a.rhythm_head_frac)
        if a.rhythm_head_groups == "static" and self._tw_static_groups is not None:
            return self._tw_static_groups
        # Pool over the whole generation batch (all ranks) so every process ranks the heads identically.
        pooled = torch.cat([sums.sum(0), counts.sum(0, keepdim=True)]).to(torch.float64)
        if self.accelerator.num_processes > 1:
            pooled = self.accelerator.reduce(pooled, reduction="sum")
        groups = group_heads((pooled[:-1] / pooled[-1].clamp(min=1)).to(torch.float32), a.rhythm_head_frac)
        if a.rhythm_head_groups == "static":
            self._tw_static_groups = groups
        return groups

    # ── logging ────────────────────────────────────────────────────────────────────────────────────────────────────
    def _tw_log(self, logs: dict[str, tuple[torch.Tensor, torch.Tensor]], weight_max: torch.Tensor) -> None:
        """Log token-weighted means over all processes (each entry is a local `(sum, count)`)."""
        names = sorted(logs)
        device = weight_max.device
        packed = torch.stack(
            [torch.as_tensor(v, dtype=torch.float64, device=device) for n in names for v in logs[n]]
            + [weight_max.to(torch.float64)]
        )
        if self.accelerator.num_processes > 1:
            packed = self.accelerator.gather(packed.unsqueeze(0))
            wmax = packed[:, -1].max()
            packed = packed[:, :-1].sum(0)
        else:
            wmax, packed = packed[-1], packed[:-1]
        metrics = self._metrics["train"]
        for i, name in enumerate(names):
            total, count = packed[2 * i], packed[2 * i + 1]
            if count > 0:
                metrics[f"credit/{name}"].append((total / count).item())
        metrics["credit/weight_max"].append(wmax.item())


def _masked(x: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(sum, count)` of `x` where `m` holds (summed over ranks before dividing)."""
    m = m.bool()
    return torch.where(m, x.float(), torch.zeros_like(x, dtype=torch.float32)).sum(), m.sum().float()


def _group_mean(values: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(sum, count)` of per-head values over a head group (`(K,)` or per sequence `(B, K)`)."""
    g = group.float()
    v = values.unsqueeze(0).expand_as(g) if g.dim() == 2 else values
    return (v * g).sum(), g.sum()
