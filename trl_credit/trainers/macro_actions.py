"""The `"segments"` credit requirement: macro actions for every trainer (MA-RLHF,
https://huggingface.co/papers/2410.02743).

`MacroActionMixin` sits among the bases of `trl_credit.GRPOTrainer`. When an estimator registered with
`requires=("segments", ...)` runs and `args.macro_action` is set, it computes the `(N, T)` segment ids of the global
generation batch with the pure functions of `trl_credit.credit.macro` and hands them to the estimator as
`CreditBatch.segment_ids`; with `macro_action=None` it hands nothing, and the estimator keeps its native granularity.
Every rank computes the same segmentation of the same gathered batch (the random rule is seeded from the step), so no
communication is needed.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from ..credit.macro import (
    boundary_segments,
    macro_log_ratio,
    ngram_segments,
    perplexity_segments,
    punctuation_segments,
    punctuation_token_flags,
    random_ngram_segments,
    segment_metrics,
    token_segments,
)
from .hooks import CreditHooks


logger = logging.getLogger(__name__)

_PPL_SOURCES = {
    "reference": "the reference model's log-probs (no extra forward pass)",
    "sampling": "the sampling policy's log-probs computed by TRL (no extra forward pass)",
    "policy_forward": "the sampling policy's log-probs (one no-grad forward pass; no reference model in this run)",
}

def token_texts(tokenizer) -> tuple[list[str], list[bool]]:
    """
    Decoded text of every token id, leading spaces included, and whether it is a special token.

    SentencePiece decoders drop the leading space of a lone token, so each token is decoded after an anchor token and
    the anchor's text is removed.
    """
    vocab_size = len(tokenizer)
    anchor = tokenizer.encode("a", add_special_tokens=False)[:1] or [0]
    prefix = tokenizer.decode(anchor, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    pairs = tokenizer.batch_decode(
        [anchor + [i] for i in range(vocab_size)], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    texts = [s[len(prefix) :] if s.startswith(prefix) else s for s in pairs]
    special_ids = set(tokenizer.all_special_ids)
    return texts, [i in special_ids for i in range(vocab_size)]


class MacroActionMixin(CreditHooks):
    """
    Provides the `"segments"` requirement from `args.macro_action` (see [`MacroActionArguments`]). Place it among the
    bases of a `trl_credit` trainer; requirements other than `"segments"` go to the next class in the MRO.
    """

    _macro_token_flags: torch.Tensor | None = None
    _macro_ratio_inputs: dict[str, Any] | None = None

    def _credit_requirement(self, requirement: str, out, ctx, batch_fields) -> dict[str, Any]:
        if requirement == "segments":
            if self.args.macro_action is None:  # the estimator's native granularity
                return {}
            start = time.perf_counter()
            segment_ids = self._macro_segment_ids(out, ctx, batch_fields)
            metrics = self._metrics["train"]
            for name, value in segment_metrics(segment_ids).items():
                metrics[f"credit/{name}"].append(value)
            metrics["credit/macro_time_s"].append(time.perf_counter() - start)
            if self.args.macro_ratio_level != "token":
                # This rank's rows travel with the batch (TRL's buffering splits every tensor key along dim 0).
                B, T = out["completion_ids"].shape
                rank = self.accelerator.process_index
                out["macro_segment_ids"] = segment_ids[rank * B : (rank + 1) * B, :T].to(out["completion_ids"].device)
            return {"segment_ids": segment_ids}
        return super()._credit_requirement(requirement, out, ctx, batch_fields)

    # ── segmentation of the global batch ───────────────────────────────────────────────────────────────────────────
    def _macro_segment_ids(self, out: dict[str, Any], ctx: dict[str, Any], batch_fields: dict[str, Any]):
        """`(N, T)` long macro ids of the global generation batch (`-1` on padding)."""
        args = self.args
        mask = batch_fields["completion_mask"]
        ids = batch_fields["completion_ids"]
        last = args.macro_action_last_singleton
        rule = args.macro_action
        if rule == "token":
            return token_segments(mask)
        if rule == "ngram":
            return ngram_segments(mask, args.macro_action_n, last_singleton=last)
        if rule == "random_ngram":
            seed = args.macro_action_seed if args.macro_action_seed is not None else args.seed
            # One draw per generation batch, identical on every rank and after a resume.
            gas = self.args.gradient_accumulation_steps
            draw = self.state.global_step * gas + self._step % gas
            generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + draw)
            return random_ngram_segments(
                mask,
                lengths=args.macro_action_lengths,
                repeat_times=args.macro_action_repeat_times,
                generator=generator,
                last_singleton=last,
            )
        if rule == "punctuation":
            if self._macro_token_flags is None:
                texts, special = token_texts(self._tokenizer)
                self._macro_token_flags = punctuation_token_flags(texts, special)
            return punctuation_segments(
                ids, mask, self._macro_token_flags, last_singleton=last, max_len=args.macro_action_max_len
            )
        if rule == "perplexity":
            logps = self._macro_logps(out, batch_fields)
            return perplexity_segments(
                logps, mask, boundary=args.macro_ppl_boundary, last_singleton=last, max_len=args.macro_action_max_len
            )
        if rule == "step":
            estimator = getattr(self, "credit_estimator", None)
            if estimator is not None and "mc_values" in estimator.credit_requires:
                # For Monte-Carlo values "step" means exactly the native steps: a one-token last macro would add one
                # state per completion (K more rollouts) and keeps no outcome apart from dense rewards (there are none).
                last = False
            return boundary_segments(
                self._macro_step_starts(ids, mask), mask, last_singleton=last, max_len=args.macro_action_max_len
            )
        raise ValueError(f"Unknown macro_action {rule!r}.")

    def _macro_logps(self, out: dict[str, Any], batch_fields: dict[str, Any]) -> torch.Tensor:
        """
        Global `(N, T)` log-probs for the perplexity rule: the reference model's when the trainer computes them anyway
        (MA-RLHF's choice: TRL's `beta` term, PPO's `kl_coef` penalty), otherwise the sampling policy's (TRL's
        `old_per_token_logps` / `sampling_per_token_logps`, or one no-grad forward of the policy, which on-policy is
        the sampling policy). Logged as `credit/macro_ppl_reference` (1 = reference model, 0 = sampling policy).
        """
        logps, source = self._macro_logps_and_source(out, batch_fields)
        self._metrics["train"]["credit/macro_ppl_reference"].append(1.0 if source == "reference" else 0.0)
        logged = self.__dict__.setdefault("_macro_ppl_sources_logged", set())  # one log line per source and trainer
        if source not in logged:
            logged.add(source)
            logger.info("macro_action='perplexity': per-token perplexity read from %s.", _PPL_SOURCES[source])
        return logps

    def _macro_logps_and_source(self, out: dict[str, Any], batch_fields: dict[str, Any]) -> tuple[torch.Tensor, str]:
        if batch_fields.get("ref_logps") is not None:
            return batch_fields["ref_logps"], "reference"
        ref = self._macro_reference_logps(out)
        if ref is not None:
            return self._gather_rows(ref.float().contiguous(), 0.0), "reference"
        for key in ("old_per_token_logps", "sampling_per_token_logps"):
            if out.get(key) is not None:
                return self._gather_rows(out[key].float().contiguous(), 0.0), "sampling"
        if batch_fields.get("old_logps") is not None:
            return batch_fields["old_logps"], "sampling"
        return self._gather_rows(self._policy_logps(out).contiguous(), 0.0), "policy_forward"

    def _macro_reference_logps(self, out: dict[str, Any]) -> torch.Tensor | None:
        """This rank's `(B, T)` reference log-probs if the trainer computes them for this batch anyway, else `None`
        (TRL computes them for `beta != 0`; `PPOTrainer` for its `kl_coef` penalty)."""
        return out.get("ref_per_token_logps")

    @torch.no_grad()
    def _policy_logps(self, out: dict[str, Any]) -> torch.Tensor:
        """This rank's `(B, T)` log-probs of the completion tokens under the current policy (no grad)."""
        from trl.models.utils import disable_gradient_checkpointing

        input_ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
        attention_mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            logps, _, _ = self._get_per_token_logps_and_entropies(
                self.model,
                input_ids,
                attention_mask,
                out["completion_ids"].size(1),
                batch_size=self.args.per_device_train_batch_size,
            )
        return logps.float()

    def _macro_step_starts(self, ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
        """Token positions where each reasoning step starts (VinePPO's `step_split` and `vine_chunk_tokens`)."""
        from ..credit.steps import segment_completions

        tokenizer = self._tokenizer
        completions = [row[m.bool()].tolist() for row, m in zip(ids.cpu(), mask.cpu(), strict=True)]
        _, boundaries, failed = segment_completions(
            completions,
            ids.size(1),
            step_split=self.args.step_split,
            batch_decode=lambda seqs: tokenizer.batch_decode(
                seqs, skip_special_tokens=True, clean_up_tokenization_spaces=False
            ),
            chunk_tokens=self.args.vine_chunk_tokens,
            # The same special ids as VinePPO's own splitter, so that "step" gives exactly its steps.
            special_token_ids=frozenset(tokenizer.all_special_ids) | frozenset(getattr(self, "eos_token_ids", ())),
        )
        self._metrics["train"]["credit/macro_step_split_failed"].append(failed / max(len(completions), 1))
        return [b[:-1] for b in boundaries]

    # ── macro-level importance ratio (`macro_ratio_level`) ─────────────────────────────────────────────────────────
    def _compute_loss(self, model, inputs):
        if self.args.macro_ratio_level == "token" or "macro_segment_ids" not in inputs:
            return super()._compute_loss(model, inputs)
        self._macro_ratio_inputs = inputs
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._macro_ratio_inputs = None

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False, **kwargs
    ):
        logps, entropies, aux = super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, **kwargs
        )
        # Only the policy forward of `_compute_loss` (its first call) is transformed.
        inputs, self._macro_ratio_inputs = self._macro_ratio_inputs, None
        if inputs is None:
            return logps, entropies, aux
        # TRL's loss computes `coef = exp(logps − old)`; shifting each token's log-prob by the difference between its
        # macro's aggregated log-ratio and its own makes that ratio the macro's, with the gradient of the macro
        # aggregate. A one-token macro adds exactly 0, so it stays TRL's token ratio bit for bit.
        old = inputs.get("old_per_token_logps")
        old = logps.detach() if old is None else old
        log_ratio = logps - old
        macro = macro_log_ratio(log_ratio, inputs["macro_segment_ids"], self.args.macro_ratio_level)
        return logps + (macro - log_ratio), entropies, aux
