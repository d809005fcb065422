r"""
`SPOTreeMixin`: the trainer side of SPO-tree ([SPO](https://huggingface.co/papers/2505.23564)), orchestration only.

With `advantage_estimator="spo_tree"`, a training batch's group is sampled as a tree instead of `G` independent
completions (spec §9.3):

1. **Generation** (`_generate_single_turn`, the single-turn primitive TRL's `_generate` calls once per batch): gather
   the prompt rows of every process (a group may straddle two), take each group's prompt once, and sample its tree
   level by level through the rollout engine (`trl_credit.generation.rollouts.run_tree_rollouts`: the same backends
   as the Monte-Carlo rollouts, an equal share of every level per process). The tree's `Π b_d` leaf slots are the
   group's candidate completions (an early leaf fills its whole subtree); `num_generations = G` of them are trained
   (all of them when `G = Π b_d`, else a seeded uniform subset) and returned as this process's completions, with
   their sampling log-probs under vLLM. TRL's prompt tokenization, weight sync, decoding, rewards, logging and loss
   stay TRL's. Evaluation, and the nested calls the rollout backends make, use TRL's own generation (a re-entrancy
   flag).
2. **Credit** (the `"segments"` requirement): the tree level of every token (`segment_ids`), each trained row's path
   (`tree_paths`), the node values along it from every slot of its tree (`segment_values`; leaves that no trained row
   reaches are scored by calling the reward functions directly, an equal share per process), and the probability
   mask (`cutpoint_mask`, from the same log-probs as SPO-chain: `SPOMixin._spo_local_logps`). The `"spo_tree"`
   estimator (`trl_credit.credit.spo_tree`) turns them into advantages and a loss mask.

Logged under `credit/`: `spo_tree_nodes`, `spo_tree_leaves`, `spo_tree_early_leaves`, `spo_tree_truncated_leaves`
(means per tree), `spo_tree_level{d}_nodes` (the realized shape: nodes per tree at each level), `spo_tree_slots`,
`spo_tree_trained_slots`, `spo_tree_generated_tokens`, `spo_tree_tokens_per_trained_token` (tokens the tree decoded
per token of the trained completions), `spo_tree_value_only_leaves` (leaves scored for values only),
`spo_tree_backend_calls`, `spo_tree_time_s`, next to the estimator's `spo_tree_*` metrics.

Tools, environments, `rollout_func` and images are rejected: a tree level continues token prefixes with the policy.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from typing import Any

import torch

from ..credit.spo import probability_mask
from ..credit.spo_tree import (
    compute_spo_tree_advantages,
    num_tree_slots,
    tree_node_values,
    tree_paths_tensor,
    tree_segment_ids,
)
from ..generation.rollouts import (
    AccelerateCollective,
    TreeRollouts,
    _share,
    make_rollout_backend,
    run_tree_rollouts,
    widen_vllm_max_num_seqs,
)
from .hooks import CreditHooks


def _is_spo_tree(estimator_name: str | None) -> bool:
    from ..credit import get_advantage_estimator

    try:
        return estimator_name is not None and get_advantage_estimator(estimator_name) is compute_spo_tree_advantages
    except ValueError:
        return False


class SPOTreeMixin(CreditHooks):
    """
    Samples the training group as a tree and answers the `"segments"` requirement of the `"spo_tree"` estimator;
    everything else goes to the next class in the MRO. Place it among the bases of `trl_credit.GRPOTrainer`, before
    the mixins that also answer `"segments"`.
    """

    def __init__(self, *args, **kwargs):
        config = kwargs.get("args")
        factor = 1
        if config is not None and _is_spo_tree(config.advantage_estimator):
            factor = max(1, num_tree_slots(config.spo_tree_shape) // config.num_generations)
        if factor > 1 and config.use_vllm and config.vllm_mode == "colocate":
            # TRL caps the colocated engine at the trained rows; a tree's last level has Π b_d / G times as many.
            with widen_vllm_max_num_seqs(factor):
                super().__init__(*args, **kwargs)
        else:
            super().__init__(*args, **kwargs)
        self._spo_tree_enabled = getattr(self, "credit_estimator", None) is compute_spo_tree_advantages
        self._spo_tree_building = False
        self._spo_tree_batch: dict[str, Any] | None = None
        self._spo_tree_backend = None
        if not self._spo_tree_enabled:
            return
        if self.tools or self.environment_factories is not None or self.rollout_func is not None:
            raise ValueError(
                "advantage_estimator='spo_tree' samples the group as a tree by continuing token prefixes with the "
                "policy, which cannot replay tool calls, environments or a custom rollout_func. Remove "
                "tools/environment_factory/rollout_func, or use an estimator that keeps TRL's generation (e.g. "
                "'grpo' or 'tempo')."
            )
        slots = num_tree_slots(self.args.spo_tree_shape)
        if slots != self.num_generations:
            warnings.warn(
                f"advantage_estimator='spo_tree' with spo_tree_shape={self.args.spo_tree_shape} samples {slots} "
                f"completions per prompt and trains num_generations={self.num_generations} of them; the other "
                f"{slots - self.num_generations} only serve as values ({slots // self.num_generations}× the tokens "
                f"of training every slot). Set num_generations={slots} to train every slot.",
                stacklevel=2,
            )

    # ── generation: the group as a tree ────────────────────────────────────────────────────────────────────────────
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if not self._spo_tree_enabled or self._spo_tree_building or not self.model.training:
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images=has_tool_images
            )
        return self._spo_tree_generate(prompt_ids, images, multimodal_fields, num_generations)

    def _spo_tree_generate(self, prompt_ids, images, multimodal_fields, num_generations):
        start = time.perf_counter()
        args = self.args
        accelerator = self.accelerator
        self._spo_tree_batch = None
        if images is not None and any(img is not None for img in images) or multimodal_fields:
            raise ValueError(
                "advantage_estimator='spo_tree' continues token prefixes level by level and does not support image "
                "inputs; use a text-only dataset or another estimator."
            )
        G = num_generations
        shape = tuple(args.spo_tree_shape)
        slots = num_tree_slots(shape)
        if G < 1 or slots % G:
            raise ValueError(f"num_generations={G} must divide the tree's {slots} leaf slots (spo_tree_shape={shape}).")

        # ── every process's prompt rows; a group is G consecutive copies of one prompt ──
        local = [list(ids) for ids in prompt_ids]
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            rows = gather_object(local)
        else:
            rows = local
        if len(rows) % G:
            raise RuntimeError(f"The generation batch of {len(rows)} prompts is not made of whole groups of {G}.")
        P = len(rows) // G
        heads = [rows[p * G] for p in range(P)]
        if any(rows[p * G + k] != heads[p] for p in range(P) for k in range(G)):
            raise RuntimeError(
                "SPO-tree expects each prompt repeated num_generations times on consecutive rows (TRL's "
                "RepeatSampler); this generation batch is not."
            )

        # ── the trees, level by level, through the rollout engine ──
        if self._spo_tree_backend is None:
            self._spo_tree_backend = make_rollout_backend(self, args.vine_rollout_batch_size)
        self._spo_tree_building = True  # nested backend calls go to TRL's _generate_single_turn
        try:
            tree = run_tree_rollouts(
                heads,
                shape,
                args.spo_tree_segment_tokens,
                args.max_completion_length,
                self._spo_tree_backend,
                eos_token_ids=self.eos_token_ids,
                collective=AccelerateCollective(accelerator),
                logprobs=self.use_vllm,
                progress=not args.disable_tqdm,
            )
        finally:
            self._spo_tree_building = False

        # ── the trained slots and their completions (global row order) ──
        slot_paths = [tree.slot_paths(p) for p in range(P)]
        trained = self._spo_tree_trained_slots(P, G, slots)
        completions = [tree.completion(p, slot_paths[p][k]) for p in range(P) for k in trained[p]]
        self._spo_tree_batch = {
            "tree": tree,
            "slot_paths": slot_paths,
            "trained": trained,
            "completion_ids": [c[0] for c in completions],
            "segment_lengths": [c[2] for c in completions],
            "time": time.perf_counter() - start,
        }
        B = len(prompt_ids)
        mine = completions[accelerator.process_index * B : (accelerator.process_index + 1) * B]
        completion_ids = [c[0] for c in mine]
        logprobs = [c[1] for c in mine] if self.use_vllm else None
        return completion_ids, logprobs

    def _spo_tree_trained_slots(self, P: int, G: int, slots: int) -> list[list[int]]:
        """Per prompt, the trained slot indices: all of them, or a uniform subset of `G` drawn with a seed that is the
        same on every process (the config's seed and TRL's step counter)."""
        if G == slots:
            return [list(range(slots)) for _ in range(P)]
        rng = random.Random(int(self.args.seed) * 1_000_003 + int(self._step))
        return [sorted(rng.sample(range(slots), G)) for _ in range(P)]

    # ── credit: the "segments" requirement ─────────────────────────────────────────────────────────────────────────
    def _credit_requirement(self, requirement: str, out, ctx, batch_fields) -> dict[str, Any]:
        if requirement == "segments" and self._spo_tree_enabled:
            return self._spo_tree_fields(out, ctx, batch_fields)
        return super()._credit_requirement(requirement, out, ctx, batch_fields)

    def _spo_tree_fields(self, out: dict[str, Any], ctx: dict[str, Any], batch_fields: dict[str, Any]):
        start = time.perf_counter()
        args = self.args
        state, self._spo_tree_batch = self._spo_tree_batch, None
        N, T = batch_fields["completion_ids"].shape
        if state is None or len(state["completion_ids"]) != N:
            raise RuntimeError(
                "advantage_estimator='spo_tree' found no tree for this generation batch: the completions were not "
                "generated by SPOTreeMixin._generate_single_turn (a custom generation path?)."
            )
        B = len(ctx["completion_ids_list"])
        rank = self.accelerator.process_index
        if [list(c) for c in ctx["completion_ids_list"]] != state["completion_ids"][rank * B : (rank + 1) * B]:
            raise RuntimeError("The batch's completions are not the trained slots of the sampled trees.")
        tree: TreeRollouts = state["tree"]
        slot_paths, trained = state["slot_paths"], state["trained"]
        shape, D = tree.shape, len(tree.shape)
        slots = num_tree_slots(shape)
        P, G = len(trained), N // len(trained)
        pairs = [(p, k) for p in range(P) for k in trained[p]]

        # ── the reward of every slot: trained rows, then the leaves only values need ──
        rewards = batch_fields["rewards"].detach().cpu().to(torch.float64)
        leaf_reward: dict[tuple[int, tuple[int, ...]], float] = {}
        for j, (p, k) in enumerate(pairs):
            leaf_reward.setdefault((p, slot_paths[p][k]), float(rewards[j]))
        missing = sorted({(p, path) for p in range(P) for path in slot_paths[p]} - set(leaf_reward))
        if missing:
            for key, value in zip(missing, self._spo_tree_score(out, ctx, tree, missing, G)):
                leaf_reward[key] = value
        slot_rewards = torch.tensor([leaf_reward[(p, path)] for p in range(P) for path in slot_paths[p]])
        all_paths = tree_paths_tensor([path for p in range(P) for path in slot_paths[p]], D)
        values = tree_node_values(slot_rewards, all_paths, slots)
        rows = torch.tensor([p * slots + k for p, k in pairs], dtype=torch.long)

        device = batch_fields["completion_mask"].device
        fields: dict[str, Any] = {
            "segment_ids": tree_segment_ids(state["segment_lengths"], T).to(device),
            "segment_values": values[rows].to(device),
            "tree_paths": all_paths[rows].to(device),
        }
        if args.spo_prob_mask:
            logps, _ = self._spo_local_logps(out)
            logps = torch.where(torch.isnan(logps), torch.zeros_like(logps), logps)  # p = 1: never a cutpoint
            logps = self._gather_rows(logps.float().contiguous(), 0.0).cpu()
            mask = batch_fields["completion_mask"].cpu()
            if logps.size(1) < T:
                logps = torch.nn.functional.pad(logps, (0, T - logps.size(1)))
            fields["cutpoint_mask"] = probability_mask(logps[:, :T], mask, rho=args.spo_cutpoint_threshold).to(device)

        # ── diagnostics ──
        metrics = self._metrics["train"]
        per_tree = [tree.nodes[p].values() for p in range(P)]
        metrics["credit/spo_tree_nodes"].append(sum(len(n) for n in tree.nodes) / max(P, 1))
        metrics["credit/spo_tree_leaves"].append(sum(sum(x.leaf for x in n) for n in per_tree) / max(P, 1))
        early = sum(1 for n in tree.nodes for path, x in n.items() if x.leaf and len(path) < D)
        metrics["credit/spo_tree_early_leaves"].append(early / max(P, 1))
        truncated = sum(1 for n in tree.nodes for x in n.values() if x.truncated)
        metrics["credit/spo_tree_truncated_leaves"].append(truncated / max(P, 1))
        for d in range(D):
            level = sum(1 for n in tree.nodes for path in n if len(path) == d + 1)
            metrics[f"credit/spo_tree_level{d}_nodes"].append(level / max(P, 1))
        metrics["credit/spo_tree_slots"].append(float(slots))
        metrics["credit/spo_tree_trained_slots"].append(float(G))
        trained_tokens = sum(len(c) for c in state["completion_ids"])
        metrics["credit/spo_tree_generated_tokens"].append(float(tree.generated_tokens))
        metrics["credit/spo_tree_tokens_per_trained_token"].append(tree.generated_tokens / max(trained_tokens, 1))
        metrics["credit/spo_tree_value_only_leaves"].append(float(len(missing)))
        metrics["credit/spo_tree_backend_calls"].append(float(tree.backend_calls))
        metrics["credit/spo_tree_time_s"].append(state["time"] + time.perf_counter() - start)
        return fields

    def _spo_tree_score(self, out: dict[str, Any], ctx: dict[str, Any], tree: TreeRollouts, leaves: list, G: int):
        """Rewards of the leaves no trained row reaches, from the reward functions called directly (`_vine_score`),
        an equal share per process, gathered; `NaN` = unscorable."""
        accelerator = self.accelerator
        prompt_ids = [ids[m.bool()].tolist() for ids, m in zip(out["prompt_ids"].cpu(), out["prompt_mask"].cpu())]
        skip = ("prompt", "completion", "completion_ids")
        local_rows = [
            {"prompt_ids": p_ids, "prompt": prompt, "inputs": {k: v for k, v in row.items() if k not in skip}}
            for p_ids, prompt, row in zip(prompt_ids, ctx["prompts"], ctx["inputs"], strict=True)
        ]
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            rows = gather_object(local_rows)
        else:
            rows = local_rows
        collective = AccelerateCollective(accelerator)
        mine = _share(list(range(len(leaves))), collective.rank, collective.world)
        size = math.ceil(len(leaves) / collective.world)
        values = torch.full((size,), math.nan, dtype=torch.float64)
        if mine:
            ids = [tree.completion(leaves[i][0], leaves[i][1])[0] for i in mine]
            scored = self._vine_score(rows, [leaves[i][0] * G for i in mine], ids)
            values[: len(mine)] = torch.tensor([math.nan if v is None else float(v) for v in scored])
        gathered = collective.gather(values[:, None])  # (W, size, 1)
        out = []
        for w in range(collective.world):
            out.extend(gathered[w, : len(_share(list(range(len(leaves))), w, collective.world)), 0].tolist())
        return out
