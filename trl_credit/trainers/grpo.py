"""`trl_credit.GRPOTrainer`: TRL's `GRPOTrainer` whose advantages come from a credit-assignment estimator.

Orchestration only; the math lives in `trl_credit.credit`. The seam (TRL has no advantage hook, huggingface/trl#4525):

1. `_calculate_rewards` calls TRL's and keeps the gathered `(N, n_funcs)` rewards;
2. `_generate_and_score_completions` calls TRL's, gathers the generation batch across ranks (a prompt's group may
   straddle two ranks), builds a `CreditBatch`, runs the configured estimator, slices this rank's rows back, and
   replaces `out["advantages"]` (`(B,)` or `(B, T)`; TRL's `_compute_loss` broadcasts both);
3. `self._logs["advantages"]` keeps one number per completion (the completions table expects scalars).

With `advantage_estimator="grpo"` the result is identical to `trl.GRPOTrainer` (same loss, same parameters).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from trl import GRPOTrainer as _TRLGRPOTrainer

from .._compat import check_trl_compatibility
from ..configs import GRPOConfig
from ..credit import CreditBatch, CreditOutput, call_estimator, get_advantage_estimator
from .macro_actions import MacroActionMixin
from .monte_carlo import VinePPOMixin
from .token_weights import TokenWeightingMixin


check_trl_compatibility()


class GRPOTrainer(VinePPOMixin, TokenWeightingMixin, MacroActionMixin, _TRLGRPOTrainer):
    """
    Drop-in replacement for [`trl.GRPOTrainer`] with token-level credit assignment. Same constructor; `args` is a
    [`trl_credit.GRPOConfig`], whose `advantage_estimator` selects the estimator (`"grpo"`, `"tempo"`, `"gigpo"`, …).

    Example:
    ```python
    from trl_credit import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir="out", advantage_estimator="tempo")
    trainer = GRPOTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", reward_funcs=my_reward, args=args, train_dataset=ds)
    trainer.train()
    ```

    Credit is assigned in training only; evaluation batches keep TRL's GRPO advantage (they are used for the eval
    loss only, and expensive estimators such as Monte-Carlo rollouts would dominate evaluation time).
    """

    _tag_names = ["trl", "grpo", "trl-credit"]
    _name = "GRPO (trl-credit)"

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: GRPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tools: list[Callable] | None = None,
        rollout_func=None,
        environment_factory=None,
    ):
        if args is None:
            from trl.trainer.utils import get_config_model_id

            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = GRPOConfig(f"{model_name.split('/')[-1]}-GRPO")
        elif not isinstance(args, GRPOConfig):
            raise TypeError(
                f"args must be a trl_credit.GRPOConfig (got {type(args).__module__}.{type(args).__name__}): use "
                "`from trl_credit import GRPOConfig`; it accepts every trl.GRPOConfig option plus the credit fields."
            )
        self.credit_estimator = get_advantage_estimator(args.advantage_estimator)
        self._credit_ctx: dict[str, Any] | None = None
        super().__init__(
            model=model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            reward_processing_classes=reward_processing_classes,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
            tools=tools,
            rollout_func=rollout_func,
            environment_factory=environment_factory,
        )
        if args.advantage_estimator != "grpo" and self.model is not None:
            self.model.add_model_tags([args.advantage_estimator])

    # ── seam 1: keep the gathered rewards ──────────────────────────────────────────────────────────────────────────
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._credit_ctx = {
            "inputs": inputs,
            "prompts": prompts,
            "completions": completions,
            "completion_ids_list": completion_ids_list,
            "rewards_per_func": rewards_per_func,
        }
        return rewards_per_func

    # ── seam 2: replace the advantages ─────────────────────────────────────────────────────────────────────────────
    def _generate_and_score_completions(self, inputs):
        self._credit_ctx = None
        out = super()._generate_and_score_completions(inputs)
        ctx, self._credit_ctx = self._credit_ctx, None
        if ctx is None or not self.model.training:
            return out
        start = time.perf_counter()
        self._assign_credit(out, ctx)
        self._metrics["train"]["credit/time_s"].append(time.perf_counter() - start)
        return out

    def _assign_credit(self, out: dict[str, Any], ctx: dict[str, Any]) -> None:
        B, T = out["completion_ids"].shape
        rank = self.accelerator.process_index
        rows = slice(rank * B, (rank + 1) * B)

        # ── the global generation batch (groups may straddle ranks) ──
        batch_fields = self._credit_batch_fields(out, ctx)
        # Segments first: other requirements (Monte-Carlo states) are placed at their boundaries.
        for requirement in sorted(self.credit_estimator.credit_requires, key=lambda r: (r != "segments", r)):
            batch_fields.update(self._credit_requirement(requirement, out, ctx, batch_fields))
        batch = CreditBatch(**batch_fields)

        # ── the estimator, on the global batch ──
        result = call_estimator(self.credit_estimator, batch, self.args)
        advantages = torch.nan_to_num(result.advantages.to(torch.float32), nan=0.0, posinf=0.0, neginf=0.0)

        # ── back to this rank's rows and columns, then per-completion transforms (token weights) ──
        local = advantages[rows]
        if local.dim() == 2:
            local = local[:, :T]
        loss_mask = out["completion_mask"] if "tool_mask" not in out else out["completion_mask"] * out["tool_mask"]
        local = self._credit_local_postprocess(local, out, ctx)
        if local.dim() == 2:
            local = torch.where(loss_mask > 0, local, torch.zeros_like(local))
        out["advantages"] = local.to(out["advantages"].dtype)
        if result.returns is not None:
            out["returns"] = result.returns[rows, :T].to(torch.float32)
        self._log_credit(local, loss_mask, result)

    def _credit_batch_fields(self, out: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
        """The `CreditBatch` fields every estimator gets, over the global batch in TRL's row order."""
        rewards_per_func = ctx["rewards_per_func"]
        weights = self.reward_weights.to(rewards_per_func.device)
        # Same arithmetic as TRL's inline advantage code, so the "grpo" estimator reproduces it bit for bit.
        rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
        completion_mask = out["completion_mask"]
        loss_mask = completion_mask if "tool_mask" not in out else completion_mask * out["tool_mask"]
        return {
            "completion_ids": self._gather_rows(out["completion_ids"], self._tokenizer.pad_token_id),
            "completion_mask": self._gather_rows(completion_mask, 0),
            "loss_mask": self._gather_rows(loss_mask, 0),
            "rewards": rewards,
            "num_generations": self.num_generations,
            "rewards_per_func": rewards_per_func,
            "reward_weights": weights,
        }

    def _gather_rows(self, tensor: torch.Tensor, pad_value) -> torch.Tensor:
        """`(B, T_local)` on every rank → `(B·world, T_max)` in rank order (right-padded with `pad_value`)."""
        if self.accelerator.num_processes == 1:
            return tensor
        tensor = self.accelerator.pad_across_processes(tensor, dim=1, pad_index=pad_value)
        return self.accelerator.gather(tensor)

    # ── logging ────────────────────────────────────────────────────────────────────────────────────────────────────
    def _log_credit(self, advantages: torch.Tensor, loss_mask: torch.Tensor, result: CreditOutput) -> None:
        metrics = self._metrics["train"]
        mask = self._gather_rows(loss_mask.contiguous(), 0).to(torch.float32)
        if advantages.dim() == 1:
            per_completion = self.accelerator.gather(advantages.contiguous())
            advantages = per_completion[:, None].expand_as(mask)
        else:
            advantages = self._gather_rows(advantages.contiguous(), 0.0)
            per_completion = (advantages * mask).sum(1) / mask.sum(1).clamp(min=1)
        # TRL appended its own per-completion GRPO advantages; the completions table must show what is trained on
        # (one number per completion: the masked mean over its tokens).
        logged = self._logs["advantages"]
        for _ in range(min(len(per_completion), len(logged))):
            logged.pop()
        logged.extend(per_completion.tolist())
        values = advantages[mask > 0]
        if values.numel():
            metrics["credit/advantage_mean"].append(values.mean().item())
            metrics["credit/advantage_std"].append(values.std().item() if values.numel() > 1 else 0.0)
            metrics["credit/advantage_min"].append(values.min().item())
            metrics["credit/advantage_max"].append(values.max().item())
        for name, value in result.metrics.items():
            metrics[f"credit/{name}"].append(float(value))
