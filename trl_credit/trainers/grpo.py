"""`trl_credit.GRPOTrainer`: TRL's `GRPOTrainer` whose advantages come from a credit-assignment estimator.

Orchestration only; the math lives in `trl_credit.credit`. The seam (TRL has no advantage hook, huggingface/trl#4525):

1. `_calculate_rewards` calls TRL's, turns every reward that is not a finite number into `NaN` (unscorable, as a
   reward function returning `None`; one rule for TRL's own advantage and logs and for every estimator) and keeps the
   gathered `(N, n_funcs)` rewards;
2. `_generate_and_score_completions` calls TRL's, gathers the generation batch across ranks (a prompt's group may
   straddle two ranks), builds a `CreditBatch`, runs the configured estimator, slices this rank's rows back, and
   replaces `out["advantages"]` (`(B,)` or `(B, T)`; TRL's `_compute_loss` broadcasts both);
3. `self._logs["advantages"]` keeps one number per completion (the completions table expects scalars).

With `advantage_estimator="grpo"` the result is identical to `trl.GRPOTrainer` (same loss, same parameters).
"""

from __future__ import annotations

import math
import time
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from trl import GRPOTrainer as _TRLGRPOTrainer

from .._compat import check_trl_compatibility
from ..configs import GRPOConfig
from ..credit import CreditBatch, CreditOutput, call_estimator, get_advantage_estimator
from ..credit.batch import nonfinite_rewards_to_nan
from ..generation.vllm_cpu import prepare_for_training
from ..rewards.checks import validated_reward_funcs
from .macro_actions import MacroActionMixin
from .monte_carlo import VinePPOMixin
from .spo import SPOMixin
from .spo_tree import SPOTreeMixin
from .token_weights import TokenWeightingMixin


check_trl_compatibility()


# Trainers of this process whose colocated vLLM engine may still be running (see `_refuse_a_second_colocated_engine`).
_COLOCATED_TRAINERS: weakref.WeakSet = weakref.WeakSet()


def _has_live_colocated_engine(trainer) -> bool:
    llm = getattr(getattr(trainer, "vllm_generation", None), "llm", None)
    if llm is None:
        return False
    finalizer = getattr(getattr(getattr(llm, "llm_engine", None), "engine_core", None), "_finalizer", None)
    return finalizer is None or finalizer.alive  # vLLM's in-process client: alive until its engine shut down


def _refuse_a_second_colocated_engine(args) -> None:
    """
    One colocated vLLM engine per process. A second one starts, but it shares the process's distributed state with the
    first, and when the first trainer is garbage-collected its engine's shutdown destroys that state: the second
    trainer then fails at its first step ("Default process group has not been initialized"), typically in a notebook
    or a sweep that reassigns `trainer = GRPOTrainer(...)`. Refused here, with the fix, instead.
    """
    if not (args.use_vllm and args.vllm_mode == "colocate"):
        return
    live = [t for t in list(_COLOCATED_TRAINERS) if _has_live_colocated_engine(t)]
    if live:
        raise RuntimeError(
            f"A trainer with a colocated vLLM engine already exists in this process ({type(live[0]).__name__}, "
            f"output_dir={live[0].args.output_dir!r}). Two colocated engines cannot share a process: when the first "
            "trainer is garbage-collected, its engine's shutdown destroys the distributed state the second one uses. "
            "Delete the first trainer before building this one (`del trainer; import gc; gc.collect()`), or run each "
            "training in its own process."
        )


class GRPOTrainer(SPOTreeMixin, SPOMixin, VinePPOMixin, TokenWeightingMixin, MacroActionMixin, _TRLGRPOTrainer):
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
        if args.reward_weights is not None and not all(math.isfinite(w) for w in args.reward_weights):
            raise ValueError(
                f"reward_weights must be finite numbers, got {args.reward_weights}: an infinite weight makes every "
                "weighted reward non-finite, hence every completion unscorable."
            )
        self.credit_estimator = get_advantage_estimator(args.advantage_estimator)
        _refuse_a_second_colocated_engine(args)
        # vLLM's CPU build: the engine settings of the config (KV cache, packed kernels re-packed after each sync)
        prepare_for_training(args)
        self._credit_ctx: dict[str, Any] | None = None
        self._warned_nonfinite_rewards = False
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
        if args.use_vllm and args.vllm_mode == "colocate":
            _COLOCATED_TRAINERS.add(self)

    # ── seam 1: keep the gathered rewards ──────────────────────────────────────────────────────────────────────────
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        with validated_reward_funcs(self):  # a reward that is not a number: an error naming the function
            rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        rewards_per_func = self._unscorable_nonfinite(rewards_per_func)
        self._credit_ctx = {
            "inputs": inputs,
            "prompts": prompts,
            "completions": completions,
            "completion_ids_list": completion_ids_list,
            "rewards_per_func": rewards_per_func,
        }
        return rewards_per_func

    def _unscorable_nonfinite(self, rewards_per_func: torch.Tensor) -> torch.Tensor:
        """±inf rewards (and completions whose weighted reward overflows) → `NaN`, before TRL's advantage, TRL's reward
        logs and every estimator see them; counted in `credit/nonfinite_rewards` (values over the global batch)."""
        sanitized, replaced = nonfinite_rewards_to_nan(rewards_per_func, self.reward_weights)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["credit/nonfinite_rewards"].append(float(replaced))
        if replaced and not self._warned_nonfinite_rewards:
            self._warned_nonfinite_rewards = True
            per_func = (torch.isnan(sanitized) & ~torch.isnan(rewards_per_func)).sum(0).tolist()
            names = [name for name, k in zip(self.reward_func_names, per_func, strict=True) if k]
            warnings.warn(
                f"{replaced} reward value(s) from {names} were not finite numbers (±inf, or a weighted sum that "
                "overflows): each is treated like a reward function returning None, and a completion left with no "
                "finite reward is unscorable (advantage 0). Counted in credit/nonfinite_rewards; shown once.",
                stacklevel=2,
            )
        return sanitized

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

        # ── the estimator, on the global batch (its output is validated: shape, dtype, finite on loss tokens) ──
        result = call_estimator(self.credit_estimator, batch, self.args)
        advantages = result.advantages.to(torch.float32)
        # Exactly 0 outside the loss mask (whatever the estimator left there), so that `0 · NaN` never reaches the loss.
        in_loss = batch.mask > 0 if advantages.dim() == 2 else (batch.mask > 0).any(dim=1)
        advantages = torch.where(in_loss, advantages, torch.zeros_like(advantages))

        # ── back to this rank's rows and columns, then per-completion transforms (token weights) ──
        local = advantages[rows]
        if local.dim() == 2:
            local = local[:, :T]
        if result.loss_mask is not None:  # the estimator's loss mask joins TRL's before token weights see it
            self._apply_credit_loss_mask(out, result.loss_mask[rows, :T])
        loss_mask = out["completion_mask"] if "tool_mask" not in out else out["completion_mask"] * out["tool_mask"]
        local = self._credit_local_postprocess(local, out, ctx)
        if local.dim() == 2:
            local = torch.where(loss_mask > 0, local, torch.zeros_like(local))
        out["advantages"] = local.to(out["advantages"].dtype)
        if result.returns is not None:
            out["returns"] = result.returns[rows, :T].to(torch.float32)
        self._log_credit(local, loss_mask, result)

    def _apply_credit_loss_mask(self, out: dict[str, Any], loss_mask: torch.Tensor) -> None:
        """
        Multiply an estimator's `CreditOutput.loss_mask` (this rank's rows) into TRL's loss mask. TRL 1.16's
        `_compute_loss` uses `completion_mask * tool_mask` for the surrogate, the `beta` KL term and every normalizer
        (`grpo`/`sapo`/`bnpo` mask sums, `dapo`/`cispo`/`vespo` `num_items_in_batch`), so a token with weight 0
        leaves all of them; `num_items_in_batch` is recomputed as the global sum of the new mask, as TRL computes it.
        """
        weights = loss_mask.to(device=out["completion_mask"].device, dtype=torch.float32)
        tool_mask = out.get("tool_mask")
        out["tool_mask"] = weights if tool_mask is None else tool_mask * weights
        new_mask = out["completion_mask"] * out["tool_mask"]
        out["num_items_in_batch"] = self.accelerator.gather(new_mask.sum()).sum()

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
            "completion_mask": self._gather_rows(self._generated_mask(out, ctx), 0),
            "loss_mask": self._gather_rows(loss_mask, 0),
            "rewards": rewards,
            "num_generations": self.num_generations,
            "rewards_per_func": rewards_per_func,
            "reward_weights": weights,
        }

    @staticmethod
    def _generated_mask(out: dict[str, Any], ctx: dict[str, Any]) -> torch.Tensor:
        """
        `(B, T)`: 1 on every generated token (EOS included) from the real completion lengths. TRL's `completion_mask`
        is all zeros for truncated rows under `mask_truncated_completions=True`: that is a loss mask, and a truncated
        completion still shares its prefix with its group (prefix trees, segments); the loss mask stays TRL's.
        """
        mask = out["completion_mask"]
        lengths = torch.tensor([len(ids) for ids in ctx["completion_ids_list"]], device=mask.device)
        if lengths.numel() != mask.size(0) or bool((lengths > mask.size(1)).any()):
            raise RuntimeError(
                f"The generated completion lengths {lengths.tolist()} do not fit the padded completions of shape "
                f"{tuple(mask.shape)}."
            )
        return (torch.arange(mask.size(1), device=mask.device)[None, :] < lengths[:, None]).to(mask.dtype)

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
