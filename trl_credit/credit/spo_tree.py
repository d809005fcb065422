r"""
SPO-tree: segment advantages from a group sampled as a tree ([SPO](https://huggingface.co/papers/2505.23564), Guo et
al., NeurIPS 2025, official code `AIFrameResearch/SPO`).

The `G_tree = Π_d b_d` completions of a prompt are sampled as a tree of shape `(b_0, …, b_{D−1})`: level `d` gives
every open node `b_d` children of `M` new tokens each (the last level runs to the horizon); a child that ends (EOS,
or the horizon) before its budget is an early leaf. The group's own samples are the values (no Monte-Carlo rollouts):

$$V(n) = \frac{1}{b}\sum_{c \in \mathrm{children}(n)} V(c), \qquad V(\mathrm{leaf}) = r, \qquad
A(n) = V(n) - V(\mathrm{parent}(n)),$$

and every token of the segment that created node `n` gets `A(n)`. Along a root-to-leaf path the advantages telescope
to `r − V(root)`; siblings sum to 0; a depth-1 tree is Dr. GRPO's `r − mean`.

**Slots and replication.** The completions of a prompt are its `G_tree` *slots* in lexicographic path order; a leaf
at depth `d < D − 1` fills all `Π_{j>d} b_j` slots of its subtree. Then "mean reward of the slots under a node"
equals the official recursive mean of children exactly (an early leaf weighs `1/b` in its parent like an expanded
sibling), so node values are computed here as slot means (`tree_node_values`). The segment values
`[V(root), V(node_0), V(node_1), …]` of each slot feed `compute_segment_gae(gamma=1, lam=0)`, whose last segment is
`r − V(parent)`.

**What is trained** (the loss mask `CreditOutput.loss_mask`, multiplied into TRL's loss mask by the trainer):

$$m_{i,t} = w_{i,t} \cdot \frac{1}{n_{i,t}} \cdot \mathbb 1[A_{\mathrm{seg}(t)} \ne 0]$$

- `w_{i,t} = 1[π_old(y_t) < ρ]`, the probability mask (`spo_prob_mask`, official `use_prob_mask: true`);
- `n_{i,t}` = trained rows through the node of token `t`'s segment (`spo_tree_node_weighting`): replicated rows
  (shared prefixes, replicated early leaves) have identical tokens, contexts and ratios, so every node weighs as one
  official *edge*, once;
- `1[A ≠ 0]` drops the segments the official code never trains (`spo_tree_skip_zero_advantage`,
  `only_adv_greater_than_zero`). `A` counts as 0 when `|A| ≤ 1e-6 · max(1, |V|)`.

Normalization `spo_advantage_norm`: `"batch"` (official whitening) `(A − mean)/sqrt(var + 1e-8)` with the loss-mask
weights as frequency weights (so each node counts once), `"group"` the same per prompt, `"none"` raw.

Deviations from the official code (spec §5, §8):
- segments are token ids (never re-tokenized text); the last level's budget is `max_completion_length − (D−1)·M`
  (official: a "free" 1024 tokens), and a node that reaches the horizon is a leaf (official: a crash);
- on-policy: the tree's nodes are trained in the step they were sampled, each once (no replay buffer, no 32-edge cap,
  no duplication up to a fixed episode count); a trained row is a whole root-to-leaf path whose segments carry their
  own advantages, instead of one episode per edge — the per-node loss weight `1/n` makes both the same sum;
- `num_generations < G_tree` trains a seeded uniform subset of the slots and uses the others for values only;
- the leaves are scored by the user's reward functions (official: the prompt text is part of the graded text, and a
  truncated last segment is graded on its own text);
- zero advantages are detected with the tolerance above (official: exact `!= 0` on Python floats).

Notation: `N` trained completions, `T` tokens, `G` trained rows per prompt, `D` levels, `b_d` children per node at
level `d`, `M` tokens per non-final segment.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .batch import CreditBatch, CreditOutput
from .registry import register_advantage_estimator
from .segment_gae import compute_segment_gae, segment_counts
from .spo import SPO_ADVANTAGE_NORMS, spo_normalize


ZERO_TOL = 1e-6  # |A| <= ZERO_TOL * max(1, |V|) counts as a zero advantage


# ── the tree's slots ───────────────────────────────────────────────────────────────────────────────────────────────
def num_tree_slots(shape: Sequence[int]) -> int:
    """`G_tree = Π_d b_d`, the leaf slots of one tree."""
    return math.prod(shape)


def tree_slot_leaves(leaf_paths: Sequence[Sequence[int]], shape: Sequence[int]) -> list[int]:
    r"""
    Replication: which leaf fills each of the `Π_d b_d` slots of one tree, in lexicographic path order. A leaf at depth
    `d` (a path of `d + 1` child indices) fills the `Π_{j>d} b_j` slots of its subtree.

    Args:
        leaf_paths (`Sequence[Sequence[int]]`): the tree's leaves, each as its child index per level (no padding).
        shape (`Sequence[int]`): `(b_0, …, b_{D−1})`.

    Returns:
        `list[int]` of length `Π_d b_d`: the index into `leaf_paths` of each slot.

    Raises:
        `ValueError` when the leaves do not partition the tree (a slot covered twice or not at all, an index out of
        range, a path longer than the tree).

    Example (shape (2, 2); child 0 is an early leaf, child 1 has two leaves):
    ```python
    >>> tree_slot_leaves([(0,), (1, 0), (1, 1)], (2, 2))
    [0, 0, 1, 2]
    ```
    """
    shape = [int(b) for b in shape]
    D = len(shape)
    strides = [math.prod(shape[d + 1 :]) for d in range(D)]
    slots = [-1] * math.prod(shape)
    for index, path in enumerate(leaf_paths):
        if not 1 <= len(path) <= D or any(not 0 <= c < shape[d] for d, c in enumerate(path)):
            raise ValueError(f"Leaf path {tuple(path)} does not fit the tree shape {tuple(shape)}.")
        start = sum(c * strides[d] for d, c in enumerate(path))
        for s in range(start, start + strides[len(path) - 1]):
            if slots[s] != -1:
                raise ValueError(f"Leaves {tuple(leaf_paths[slots[s]])} and {tuple(path)} overlap in the tree.")
            slots[s] = index
    if -1 in slots:
        raise ValueError(f"The leaves do not cover the tree of shape {tuple(shape)} (slot {slots.index(-1)} is empty).")
    return slots


def tree_paths_tensor(paths: Sequence[Sequence[int]], depth: int) -> torch.Tensor:
    """`(N, D)` long: child index per level of each path, `-1` past its leaf."""
    out = torch.full((len(paths), depth), -1, dtype=torch.long)
    for i, path in enumerate(paths):
        if len(path) > depth:
            raise ValueError(f"Path {tuple(path)} is deeper than the tree's {depth} levels.")
        out[i, : len(path)] = torch.tensor(list(path), dtype=torch.long)
    return out


def _validate_paths(tree_paths: torch.Tensor, group_size: int) -> torch.Tensor:
    if tree_paths.dim() != 2:
        raise ValueError(f"tree_paths must be 2-D (N, D), got shape {tuple(tree_paths.shape)}.")
    N, D = tree_paths.shape
    if group_size < 1 or N % group_size:
        raise ValueError(f"The {N} tree paths are not whole groups of {group_size}.")
    valid = tree_paths >= 0
    depth = valid.sum(dim=1)
    # child indices first, then -1 only: valid[:, d] is True exactly for d < depth
    steps = torch.arange(D, device=tree_paths.device)
    if not torch.equal(valid, steps[None, :] < depth[:, None]) or bool((depth == 0).any()):
        raise ValueError("Every tree path must hold one child index >= 0 per level down to its leaf, then -1 only.")
    return depth


def _node_keys(tree_paths: torch.Tensor, group_size: int, length: int) -> torch.Tensor:
    """`(N,)` long: one id per (group, path[:length]) node."""
    groups = torch.arange(tree_paths.size(0), device=tree_paths.device) // group_size
    keys = torch.cat([groups[:, None], tree_paths[:, :length]], dim=1)
    return torch.unique(keys, dim=0, return_inverse=True)[1]


@torch.no_grad()
def tree_node_values(rewards: torch.Tensor, tree_paths: torch.Tensor, group_size: int) -> torch.Tensor:
    r"""
    Segment start values of every slot: `V(root), V(path[:1]), …` with `V(node)` = mean reward of the group's slots
    under the node (`NaN` rewards left out of the means).

    Args:
        rewards (`torch.Tensor` of shape `(N,)`): reward of each slot (`NaN` = unscorable).
        tree_paths (`torch.Tensor` of shape `(N, D)`, long): child index per level, `-1` past the leaf; the `G` slots
            of a tree are consecutive rows.
        group_size (`int`): slots per tree.

    Returns:
        `torch.Tensor` of shape `(N, D)`, float64: column `d` is the value of the node the slot reaches after `d`
        segments (column 0: the root), `NaN` for `d ≥` the slot's number of segments.

    Example (the paper's tree figure: shape (3, 3), leaf rewards [[1, 0, 1], [1, 1, 1], [0, 0, 0]]):
    ```python
    >>> paths = torch.tensor([[a, b] for a in range(3) for b in range(3)])
    >>> r = torch.tensor([1.0, 0, 1, 1, 1, 1, 0, 0, 0])
    >>> tree_node_values(r, paths, 9)[[0, 3, 6]]
    tensor([[0.5556, 0.6667],
            [0.5556, 1.0000],
            [0.5556, 0.0000]], dtype=torch.float64)
    ```
    """
    depth = _validate_paths(tree_paths, group_size)
    N, D = tree_paths.shape
    if tuple(rewards.shape) != (N,):
        raise ValueError(f"rewards has shape {tuple(rewards.shape)}, expected ({N},).")
    r = rewards.to(torch.float64)
    known = ~torch.isnan(r)
    r = torch.where(known, r, torch.zeros_like(r))
    values = torch.full((N, D), math.nan, dtype=torch.float64, device=rewards.device)
    for d in range(D):
        inverse = _node_keys(tree_paths, group_size, d)
        K = int(inverse.max()) + 1 if N else 0  # no row: no node
        sums = torch.zeros(K, dtype=torch.float64, device=r.device).index_add_(0, inverse, r)
        counts = torch.zeros(K, dtype=torch.float64, device=r.device).index_add_(0, inverse, known.to(torch.float64))
        mean = torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, math.nan))
        values[:, d] = torch.where(depth > d, mean[inverse], torch.full_like(mean[inverse], math.nan))
    return values


@torch.no_grad()
def tree_node_counts(tree_paths: torch.Tensor, group_size: int, active: torch.Tensor | None = None) -> torch.Tensor:
    """
    `(N, D)` long: rows of the group through the node each segment creates (`path[:d+1]`), 0 past the leaf. With
    `active (N,)` (bool), only active rows are counted (rows that train: scorable, with loss tokens).
    """
    depth = _validate_paths(tree_paths, group_size)
    N, D = tree_paths.shape
    device = tree_paths.device
    weight = torch.ones(N, device=device) if active is None else active.to(device=device, dtype=torch.float64)
    counts = torch.zeros(N, D, dtype=torch.long, device=device)
    for d in range(D):
        inverse = _node_keys(tree_paths, group_size, d + 1)
        per_node = torch.bincount(inverse, weights=weight.to(torch.float64)).round().long()
        counts[:, d] = torch.where(depth > d, per_node[inverse], torch.zeros_like(inverse))
    return counts


def tree_segment_ids(segment_lengths: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    """
    `(N, T)` long segment ids, the tree level of every token, from each row's segment lengths; `-1` on padding.

    Example:
    ```python
    >>> tree_segment_ids([[2, 1], [3]], 4)
    tensor([[ 0,  0,  1, -1],
            [ 0,  0,  0, -1]])
    ```
    """
    out = torch.full((len(segment_lengths), width), -1, dtype=torch.long)
    for i, lengths in enumerate(segment_lengths):
        if sum(lengths) > width:
            raise ValueError(f"Row {i} has {sum(lengths)} tokens in its segments, more than the width {width}.")
        start = 0
        for d, n in enumerate(lengths):
            out[i, start : start + n] = d
            start += n
    return out


# ── the estimator ──────────────────────────────────────────────────────────────────────────────────────────────────
@register_advantage_estimator("spo_tree", requires=("segments",))
@torch.no_grad()
def compute_spo_tree_advantages(
    batch: CreditBatch,
    *,
    spo_prob_mask: bool = True,
    spo_advantage_norm: str = "batch",
    spo_tree_node_weighting: bool = True,
    spo_tree_skip_zero_advantage: bool = True,
) -> CreditOutput:
    r"""
    SPO-tree token advantages and loss mask of the trained slots of the batch's trees.

    Args:
        batch ([`CreditBatch`]):
            Needs `segment_ids (N, T)` (the tree level of every token) and `tree_paths (N, D)` (child index per level,
            `-1` past the leaf; the `G = num_generations` trained slots of a tree are consecutive rows).
            `segment_values (N, D)`, when given, are the node values along each path (the trainer computes them over
            every slot of the tree, value-only slots included); otherwise they are the slot means of the batch's own
            rewards (every slot trained). With `spo_prob_mask`, `cutpoint_mask (N, T)` (`π_old(y_t) < ρ`).
        spo_prob_mask (`bool`, *optional*, defaults to `True`):
            Train only the low-probability tokens (`cutpoint_mask`).
        spo_advantage_norm (`str`, *optional*, defaults to `"batch"`):
            `"batch"` (official: whitening over the loss-mask weights), `"group"` (per tree), `"none"`.
        spo_tree_node_weighting (`bool`, *optional*, defaults to `True`):
            Loss weight `1/n` on a segment shared by `n` trained rows (each node trained once).
        spo_tree_skip_zero_advantage (`bool`, *optional*, defaults to `True`):
            Loss weight 0 on segments whose advantage is 0 (the official edge filter).

    Returns:
        [`CreditOutput`] with `advantages (N, T)` (0 outside the loss mask), `loss_mask (N, T)` and diagnostics:
        `spo_tree_nonzero_adv_frac` (share of the trained nodes with a non-zero advantage), `spo_tree_root_value_mean`,
        `spo_tree_adv_raw_std`, `spo_mask_frac` (loss-mask weight per valid token), `spo_tree_early_leaf_frac`
        (trained rows ending before the last level).

    Example (the paper's tree figure, shape (3, 3), every slot trained, no mask, no normalization):
    ```python
    >>> paths = torch.tensor([[a, b] for a in range(3) for b in range(3)])
    >>> seg = torch.tensor([[0, 1]] * 9)
    >>> batch = CreditBatch(completion_ids=torch.zeros(9, 2, dtype=torch.long), completion_mask=torch.ones(9, 2),
    ...                     rewards=torch.tensor([1.0, 0, 1, 1, 1, 1, 0, 0, 0]), num_generations=9,
    ...                     segment_ids=seg, tree_paths=paths)
    >>> out = compute_spo_tree_advantages(batch, spo_prob_mask=False, spo_advantage_norm="none")
    >>> out.advantages[1]  # slot (0, 1): 1/9 on segment 0, -2/3 on segment 1
    tensor([ 0.1111, -0.6667])
    >>> out.loss_mask[1]  # node 0 is shared by 3 rows; leaf (0, 1) by one
    tensor([0.3333, 1.0000])
    ```
    """
    if spo_advantage_norm not in SPO_ADVANTAGE_NORMS:
        raise ValueError(f"spo_advantage_norm must be one of {SPO_ADVANTAGE_NORMS}, got {spo_advantage_norm!r}.")
    tree_paths = batch.tree_paths
    if batch.segment_ids is None or tree_paths is None:
        raise ValueError(
            "advantage_estimator='spo_tree' needs batch.segment_ids (the tree level of each token) and "
            "batch.tree_paths; use trl_credit.GRPOTrainer, which samples the group as a tree and prepares them."
        )
    cutpoint_mask = batch.cutpoint_mask
    if spo_prob_mask and cutpoint_mask is None:
        raise ValueError(
            "spo_prob_mask=True needs batch.cutpoint_mask (tokens with π_old < spo_cutpoint_threshold); the trainer "
            "prepares it, or pass spo_prob_mask=False."
        )
    G = batch.num_generations
    N, T = batch.segment_ids.shape
    device = batch.segment_ids.device
    tree_paths = tree_paths.to(device).long()
    if tree_paths.size(0) != N:
        raise ValueError(f"tree_paths has {tree_paths.size(0)} rows, expected {N}.")
    depth = _validate_paths(tree_paths, G)
    D = tree_paths.size(1)
    segment_ids = batch.segment_ids.long()
    num_segments = segment_counts(segment_ids)
    scorable = ~torch.isnan(batch.rewards)
    has_tokens = num_segments > 0
    # a leaf's last segment may be empty (a continuation of 0 tokens): then its node value is r and the segment before
    # it gets r − V(parent) from compute_segment_gae, as it should
    if bool((num_segments > depth).any() | (has_tokens & (num_segments < depth - 1)).any()):
        raise ValueError("segment_ids and tree_paths disagree: a row's number of segments must equal its path depth.")

    values = batch.segment_values
    if values is None:
        values = tree_node_values(batch.rewards, tree_paths, G)
    values = values.to(device=device, dtype=torch.float64)
    if values.size(1) < D:
        raise ValueError(f"segment_values has {values.size(1)} columns, expected the tree's {D} levels.")
    values = values[:, :D]
    raw = compute_segment_gae(batch.rewards.to(torch.float64), segment_ids, values, gamma=1.0, lam=0.0)

    valid = (batch.mask > 0) & (segment_ids >= 0) & scorable[:, None]
    mask = batch.mask.to(torch.float64) * valid
    if spo_prob_mask:
        mask = mask * (cutpoint_mask.to(device) > 0)
    index = segment_ids.clamp(min=0)
    active = valid.any(dim=1)  # rows that train: every node counts once among them
    counts = tree_node_counts(tree_paths, G, active)
    if spo_tree_node_weighting:
        n_tok = counts.gather(1, index.clamp(max=D - 1)).clamp(min=1).to(torch.float64)
        mask = mask / n_tok
    # zero advantages: a segment advantage is V(child) - V(parent) of means of the same rewards
    scale = torch.nan_to_num(values.abs(), nan=0.0).amax(dim=1, keepdim=True).clamp(min=1.0)
    nonzero_tok = raw.abs() > ZERO_TOL * scale
    if spo_tree_skip_zero_advantage:
        mask = mask * nonzero_tok

    advantages = spo_normalize(raw, mask, spo_advantage_norm, G)  # frequency weights: each node counts once

    # ── diagnostics over the trained nodes (each once) ──
    seg_adv = torch.zeros(N, D, dtype=torch.float64, device=device)
    first = torch.full((N, D), T, dtype=torch.long, device=device)
    positions = torch.arange(T, device=device).expand(N, T)
    inside = segment_ids >= 0
    first.scatter_reduce_(1, index, torch.where(inside, positions, T), reduce="amin")
    for d in range(D):
        has = first[:, d] < T
        seg_adv[has, d] = raw[has, first[has, d]]
    node_rows = (torch.arange(D, device=device)[None, :] < depth[:, None]) & active[:, None] & (first < T)
    weights = torch.where(node_rows, 1.0 / counts.clamp(min=1).to(torch.float64), 0.0)
    nodes = weights.sum()
    nonzero = (weights * (seg_adv.abs() > ZERO_TOL * scale)).sum()
    root = values[:, 0][scorable & has_tokens]
    root = root[~torch.isnan(root)]
    valid_f = valid.to(torch.float64)
    metrics = {
        "spo_tree_nonzero_adv_frac": float(nonzero / nodes) if nodes > 0 else 0.0,
        "spo_tree_root_value_mean": float(root.mean()) if root.numel() else 0.0,
        "spo_tree_adv_raw_std": float(raw[mask > 0].std()) if int((mask > 0).sum()) > 1 else 0.0,
        "spo_mask_frac": float(mask.sum() / valid_f.sum()) if valid_f.sum() > 0 else 0.0,
        "spo_tree_early_leaf_frac": float((depth[has_tokens] < D).float().mean()) if has_tokens.any() else 0.0,
    }
    return CreditOutput(advantages=advantages, loss_mask=mask.to(torch.float32), metrics=metrics)
