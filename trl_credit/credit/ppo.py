r"""
PPO's advantage: generalized advantage estimation with a learned critic, over tokens or macro actions.

Per-token rewards follow the classic RLHF PPO (TRL ≤ 1.12, DeepSpeed-Chat, MA-RLHF): an optional KL penalty on every
token plus the outcome reward on the last token,

$$r_t = -\beta_{\mathrm{KL}}\,\mathrm{KL}_t + \mathbb{1}[t = T_i - 1]\,R_i, \qquad
\mathrm{KL}_t = \log\pi_{\mathrm{old}}(a_t|s_t) - \log\pi_{\mathrm{ref}}(a_t|s_t) \;\;(k1)
\;\text{ or }\; e^{-d_t} - 1 + d_t,\; d_t = \log\pi_{\mathrm{old}} - \log\pi_{\mathrm{ref}} \;\;(k3).$$

Macro actions (MA-PPO, https://huggingface.co/papers/2410.02743) aggregate the token values and rewards of each macro
`ω_k` (`value_agg`, `reward_agg`) and run GAE on the macro grid (`compute_segment_gae`):

$$\delta_k = R_k + \gamma V_{k+1} - V_k, \qquad A_k = \delta_k + \gamma\lambda A_{k+1},$$
$$\mathrm{Ret}_k = A_k + V_k \;\;\text{(value target)},$$

every token of `ω_k` gets `A_k` and the value target `Ret_k`. One macro per token is classic token-level GAE
(https://huggingface.co/papers/1506.02438); `macro_action="ngram", macro_action_n=1` gives exactly the same tensors.

Deviations from TRL 1.12's `PPOTrainer`: advantages are whitened only with `whiten_advantages=True` (1.12 always
whitened; MA-RLHF never does), over the **global** generation batch rather than per process. Completions for which
every reward function returned `None`, or whose reward was not a finite number (the trainers turn ±inf into `NaN`),
get advantage 0 and no value target (`NaN` returns, skipped by the value loss). A completion with no loss token
(TRL's `mask_truncated_completions`) is left out like padding: the critic reads it with a zeroed attention mask.
"""

from __future__ import annotations

import torch

from .batch import CreditBatch, CreditOutput
from .macro import macro_aggregate, token_segments
from .registry import register_advantage_estimator
from .segment_gae import compute_segment_gae, max_segments

KL_ESTIMATORS = ("k1", "k3")


def kl_penalty(old_logps: torch.Tensor, ref_logps: torch.Tensor, kl_estimator: str = "k1") -> torch.Tensor:
    r"""
    Per-token KL estimate between the sampling policy and the reference, as in TRL 1.12's PPO.

    Args:
        old_logps (`torch.Tensor` of shape `(N, T)`): log-probs of the sampled tokens under the sampling policy.
        ref_logps (`torch.Tensor` of shape `(N, T)`): the same under the reference model.
        kl_estimator (`str`, *optional*, defaults to `"k1"`):
            `"k1"`: `log π_old − log π_ref` (unbiased, can be negative); `"k3"`: `e^{−d} − 1 + d` with
            `d = log π_old − log π_ref` (unbiased, non-negative, lower variance; http://joschu.net/blog/kl-approx.html).

    Returns:
        `torch.Tensor` of shape `(N, T)`.
    """
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}.")
    log_ratio = ref_logps - old_logps
    return -log_ratio if kl_estimator == "k1" else log_ratio.exp() - 1 - log_ratio


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """`(x − mean) / sqrt(var + 1e-8)` over `mask` (unbiased variance); `shift_mean=False` adds the mean back."""
    m = mask.to(x.dtype)
    count = m.sum()
    if count < 2:
        return x
    mean = (x * m).sum() / count
    var = (((x - mean) * m) ** 2).sum() / (count - 1)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


@torch.no_grad()
def compute_gae_advantages(
    values: torch.Tensor,
    token_rewards: torch.Tensor,
    completion_mask: torch.Tensor,
    segment_ids: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 0.95,
    *,
    value_agg: str = "mean",
    reward_agg: str = "mean",
    scorable: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    GAE over tokens or macro actions, broadcast to tokens.

    Args:
        values (`torch.Tensor` of shape `(N, T)`):
            Critic values `V(s_t)` of the state before each completion token.
        token_rewards (`torch.Tensor` of shape `(N, T)`):
            Rewards of each token, the outcome included (on the last token); padding is ignored.
        completion_mask (`torch.Tensor` of shape `(N, T)`):
            1 on valid tokens.
        segment_ids (`torch.Tensor` of shape `(N, T)`, long, *optional*):
            Macro ids (`-1` on padding); `None` = one macro per token.
        gamma (`float`, *optional*, defaults to `1.0`): discount between macros.
        lam (`float`, *optional*, defaults to `0.95`): GAE λ.
        value_agg (`str`, *optional*, defaults to `"mean"`): macro value (`"mean"` = official, `"first"` = value at the
            macro's start state, `"last"`, `"position"`).
        reward_agg (`str`, *optional*, defaults to `"mean"`): macro reward (`"mean"` = official code, `"sum"` = paper).
        scorable (`torch.Tensor` of shape `(N,)`, bool, *optional*): `False` rows get all-zero advantages.

    Returns:
        `(advantages, returns)`, both `torch.Tensor` of shape `(N, T)`, constant within each macro, 0 on padding.

    Example (ma-rlhf.md §9-2: token-level GAE, `V = [.1 … .6]`, outcome 1 on the last token):
    ```python
    >>> v = torch.tensor([[.1, .2, .3, .4, .5, .6]]); r = torch.tensor([[0, 0, 0, 0, 0, 1.0]])
    >>> compute_gae_advantages(v, r, torch.ones(1, 6))[0]
    tensor([[0.7620, 0.6968, 0.6282, 0.5560, 0.4800, 0.4000]])
    ```

    Notation: `N` completions, `T` tokens, `K_i` macros of completion `i`.
    """
    seg = token_segments(completion_mask) if segment_ids is None else segment_ids.long()
    S = max(max_segments(seg), 1)
    macro_values = macro_aggregate(values, seg, value_agg, S)
    macro_rewards = macro_aggregate(token_rewards, seg, reward_agg, S)
    # The outcome is already inside the token rewards (official layout); the per-row terminal reward is 0, or NaN
    # for unscorable rows, which `compute_segment_gae` turns into all-zero advantages.
    terminal = torch.zeros(seg.size(0), dtype=macro_values.dtype, device=seg.device)
    if scorable is not None:
        terminal = torch.where(scorable.to(seg.device), terminal, torch.full_like(terminal, float("nan")))
    return compute_segment_gae(
        terminal, seg, macro_values, gamma, lam, segment_rewards=macro_rewards, return_returns=True
    )


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """`1 − Var(returns − values) / Var(returns)` over `mask`; NaN when the returns have no variance."""
    keep = mask.bool() & ~torch.isnan(returns)
    if keep.sum() < 2:
        return float("nan")
    y, v = returns[keep].double(), values[keep].double()
    var_y = y.var()
    return float("nan") if var_y == 0 else (1 - (y - v).var() / var_y).item()


@register_advantage_estimator("gae", requires=("critic_values", "segments"))
def gae_estimator(
    batch: CreditBatch,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    kl_coef: float = 0.0,
    kl_estimator: str = "k1",
    whiten_rewards: bool = False,
    whiten_advantages: bool = False,
    macro_value_agg: str = "mean",
    macro_reward_agg: str = "mean",
) -> CreditOutput:
    r"""
    PPO / MA-PPO advantages from a learned critic (`batch.values`), over `batch.segment_ids` (macro actions) or tokens.

    Reads `values`, optionally `segment_ids`, `token_rewards` (extra dense rewards) and, with `kl_coef != 0`,
    `old_logps` and `ref_logps`. Returns `(N, T)` advantages and value targets (`returns`; `NaN` on unscorable rows).
    """
    if batch.values is None:
        raise ValueError("advantage_estimator='gae' needs critic values (batch.values); use trl_credit.PPOTrainer.")
    # Rows without a loss token (truncated under `mask_truncated_completions`) are left out like padding.
    in_loss = (batch.mask > 0).any(dim=1)
    valid = (batch.completion_mask > 0) & in_loss[:, None]
    mask = valid.to(torch.float32)
    N, T = mask.shape
    values = batch.values.to(torch.float32)
    scorable = ~torch.isnan(batch.rewards)

    # ── token rewards: −kl_coef·KL on every token, the outcome on the last one ──
    token_rewards = torch.zeros(N, T, dtype=torch.float32, device=mask.device)
    metrics: dict[str, float] = {}
    if kl_coef != 0.0:
        if batch.old_logps is None or batch.ref_logps is None:
            raise ValueError("kl_coef != 0 needs old_logps and ref_logps in the batch (the trainer provides them).")
        kl = kl_penalty(batch.old_logps.float(), batch.ref_logps.float(), kl_estimator)
        kl = torch.where(valid, kl, torch.zeros_like(kl))
        token_rewards = token_rewards - kl_coef * kl
        metrics["kl"] = (kl.sum() / mask.sum().clamp(min=1)).item()
        metrics["non_score_reward"] = (-kl_coef * kl.sum(1)).mean().item()
    if batch.token_rewards is not None:
        token_rewards = token_rewards + torch.where(valid, batch.token_rewards.float(), torch.zeros_like(token_rewards))
    length = valid.sum(1)
    has_tokens = length > 0
    last = (length - 1).clamp(min=0)
    rows = torch.arange(N, device=mask.device)
    outcome = torch.where(scorable & has_tokens, batch.rewards.float(), torch.zeros_like(batch.rewards.float()))
    if T:  # with no token column there is no last token to hold the outcome (and nothing to credit)
        token_rewards[rows, last] += outcome
    if whiten_rewards:
        token_rewards = torch.where(valid, masked_whiten(token_rewards, valid & scorable[:, None], False), 0.0)

    # ── GAE over macros (tokens when no segmentation is configured) ──
    seg = batch.segment_ids if batch.segment_ids is not None else token_segments(mask)
    seg = torch.where(valid, seg.long(), torch.full_like(seg.long(), -1))
    advantages, returns = compute_gae_advantages(
        values, token_rewards, mask, seg, gamma, lam,
        value_agg=macro_value_agg, reward_agg=macro_reward_agg, scorable=scorable,
    )  # fmt: skip
    loss_mask = batch.mask > 0
    train_mask = loss_mask & scorable[:, None]
    raw = advantages[train_mask]
    if raw.numel():
        metrics["advantage_raw_mean"] = raw.mean().item()
        metrics["advantage_raw_std"] = raw.std().item() if raw.numel() > 1 else 0.0
    if whiten_advantages:
        advantages = masked_whiten(advantages, train_mask, True)
    advantages = torch.where(train_mask, advantages, torch.zeros_like(advantages))
    returns = torch.where(scorable[:, None], returns, torch.full_like(returns, float("nan")))
    return CreditOutput(advantages=advantages, returns=returns, metrics=metrics)
