r"""
TEMPO (prefix-to-tree values with branch-gated TD corrections) and GiGPO's single-turn adaptation.

TEMPO, Tran et al., "Exploiting Tree Structure for Credit Assignment in RL Training of LLMs",
https://huggingface.co/papers/2509.18314:

$$A_{i,t} = A^{\mathrm{GRPO}}_i + c \cdot \frac{V(s^i_{t+1}) - V(s^i_t)}{\sigma + \epsilon}$$

with tree values `V` (see `prefix_tree.py`) and `c = branch_td_coef` (1 in the paper). The TD term is zero at
non-branch tokens, so those tokens equal GRPO **exactly**; along a completion the TD terms telescope to `r_i − μ`.

GiGPO, Feng et al., "Group-in-Group Policy Optimization for LLM Agent Training",
https://huggingface.co/papers/2505.10978,
single-turn adaptation: the anchor states are the prefix-tree nodes, so the step group of token t is `D(s^i_t)`, the
completions through its state, and the step advantage is the Monte-Carlo residual at that state normalized within the
step group (paper Eq. 7, official `step_norm_reward`),

$$A_{i,t} = A^{E}_i + \omega \cdot \frac{r_i - V(s^i_t)}{F^{S}(s^i_t)}, \qquad
F^{S}(s) = \begin{cases} \sigma(s) + \epsilon & \text{step norm "std" (}\sigma(s)\text{: std of } D(s)\text{; 1 for
one member)} \\ 1 & \text{step norm "none"} \end{cases}$$

gated to branch tokens by default (`branch_only=True`). The official `mode` sets both levels at once: `"mean_norm"`
(its default) = `scale_rewards="none"` + step norm `"none"`; `"mean_std_norm"` = `scale_rewards="group"` + step norm
`"std"`. `step_norm="auto"` (default) follows `scale_rewards` that way.

Deviations from the papers / official code:
- The denominators are TRL's (`std + 1e-4` for `scale_rewards="group"`, the batch std for `"batch"`, 1 for `"none"`;
  GiGPO's step std `+ 1e-4` too), not TEMPO's / GiGPO's `std + 1e-6`, so that non-branch tokens equal TRL's GRPO
  advantage bit for bit.
- Tokens are compared only where both completions have real tokens (the official TEMPO code compares padded tensors).
- A group of one completion gets advantage 0 (the official code would produce NaN from the std of one element; the
  official GiGPO episode term would give the raw reward).
- `lam` and `entropys`, unused arguments of the official TEMPO function, are not exposed.
- GiGPO's ungated token-level form (`branch_only=False`) relies on token-level loss normalization to cancel its
  zero-sum shared-prefix terms; the config rejects it with per-sequence normalizations (`loss_type="grpo"`/`"sapo"`).
"""

from __future__ import annotations

import torch

from .batch import CreditBatch, CreditOutput
from .grpo import TRL_EPS, advantage_denominator, compute_grpo_advantages
from .prefix_tree import PrefixTreeValues, prefix_tree_values, tree_metrics
from .registry import register_advantage_estimator


GIGPO_STEP_NORMS = ("auto", "std", "none")


def gigpo_step_norm_mode(step_norm: str, scale_rewards: str) -> str:
    """The GiGPO step normalization in effect: `"auto"` follows `scale_rewards` as the official `mode` does."""
    if step_norm not in GIGPO_STEP_NORMS:
        raise ValueError(f"gigpo_step_norm must be one of {GIGPO_STEP_NORMS}, got {step_norm!r}.")
    if step_norm == "auto":
        return "none" if scale_rewards == "none" else "std"
    return step_norm


def _tree_and_outcome(completion_ids, completion_mask, rewards, num_generations, scale_rewards):
    rewards = rewards.to(torch.float32)
    tree = prefix_tree_values(completion_ids, completion_mask, rewards, num_generations)
    outcome = compute_grpo_advantages(rewards, num_generations, scale_rewards)
    denom = advantage_denominator(rewards, num_generations, scale_rewards)
    return tree, outcome, denom


def _combine(outcome, extra, tree: PrefixTreeValues, rewards, mask):
    # Unscorable completions carry no signal (TRL gives them 0); NaN values of empty subtrees become 0.
    extra = torch.nan_to_num(extra, nan=0.0, posinf=0.0, neginf=0.0)
    extra = torch.where(torch.isnan(rewards)[:, None], torch.zeros_like(extra), extra)
    keep = mask > 0
    adv = torch.where(keep, outcome[:, None] + extra, torch.zeros_like(extra))
    return adv, torch.where(keep, extra, torch.zeros_like(extra))


@torch.no_grad()
def compute_tempo_advantages(
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    rewards: torch.Tensor,
    num_generations: int,
    scale_rewards: str = "group",
    branch_td_coef: float = 1.0,
    *,
    loss_mask: torch.Tensor | None = None,
    return_metrics: bool = False,
):
    r"""
    TEMPO per-token advantages.

    Args:
        completion_ids (`torch.Tensor` of shape `(N, T)`, long):
            Completions, right-padded; groups are consecutive blocks of `num_generations` rows (TRL's layout).
        completion_mask (`torch.Tensor` of shape `(N, T)`):
            1 on real tokens (EOS included).
        rewards (`torch.Tensor` of shape `(N,)`):
            Outcome rewards; `NaN` = unscorable (advantage 0, excluded from the tree values).
        num_generations (`int`):
            Group size `G`.
        scale_rewards (`str`, *optional*, defaults to `"group"`):
            TRL's normalization, shared by the GRPO and TD terms.
        branch_td_coef (`float`, *optional*, defaults to `1.0`):
            Coefficient `c` of the TD term (1 = paper).
        loss_mask (`torch.Tensor` of shape `(N, T)`, *optional*):
            Tokens entering the loss; defaults to `completion_mask`.
        return_metrics (`bool`, *optional*, defaults to `False`):
            Also return a dict of diagnostics.

    Returns:
        `torch.Tensor` of shape `(N, T)` (0 on padding), and the metrics dict if `return_metrics`.

    Example (the spec's worked example, `scale_rewards="none"`):
    ```python
    >>> ids = torch.tensor([[1, 2, 3], [1, 2, 4], [1, 5, 0], [6, 0, 0]])
    >>> mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 0, 0]])
    >>> compute_tempo_advantages(ids, mask, torch.tensor([1.0, 0.0, 1.0, 0.0]), 4, scale_rewards="none")
    tensor([[ 0.6667,  0.3333,  1.0000],
            [-0.3333, -0.6667, -1.0000],
            [ 0.6667,  0.8333,  0.0000],
            [-1.0000,  0.0000,  0.0000]])
    ```
    """
    tree, outcome, denom = _tree_and_outcome(completion_ids, completion_mask, rewards, num_generations, scale_rewards)
    td = torch.where(tree.is_branch, tree.v_child - tree.v_parent, torch.zeros_like(tree.v_child))
    extra = torch.where(tree.is_branch, branch_td_coef * td / denom[:, None], torch.zeros_like(td))
    mask = (loss_mask if loss_mask is not None else completion_mask).to(torch.float32)
    adv, extra = _combine(outcome, extra, tree, rewards.to(torch.float32), mask)
    if return_metrics:
        return adv, tree_metrics(tree, extra)
    return adv


@torch.no_grad()
def compute_gigpo_advantages(
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    rewards: torch.Tensor,
    num_generations: int,
    scale_rewards: str = "group",
    step_weight: float = 1.0,
    branch_only: bool = True,
    *,
    step_norm: str = "auto",
    loss_mask: torch.Tensor | None = None,
    return_metrics: bool = False,
):
    r"""
    GiGPO per-token advantages, single-turn adaptation (anchor states = prefix-tree nodes).

    Args:
        completion_ids, completion_mask, rewards, num_generations, scale_rewards, loss_mask, return_metrics:
            As [`compute_tempo_advantages`]. `scale_rewards` normalizes the episode term `A^E` only.
        step_weight (`float`, *optional*, defaults to `1.0`):
            `ω`, weight of the step (anchor-state) advantage (1 in every official script).
        branch_only (`bool`, *optional*, defaults to `True`):
            Apply the step term only at branch tokens. `False` gives the ungated form `r_i − V(s^i_t)` on every
            shared-prefix token, whose zero-sum terms cancel only under token-level loss normalization.
        step_norm (`str`, *optional*, defaults to `"auto"`):
            Normalization of the step residual `r_i − V(s)`: `"std"` divides it by the unbiased std of the rewards of
            its own step group `D(s)` plus 1e-4 (1 for a group of one; the official `mean_std_norm`), `"none"` leaves
            it raw (the official `mean_norm`). `"auto"`: `"none"` with `scale_rewards="none"`, else `"std"`, so the
            two official modes are `scale_rewards="none"` and `scale_rewards="group"`.

    Returns:
        `torch.Tensor` of shape `(N, T)` (0 on padding), and the metrics dict if `return_metrics`.

    Example (the spec's worked example, `mean_norm`, ungated):
    ```python
    >>> ids = torch.tensor([[1, 2, 3], [1, 2, 4], [1, 5, 0], [6, 0, 0]])
    >>> mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 0, 0]])
    >>> compute_gigpo_advantages(ids, mask, torch.tensor([1.0, 0.0, 1.0, 0.0]), 4, "none", branch_only=False)
    tensor([[ 1.0000,  0.8333,  1.0000],
            [-1.0000, -1.1667, -1.0000],
            [ 1.0000,  0.8333,  0.0000],
            [-1.0000,  0.0000,  0.0000]])
    ```
    """
    mode = gigpo_step_norm_mode(step_norm, scale_rewards)
    tree, outcome, _ = _tree_and_outcome(completion_ids, completion_mask, rewards, num_generations, scale_rewards)
    residual = rewards.to(torch.float32)[:, None] - tree.v_parent
    if mode == "std":
        # The step group's own std (official `step_norm_reward`); a group of one scorable member divides by 1.
        step_denom = torch.where(torch.isnan(tree.std_parent), 1.0, tree.std_parent + TRL_EPS)
    else:
        step_denom = torch.ones_like(residual)
    gate = tree.is_branch if branch_only else tree.valid
    # Once a completion is alone in its subtree V(s) = r exactly, so the ungated term vanishes there too.
    extra = torch.where(gate, step_weight * residual / step_denom, torch.zeros_like(residual))
    mask = (loss_mask if loss_mask is not None else completion_mask).to(torch.float32)
    adv, extra = _combine(outcome, extra, tree, rewards.to(torch.float32), mask)
    if return_metrics:
        return adv, tree_metrics(tree, extra)
    return adv


def _require_sum_then_normalize(name, multi_objective_aggregation):
    if multi_objective_aggregation != "sum_then_normalize":
        raise ValueError(
            f"advantage_estimator={name!r} computes tree values of the aggregated reward and needs "
            f"multi_objective_aggregation='sum_then_normalize', got {multi_objective_aggregation!r}."
        )


@register_advantage_estimator("tempo")
def tempo_estimator(
    batch: CreditBatch,
    *,
    scale_rewards: str = "group",
    branch_td_coef: float = 1.0,
    multi_objective_aggregation: str = "sum_then_normalize",
) -> CreditOutput:
    """TEMPO: GRPO + branch-gated TD on the group's prefix tree."""
    _require_sum_then_normalize("tempo", multi_objective_aggregation)
    adv, metrics = compute_tempo_advantages(
        batch.completion_ids,
        batch.completion_mask,
        batch.rewards,
        batch.num_generations,
        scale_rewards,
        branch_td_coef,
        loss_mask=batch.loss_mask,
        return_metrics=True,
    )
    return CreditOutput(advantages=adv, metrics=metrics)


@register_advantage_estimator("gigpo")
def gigpo_estimator(
    batch: CreditBatch,
    *,
    scale_rewards: str = "group",
    gigpo_step_weight: float = 1.0,
    gigpo_branch_only: bool = True,
    gigpo_step_norm: str = "auto",
    multi_objective_aggregation: str = "sum_then_normalize",
) -> CreditOutput:
    """GiGPO (single-turn): episode advantage + ω × anchor-state MC residual normalized in its step group."""
    _require_sum_then_normalize("gigpo", multi_objective_aggregation)
    adv, metrics = compute_gigpo_advantages(
        batch.completion_ids,
        batch.completion_mask,
        batch.rewards,
        batch.num_generations,
        scale_rewards,
        gigpo_step_weight,
        gigpo_branch_only,
        step_norm=gigpo_step_norm,
        loss_mask=batch.loss_mask,
        return_metrics=True,
    )
    return CreditOutput(advantages=adv, metrics=metrics)
