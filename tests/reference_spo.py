"""Slow, loop-by-loop references for SPO (tests only): transcriptions of the official algorithm as the spec states it
(`spo.md` §3.1, §4.2, §4.3, §6), written independently of `trl_credit.credit.spo` (no segment GAE, no tensors)."""

from __future__ import annotations

import math


def spo_chain_reference(probs, rewards, values, *, rho=0.9, k=5, prob_mask=True):
    """
    SPO-chain advantages of each row, the official way (`_compute_token_advantages`): values stored on the last token
    of the segment they close, differences left to right, a back-fill from the next stored position.

    Args:
        probs: per row, the sampling probabilities of its real tokens.
        rewards: per row, the outcome reward.
        values: `values(i, s)` -> V̂ of row `i`'s state before token `s` (called only for the boundary states).
        rho, k: threshold and cutpoints per segment.
        prob_mask: the official probability mask (`p < rho` trains, the rest is 0 and out of the loss).

    Returns:
        `(advantages, loss_mask, states)`: per row lists of floats, of 0/1 and the token positions whose prefix state
        was estimated (what the rollouts would continue).
    """
    all_adv, all_mask, all_states = [], [], []
    for i, (ps, r) in enumerate(zip(probs, rewards)):
        T = len(ps)
        cut = [t for t in range(T) if ps[t] < rho]
        bounds = cut[::k]
        all_states.append(list(bounds))
        mask = [1.0 if ps[t] < rho else 0.0 for t in range(T)] if prob_mask else [1.0] * T
        if not cut or T == 0:
            all_adv.append([0.0] * T)
            all_mask.append(mask)
            continue
        token_values = [None] * T
        token_values[T - 1] = r  # terminal
        base = values(i, 0) if bounds[0] == 0 else None
        for b in bounds:
            if b > 0:
                token_values[b - 1] = values(i, b)  # official "cutpoint" b - 1: the last token of the prefix
        stored = {}
        for t in range(T):
            if token_values[t] is not None:
                stored[t] = (token_values[t] - base) if base is not None else 0.0
                base = token_values[t]
        adv = [0.0] * T
        nxt = None
        for t in range(T - 1, -1, -1):  # every token takes the advantage of the next stored position
            if t in stored:
                nxt = stored[t]
            adv[t] = nxt
        if prob_mask:
            adv = [a if ps[t] < rho else 0.0 for t, a in enumerate(adv)]
        all_adv.append(adv)
        all_mask.append(mask)
    return all_adv, all_mask, all_states


def whiten_reference(advantages, mask, eps=1e-8):
    """The official `masked_whiten` (unbiased variance) over the tokens with mask 1; 0 outside the mask."""
    flat = [a for row, m in zip(advantages, mask) for a, w in zip(row, m) if w]
    if not flat:
        return [[a if w else 0.0 for a, w in zip(row, m)] for row, m in zip(advantages, mask)]
    mean = sum(flat) / len(flat)
    var = sum((a - mean) ** 2 for a in flat) / (len(flat) - 1) if len(flat) > 1 else 0.0
    scale = math.sqrt(var + eps)
    return [[(a - mean) / scale if w else 0.0 for a, w in zip(row, m)] for row, m in zip(advantages, mask)]
