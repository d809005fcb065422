r"""
The prefix tree of a group of completions and its nonparametric node values, shared by TEMPO and GiGPO.

Nodes are the distinct prefixes of the `G` completions of a prompt (root = the prompt). `D(s)` is the set of
completions that pass through prefix `s`, and

$$V(s) = \frac{1}{|D(s)|} \sum_{j \in D(s)} r_j$$

(NaN-aware: unscorable completions are members of `D(s)` but do not enter the mean). Token `t` of completion `i` is a
**branch token** when `D(s^i_{t+1}) ⊊ D(s^i_t)`: some sibling takes a different token at this node.

Vectorized: for each group, a `(G, G, T)` "shares the first t+1 tokens" tensor from a cumulative minimum over token
equality; groups are processed in chunks to bound memory. Only real tokens are compared (never padding), so a pad id
that equals a real token id cannot merge two branches (unlike the official TEMPO code).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


_MAX_ELEMENTS = 1 << 25  # elements of the (groups, G, G, T) comparison tensor processed at once


@dataclass
class PrefixTreeValues:
    """
    Per-token tree quantities, all of shape `(N, T)` unless noted.

    Attributes:
        v_parent: `V(s^i_t)`, value of the state before token t (NaN where no scorable member or padding).
        v_child: `V(s^i_{t+1})`, value of the state after token t.
        is_branch: bool, token t is a branch token (always False on padding).
        members: number of completions (scorable or not) sharing the prefix through token t, `|D(s^i_{t+1})|`.
        valid: bool, real completion tokens.
        first_branch: `(N,)` long, position of the first branch token (-1 if none).
        unique_depth: `(N,)` long, first position at which the completion is alone in its subtree (its length if
            it never is, e.g. an exact duplicate).
    """

    v_parent: torch.Tensor
    v_child: torch.Tensor
    is_branch: torch.Tensor
    members: torch.Tensor
    valid: torch.Tensor
    first_branch: torch.Tensor
    unique_depth: torch.Tensor


def _first_true(x: torch.Tensor, default: torch.Tensor) -> torch.Tensor:
    """Index of the first True along the last dim, `default` where there is none."""
    T = x.size(-1)
    pos = torch.arange(T, device=x.device).expand_as(x)
    first = torch.where(x, pos, torch.full_like(pos, T)).min(dim=-1).values
    return torch.where(first < T, first, default)


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
    device = completion_ids.device
    valid = completion_mask.bool()
    rewards = rewards.to(torch.float32)
    scorable = ~torch.isnan(rewards)
    r0 = torch.nan_to_num(rewards, nan=0.0)

    members = torch.zeros(N, T, dtype=torch.long, device=device)
    cnt_child = torch.zeros(N, T, dtype=torch.float32, device=device)
    sum_child = torch.zeros(N, T, dtype=torch.float32, device=device)
    per_group = max(1, G * G * max(T, 1))
    chunk = max(1, _MAX_ELEMENTS // per_group)
    for g0 in range(0, n_groups, chunk):
        rows = slice(g0 * G, min(n_groups, g0 + chunk) * G)
        ids = completion_ids[rows].view(-1, G, T)
        v = valid[rows].view(-1, G, T)
        same = (ids[:, :, None, :] == ids[:, None, :, :]) & v[:, :, None, :] & v[:, None, :, :]  # (n, G_i, G_j, T)
        shared = same.to(torch.uint8).cummin(dim=-1).values  # j shares the first t+1 tokens of i
        sc = scorable[rows].view(-1, 1, G, 1).to(torch.uint8)
        members[rows] = shared.sum(2, dtype=torch.long).view(-1, T)
        cnt_child[rows] = (shared * sc).sum(2, dtype=torch.float32).view(-1, T)
        sum_child[rows] = torch.einsum("nijt,nj->nit", shared.to(torch.float32), r0[rows].view(-1, G)).view(-1, T)

    # Root (the prompt): every member of the group.
    root_cnt = scorable.view(-1, G).sum(1, dtype=torch.float32).repeat_interleave(G)
    root_sum = r0.view(-1, G).sum(1).repeat_interleave(G)
    root_members = torch.full((N, 1), G, dtype=torch.long, device=device)
    cnt_parent = torch.cat([root_cnt[:, None], cnt_child[:, :-1]], dim=1)
    sum_parent = torch.cat([root_sum[:, None], sum_child[:, :-1]], dim=1)
    members_parent = torch.cat([root_members, members[:, :-1]], dim=1)

    nan = torch.tensor(float("nan"), device=device)
    v_child = torch.where(valid & (cnt_child > 0), sum_child / cnt_child.clamp(min=1), nan)
    v_parent = torch.where(valid & (cnt_parent > 0), sum_parent / cnt_parent.clamp(min=1), nan)
    is_branch = valid & (members < members_parent)

    lengths = valid.sum(1)
    first_branch = _first_true(is_branch, torch.full_like(lengths, -1))
    unique_depth = _first_true(valid & (members == 1), lengths)
    return PrefixTreeValues(
        v_parent=v_parent,
        v_child=v_child,
        is_branch=is_branch,
        members=members,
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
