r"""
The prefix tree of a group of completions and its nonparametric node values, shared by TEMPO and GiGPO.

Nodes are the distinct prefixes of the `G` completions of a prompt (root = the prompt). `D(s)` is the set of
completions that pass through prefix `s`, and

$$V(s) = \frac{1}{|D(s)|} \sum_{j \in D(s)} r_j$$

(NaN-aware: unscorable completions are members of `D(s)` but do not enter the mean), and `σ(s)` the unbiased std of the
same rewards (GiGPO's step normalization). Token `t` of completion `i` is a
**branch token** when `D(s^i_{t+1}) ⊊ D(s^i_t)`: some sibling takes a different token at this node.

Vectorized: for each pair of completions of a group, the depth of their shared prefix (scanning tokens in chunks
until every pair has diverged), then per-token subtree counts and reward sums from a histogram of those depths.
Cost O(G²·d + N·T) with d the deepest divergence. Only real tokens are compared (never padding), so a pad id that
equals a real token id cannot merge two branches (unlike the official TEMPO code).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


_MAX_ELEMENTS = 1 << 25  # elements of the (groups, G, G, chunk) comparison tensor processed at once


@dataclass
class PrefixTreeValues:
    """
    Per-token tree quantities, all of shape `(N, T)` unless noted.

    Attributes:
        v_parent: `V(s^i_t)`, value of the state before token t (NaN where no scorable member or padding).
        v_child: `V(s^i_{t+1})`, value of the state after token t.
        std_parent: `σ(s^i_t)`, unbiased std of the scorable rewards of `D(s^i_t)` (NaN where fewer than two, or
            padding).
        is_branch: bool, token t is a branch token (always False on padding).
        members: number of completions (scorable or not) sharing the prefix through token t, `|D(s^i_{t+1})|`.
        valid: bool, real completion tokens.
        first_branch: `(N,)` long, position of the first branch token (-1 if none).
        unique_depth: `(N,)` long, first position at which the completion is alone in its subtree (its length if
            it never is, e.g. an exact duplicate).
    """

    v_parent: torch.Tensor
    v_child: torch.Tensor
    std_parent: torch.Tensor
    is_branch: torch.Tensor
    members: torch.Tensor
    valid: torch.Tensor
    first_branch: torch.Tensor
    unique_depth: torch.Tensor


def _first_true(x: torch.Tensor, default: torch.Tensor) -> torch.Tensor:
    """Index of the first True along the last dim, `default` where there is none."""
    T = x.size(-1)
    if T == 0:  # no position: none is True
        return default.clone()
    pos = torch.arange(T, device=x.device).expand_as(x)
    first = torch.where(x, pos, torch.full_like(pos, T)).min(dim=-1).values
    return torch.where(first < T, first, default)


def _divergence_depths(ids: torch.Tensor, valid: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """
    `(n, G, G)` number of leading positions where completions `i` and `j` both have real, equal tokens (for `i = j`
    the length of `i`). Scans `T` in chunks and stops once every pair has diverged, so sampled groups that branch
    early cost O(G²·depth), not O(G²·T).
    """
    n, G, T = ids.shape
    eye = torch.eye(G, dtype=torch.bool, device=ids.device)
    depth = torch.zeros(n, G, G, dtype=torch.long, device=ids.device)
    depth[:, eye] = valid.sum(-1)  # a completion shares its whole length with itself
    alive = ~eye.expand(n, G, G)
    for t0 in range(0, T, chunk):
        if not alive.any():
            break
        cols = slice(t0, min(T, t0 + chunk))
        a, b, va, vb = ids[:, :, None, cols], ids[:, None, :, cols], valid[:, :, None, cols], valid[:, None, :, cols]
        run = ((a == b) & va & vb).to(torch.uint8).cummin(dim=-1).values.sum(-1, dtype=torch.long)
        depth += torch.where(alive, run, 0)
        alive &= run == (cols.stop - cols.start)
    return depth


def _subtree_sums(depth: torch.Tensor, weights: torch.Tensor, T: int) -> torch.Tensor:
    """
    `S[i, t] = Σ_j weights[j] · [depth(i, j) ≥ t]` for `t = 0..T`, i.e. summed over the completions that share the
    first `t` tokens of `i` (t = 0: the whole group). A histogram of depths, then a reverse cumulative sum: adding 0
    for a depth no pair has leaves the running sum bit-identical, so a non-branch token's child and parent agree
    exactly.
    """
    n, G, _ = depth.shape
    hist = torch.zeros(n * G, T + 1, dtype=weights.dtype, device=depth.device)
    hist.scatter_add_(1, depth.view(n * G, G), weights.view(n, 1, G).expand(n, G, G).reshape(n * G, G))
    return hist.flip(1).cumsum(1).flip(1)


@torch.no_grad()
def prefix_tree_values(
    completion_ids: torch.Tensor, completion_mask: torch.Tensor, rewards: torch.Tensor, num_generations: int
) -> PrefixTreeValues:
    r"""
    Tree values of every prefix of every completion.

    Args:
        completion_ids (`torch.Tensor` of shape `(N, T)`): token ids, right-padded.
        completion_mask (`torch.Tensor` of shape `(N, T)`): 1 on real tokens.
        rewards (`torch.Tensor` of shape `(N,)`): outcome rewards, `NaN` = unscorable.
        num_generations (`int`): group size `G` (consecutive rows).

    Returns:
        [`PrefixTreeValues`].

    Notation: `N` completions, `T` tokens, `G` group size.
    """
    N, T = completion_ids.shape
    G = num_generations
    if N % G:
        raise ValueError(f"{N} completions are not whole groups of num_generations={G}.")
    n_groups = N // G
    valid = completion_mask.bool()
    rewards = rewards.to(torch.float32)
    scorable = ~torch.isnan(rewards)

    # Shared-prefix depth of every pair of completions in a group, in chunks of groups to bound memory.
    depth = torch.empty(n_groups, G, G, dtype=torch.long, device=completion_ids.device)
    chunk = max(1, _MAX_ELEMENTS // (G * G * 64))
    for g0 in range(0, n_groups, chunk):
        g1 = min(n_groups, g0 + chunk)
        rows = slice(g0 * G, g1 * G)
        # explicit group count: with T = 0 columns a view(-1, G, T) is ambiguous
        depth[g0:g1] = _divergence_depths(completion_ids[rows].view(g1 - g0, G, T), valid[rows].view(g1 - g0, G, T))

    # Column t of these (N, T + 1) sums is the set D(s_t) of completions sharing the first t tokens (t = 0: root).
    members = _subtree_sums(depth, torch.ones(N, dtype=torch.long, device=depth.device), T)
    count = _subtree_sums(depth, scorable.to(torch.float32), T)
    total = _subtree_sums(depth, torch.nan_to_num(rewards, nan=0.0), T)
    # float64 second moment: Σr² − n·mean² loses digits in float32 when the rewards are large and close together.
    r64 = torch.nan_to_num(rewards.to(torch.float64), nan=0.0)
    total64 = _subtree_sums(depth, r64, T)
    square64 = _subtree_sums(depth, r64 * r64, T)

    nan = torch.tensor(float("nan"), device=depth.device)
    v = torch.where(count > 0, total / count.clamp(min=1), nan)
    v_parent = torch.where(valid, v[:, :-1], nan)
    v_child = torch.where(valid, v[:, 1:], nan)
    n64 = count.to(torch.float64)
    var = ((square64 - total64 * total64 / n64.clamp(min=1)) / (n64 - 1).clamp(min=1)).clamp(min=0)
    std = torch.where(count > 1, var.sqrt().to(torch.float32), nan)
    std_parent = torch.where(valid, std[:, :-1], nan)
    is_branch = valid & (members[:, 1:] < members[:, :-1])

    lengths = valid.sum(1)
    first_branch = _first_true(is_branch, torch.full_like(lengths, -1))
    unique_depth = _first_true(valid & (members[:, 1:] == 1), lengths)
    return PrefixTreeValues(
        v_parent=v_parent,
        v_child=v_child,
        std_parent=std_parent,
        is_branch=is_branch,
        members=members[:, 1:],
        valid=valid,
        first_branch=first_branch,
        unique_depth=unique_depth,
    )


def tree_metrics(tree: PrefixTreeValues, extra: torch.Tensor) -> dict[str, float]:
    """Diagnostics of a tree estimator: share of tokens with non-zero extra credit, divergence depths."""
    valid = tree.valid
    n_valid = valid.sum().clamp(min=1).item()
    has_branch = tree.first_branch >= 0
    nonempty = valid.any(1)
    return {
        "extra_credit_token_frac": ((extra != 0) & valid).sum().item() / n_valid,
        "branch_token_frac": tree.is_branch.sum().item() / n_valid,
        "first_divergence_depth": tree.first_branch[has_branch].float().mean().item() if has_branch.any() else 0.0,
        "unique_depth": tree.unique_depth[nonempty].float().mean().item() if nonempty.any() else 0.0,
    }
