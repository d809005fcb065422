r"""
`VinePPOMixin`: the trainer side of VinePPO ([VinePPO](https://huggingface.co/papers/2410.01679)), orchestration only.

For an estimator registered with `requires=("mc_values",)` (`advantage_estimator="vineppo"`), the trainer's
`_credit_requirement("mc_values", …)` is answered here, after TRL generated and scored the group completions of the
step (so the generation backend already holds this step's weights):

1. gather each row's prompt ids, completion ids, prompt and reward inputs (one `gather_object`; a group may
   straddle two processes);
2. cut every completion into steps (`trl_credit.credit.steps`), choose the states to estimate (cap, stride);
3. plan the unique states and sample their Monte-Carlo continuations (`trl_credit.generation.rollouts`), every
   process taking an equal share of every backend call; score them by calling the reward functions directly on this
   thread;
4. return `segment_ids (N, T)`, per-row `segment_values (N, S)` (interpolated for strided boundaries) and the
   `rewards (N,)` the values are compared with: a completion that reached `max_completion_length` without EOS gets
   `vine_truncation_penalty`, as a truncated rollout does; the `"vineppo"` estimator turns them into advantages.

Tools, environments and `rollout_func` are rejected with VinePPO: a continuation would have to replay the tool loop.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import torch
from torch import nn

from ..credit import vineppo as _vineppo  # noqa: F401  (registers the "vineppo" estimator)
from ..credit.batch import nonfinite_rewards_to_nan
from ..credit.steps import (
    boundaries_to_segment_ids,
    estimated_state_mask,
    segment_completions,
    segment_ids_to_boundaries,
)
from ..credit.vineppo import apply_truncation_penalty, interpolate_state_values
from ..generation.rollouts import (
    AccelerateCollective,
    VinePlan,
    make_rollout_backend,
    run_mc_rollouts,
    widen_vllm_max_num_seqs,
)
from .hooks import CreditHooks


def _noop(*args, **kwargs) -> None:
    return None


class VinePPOMixin(CreditHooks):
    """
    Answers the `"mc_values"` credit requirement with Monte-Carlo rollouts from step states; other requirements go to
    the next class in the MRO. Place it among the bases of a trainer with trl_credit's credit seam
    (`trl_credit.GRPOTrainer`).

    Logged under `credit/`: `mc_unique_states`, `mc_rollouts`, `mc_generated_tokens`, `mc_tokens_ratio` (rollout
    tokens per token of the group completions), `mc_truncation_rate`, `mc_value_mean`, `mc_backend_calls`,
    `mc_time_s`, `mc_time_share` (share of the optimizer step's wall time spent in rollouts and their scoring),
    `mc_free_samples` (tree reuse), `mc_stopped_early` (adaptive K), `parse_failed` (splitter fallbacks),
    `vine_truncated_completions` (share of training completions scored `vine_truncation_penalty`).
    """

    def __init__(self, *args, **kwargs):
        config = kwargs.get("args")
        if config is not None and config.needs_mc_values and config.use_vllm and config.vllm_mode == "colocate":
            # TRL caps the colocated engine at the main batch's sequence count; rollouts are K times as many and would
            # run in K sequential waves. Raise the cap during construction only.
            with widen_vllm_max_num_seqs(config.vine_num_rollouts):
                super().__init__(*args, **kwargs)
        else:
            super().__init__(*args, **kwargs)
        estimator = getattr(self, "credit_estimator", None)
        self._vine_enabled = estimator is not None and "mc_values" in estimator.credit_requires
        self._vine_backend = None
        self._vine_rollout_time = 0.0
        self._vine_step_time = 0.0
        self._vine_micro_steps = 0
        if not self._vine_enabled:
            return
        if self.tools or self.environment_factories is not None or self.rollout_func is not None:
            raise ValueError(
                f"advantage_estimator={self.args.advantage_estimator!r} estimates step values by continuing token "
                "prefixes with the policy, which cannot replay tool calls, environments or a custom rollout_func. "
                "Remove tools/environment_factory/rollout_func, or use an estimator without Monte-Carlo rollouts "
                "(e.g. 'grpo' or 'tempo')."
            )

    def _credit_requirement(self, requirement: str, out, ctx, batch_fields) -> dict[str, Any]:
        if requirement == "mc_values":
            return self._vine_mc_values(out, ctx, batch_fields)
        return super()._credit_requirement(requirement, out, ctx, batch_fields)

    def training_step(self, *args, **kwargs):
        if not self._vine_enabled:
            return super().training_step(*args, **kwargs)
        start = time.perf_counter()
        try:
            return super().training_step(*args, **kwargs)
        finally:
            self._vine_step_time += time.perf_counter() - start
            self._vine_micro_steps += 1
            if self._vine_micro_steps % self.args.gradient_accumulation_steps == 0:
                if self._vine_step_time > 0:
                    share = self._vine_rollout_time / self._vine_step_time
                    self._metrics["train"]["credit/mc_time_share"].append(share)
                self._vine_rollout_time = self._vine_step_time = 0.0

    # ── the "mc_values" requirement ────────────────────────────────────────────────────────────────────────────────
    def _vine_mc_values(self, out: dict[str, Any], ctx: dict[str, Any], batch_fields: dict[str, Any]):
        start = time.perf_counter()
        args = self.args
        accelerator = self.accelerator

        # ── every row of the global batch, in TRL's row order ──
        prompt_ids = [ids[mask.bool()].tolist() for ids, mask in zip(out["prompt_ids"].cpu(), out["prompt_mask"].cpu())]
        skip = ("prompt", "completion", "completion_ids")
        local_rows = [
            {
                "prompt_ids": p_ids,
                "completion_ids": list(c_ids),
                "prompt": prompt,
                "inputs": {k: v for k, v in row.items() if k not in skip},
            }
            for p_ids, c_ids, prompt, row in zip(
                prompt_ids, ctx["completion_ids_list"], ctx["prompts"], ctx["inputs"], strict=True
            )
        ]
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            rows = gather_object(local_rows)
        else:
            rows = local_rows
        N, T = batch_fields["completion_ids"].shape
        if len(rows) != N:
            raise RuntimeError(f"Gathered {len(rows)} rows for a credit batch of {N} completions.")
        G = batch_fields["num_generations"]
        # One rule for every sample of a value: a completion that reaches the horizon without EOS is worth
        # vine_truncation_penalty, a truncated training completion as much as a truncated rollout (otherwise
        # A_{S-1} = r − V̂ compares the reward function's score with the penalty).
        rewards, truncated = apply_truncation_penalty(
            batch_fields["rewards"].detach().cpu().to(torch.float64),
            [r["completion_ids"] for r in rows],
            args.max_completion_length,
            self.eos_token_ids,
            args.vine_truncation_penalty,
        )
        # Later requirements and subclasses read the same outcomes; the trainer also merges the returned field.
        batch_fields["rewards"] = rewards.to(batch_fields["rewards"].dtype).to(batch_fields["rewards"].device)
        loss_mask = batch_fields["loss_mask"].cpu()
        active = ((loss_mask.sum(dim=1) > 0) & ~torch.isnan(rewards)).tolist()

        # ── steps and the states to estimate ──
        tokenizer = self._tokenizer

        def batch_decode(seqs):
            return tokenizer.batch_decode(seqs, skip_special_tokens=True, clean_up_tokenization_spaces=False)

        completions = [r["completion_ids"] if a else [] for r, a in zip(rows, active)]
        if batch_fields.get("segment_ids") is not None:
            # macro_action is set: the states are the macro-action boundaries (prepared by MacroActionMixin).
            macro_ids = batch_fields["segment_ids"].cpu()
            macro_ids = torch.where(torch.tensor(active)[:, None], macro_ids, torch.full_like(macro_ids, -1))
            boundaries, parse_failed = segment_ids_to_boundaries(macro_ids), 0
            segment_ids = boundaries_to_segment_ids(boundaries, T)
        else:
            segment_ids, boundaries, parse_failed = segment_completions(
                completions,
                T,
                step_split=args.step_split,
                batch_decode=batch_decode,
                chunk_tokens=args.vine_chunk_tokens,
                special_token_ids=set(tokenizer.all_special_ids) | set(self.eos_token_ids),
            )
        num_segments = (segment_ids.max(dim=1).values + 1).clamp(min=0)
        S = max(int(num_segments.max()), 1)
        estimated, interpolated = estimated_state_mask(num_segments, S, args.vine_max_steps, args.vine_boundary_stride)
        if batch_fields.get("estimated_states") is not None:  # the segmentation chose its states (SPO's cutpoints)
            chosen = batch_fields["estimated_states"].cpu().bool()
            estimated = estimated & torch.nn.functional.pad(chosen, (0, max(S - chosen.size(1), 0)))[:, :S]

        # ── Monte-Carlo rollouts of the unique states ──
        plan = VinePlan(
            [r["prompt_ids"] for r in rows],
            [r["completion_ids"] for r in rows],
            boundaries,
            estimated,
            rewards,
            self._vine_group_keys(rows, G),
            max_completion_length=args.max_completion_length,
            num_rollouts=args.vine_num_rollouts,
            tree_reuse=args.vine_tree_reuse,
            truncation_penalty=args.vine_truncation_penalty,
            eos_token_ids=self.eos_token_ids,
        )
        if self._vine_backend is None:
            self._vine_backend = make_rollout_backend(self, args.vine_rollout_batch_size)
        stats = run_mc_rollouts(
            plan,
            self._vine_backend,
            lambda states, ids: self._vine_score(rows, [plan.states[s].source_row for s in states], ids),
            eos_token_ids=self.eos_token_ids,
            truncation_penalty=args.vine_truncation_penalty,
            adaptive_k_min=args.vine_adaptive_k_min if args.vine_adaptive_k else None,
            collective=AccelerateCollective(accelerator),
            progress=not args.disable_tqdm,
        )
        values = plan.row_values(stats.value_sum, stats.count)
        values = interpolate_state_values(segment_ids, values, rewards, interpolated)

        # ── diagnostics ──
        elapsed = time.perf_counter() - start
        self._vine_rollout_time += elapsed
        main_tokens = sum(len(r["completion_ids"]) for r in rows)
        rollouts = float(stats.rollouts.sum())
        state_values = stats.values[~torch.isnan(stats.values)]
        metrics = self._metrics["train"]
        metrics["credit/mc_unique_states"].append(float(plan.num_states))
        metrics["credit/mc_rollouts"].append(rollouts)
        metrics["credit/mc_generated_tokens"].append(float(stats.generated_tokens.sum()))
        metrics["credit/mc_tokens_ratio"].append(float(stats.generated_tokens.sum()) / max(main_tokens, 1))
        metrics["credit/mc_truncation_rate"].append(float(stats.truncated.sum()) / rollouts if rollouts else 0.0)
        metrics["credit/mc_value_mean"].append(float(state_values.mean()) if state_values.numel() else math.nan)
        metrics["credit/mc_backend_calls"].append(float(stats.backend_calls))
        metrics["credit/mc_time_s"].append(elapsed)
        metrics["credit/parse_failed"].append(float(parse_failed))
        metrics["credit/vine_truncated_completions"].append(float(truncated.float().mean()) if N else 0.0)
        if args.vine_tree_reuse:
            free = sum(max(len(s.members) - 1, 0) for s in plan.states)
            metrics["credit/mc_free_samples"].append(float(free))
        if args.vine_adaptive_k:
            metrics["credit/mc_stopped_early"].append(float(stats.stopped_early))
        return {
            "segment_ids": segment_ids,
            "segment_values": values.to(torch.float32),
            "rewards": batch_fields["rewards"],
        }

    @staticmethod
    def _vine_group_keys(rows: list[dict], G: int) -> list[int]:
        """Per row, the first group with the same prompt and reward inputs: repeated prompts share their states."""
        firsts: list[int] = []
        keys = []
        for g in range(len(rows) // G):
            head = rows[g * G]
            key = g
            for h in firsts:
                other = rows[h * G]
                try:
                    same = other["prompt_ids"] == head["prompt_ids"] and bool(other["inputs"] == head["inputs"])
                except Exception:  # noqa: BLE001 - inputs without a plain equality (arrays): never merged
                    same = False
                if same:
                    key = h
                    break
            if key == g:
                firsts.append(g)
            keys.extend([key] * G)
        return keys

    # ── scoring: the reward functions, called directly ─────────────────────────────────────────────────────────────
    def _vine_decode(self, prompts: list, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list:
        """Completions as TRL's `_generate` hands them to reward functions."""
        from trl.data_utils import is_conversational

        if is_conversational({"prompt": prompts[0]}):
            tokenizer = self._tokenizer
            if getattr(tokenizer, "response_template", None) is not None or getattr(
                tokenizer, "response_schema", None
            ) is not None:
                from trl.chat_template_utils import parse_response

                return [
                    [parse_response(tokenizer, ids, prefix=p_ids, tools=None)]
                    for ids, p_ids in zip(completion_ids, prompt_ids)
                ]
            contents = self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
            return [[{"role": "assistant", "content": content}] for content in contents]
        return self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)

    def _vine_score(self, rows: list[dict], source_rows: list[int], completion_ids: list[list[int]]) -> list[float]:
        """
        Rewards of rollouts `prompt + completion` (weighted sum over reward functions, `NaN` if all return `None`).
        Not `_calculate_rewards`: that one gathers across processes and writes to the completions table.
        """
        from trl.data_utils import apply_chat_template, is_conversational
        from trl.trainer.utils import is_async_callable

        prompts = [rows[r]["prompt"] for r in source_rows]
        prompt_ids = [rows[r]["prompt_ids"] for r in source_rows]
        completions = self._vine_decode(prompts, prompt_ids, completion_ids)
        keys = list(rows[source_rows[0]]["inputs"])
        reward_kwargs = {key: [rows[r]["inputs"].get(key) for r in source_rows] for key in keys}
        # No-op logging hooks: rollouts are not rows of the completions table.
        reward_kwargs.update(trainer_state=self.state, log_extra=_noop, log_metric=_noop)
        rewards = torch.full((len(prompts), len(self.reward_funcs)), math.nan, dtype=torch.float32)
        for i, (reward_func, processing_class) in enumerate(zip(self.reward_funcs, self.reward_processing_classes)):
            if isinstance(reward_func, nn.Module):
                if is_conversational({"prompt": prompts[0]}):
                    texts = [
                        apply_chat_template({"messages": p + c}, processing_class, **self.chat_template_kwargs)["text"]
                        for p, c in zip(prompts, completions)
                    ]
                else:
                    texts = [p + c for p, c in zip(prompts, completions)]
                inputs = processing_class(
                    text=texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False
                ).to(self.accelerator.device)
                with torch.inference_mode():
                    rewards[:, i] = reward_func(**inputs).logits[:, 0].float().cpu()
                continue
            call = dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **reward_kwargs)
            if is_async_callable(reward_func):
                output = asyncio.run_coroutine_threadsafe(reward_func(**call), self.async_loop).result()
            else:
                output = reward_func(**call)
            if len(output) != len(prompts):
                raise ValueError(
                    f"The reward function {reward_func!r} returned {len(output)} rewards for {len(prompts)} "
                    "VinePPO rollouts; it must return one reward per completion."
                )
            rewards[:, i] = torch.tensor([math.nan if r is None else float(r) for r in output], dtype=torch.float32)
        weights = self.reward_weights.detach().cpu().to(torch.float32)
        rewards, _ = nonfinite_rewards_to_nan(rewards, weights)  # the trainer's rule: ±inf is unscorable (NaN)
        total = (rewards * weights[None, :]).nansum(dim=1)
        total[torch.isnan(rewards).all(dim=1)] = math.nan
        return total.tolist()
