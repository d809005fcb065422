r"""
Macro actions: contiguous runs of generated tokens on which credit is computed (MA-RLHF, Chai et al., "MA-RLHF:
Reinforcement Learning from Human Feedback with Macro Actions", https://huggingface.co/papers/2410.02743).

Generation and the vocabulary are unchanged; only the credit is computed on a coarser time grid (a semi-MDP). A
segmentation is a `(N, T)` long tensor `segment_ids`: macro index `0..K_i−1` of every valid token, non-decreasing
along the completion, `-1` on padding. Every rule here is built from one primitive, *macro starts*, turned into ids by
a cumulative sum, so **a macro is never empty** (the official fixed n-gram loop inserts an empty macro whenever
`(T−1) mod n = 0`, which also breaks its claim that n = 1 is vanilla PPO; see `docs/macro-actions.md`).

Termination rules (`macro_action`):

- `"token"`: one token per macro (classic token-level credit).
- `"ngram"`: a new macro every `n` valid tokens (fixed n-gram; MA-RLHF ships n = 5 for text, 10 for code).
- `"random_ngram"`: macro lengths drawn without replacement from a shuffled list (official list `[1, 2, 3, 5, 10]`,
  each repeated `repeat_times`); once the list is exhausted, all remaining tokens form **one** macro.
- `"punctuation"`: a tokenizer-aware rule set on the decoded text of each token, standing in for the official
  constituency parser (see [`punctuation_token_flags`]).
- `"perplexity"`: cut points where the per-token perplexity `exp(−log p)` rises; `"code"` starts the macro at the
  token *before* the rise (official code after its PPL fix), `"paper"` at the rising token (paper wording, which makes
  the perplexity non-increasing inside every macro).
- `"step"`: reasoning steps from a text splitter (the VinePPO splitters, [`boundary_segments`]).

With `last_singleton=True` (official) the last valid token is always its own macro, so the outcome reward is never
averaged with the dense (KL) rewards of other tokens.

Macro values and rewards (`macro_aggregate`): the official code averages the token values (`"mean"`, σ = equal) and
the token rewards (`"mean"`) of a macro; the paper defines the macro reward as a sum (`"sum"`), and semi-MDP theory uses
the value at the macro's start state (`"first"`).

TEMPO at macro granularity (`compute_macro_tempo_advantages`): prefix-tree nodes are read only at macro boundaries,
so macro `k` of completion `i` carries the TD `V(s_{k+1}) − V(s_k)` between the tree values of the prefixes ending
before and after it, and every token of the macro receives it (as every token of an MA-PPO macro receives `A_k`).

Deviations from the official code (`ernie-research/MA-RLHF@807551d`, `dschat/rlhf/ppo_trainer.py`):
- no empty macros (fixed n-gram, above), so `macro_action="ngram", n=1` equals token-level credit bit for bit;
- vectorized over the batch (the official code assumes one sequence per device: `mask[0]`, `ppl[0]`);
- the random n-gram lengths are shuffled with a seeded `torch.Generator`, not Python's `random`;
- the perplexity comparison is done on log-probabilities (`ppl_{i+1} > ppl_i ⇔ log p_{i+1} < log p_i`), exact and
  overflow-free;
- the constituency-parse rule (benepar + spaCy, CPU-bound, raises on tokenizer mismatch) is replaced by the
  punctuation rule set, which runs on token ids with one lookup table;
- `value_agg="last"` is the official `unit` σ, which crashes in the official code;
- the paper's macro-level importance ratio, absent from the official code, is available (`macro_log_ratio`, wired into
  the loss by `macro_ratio_level`); the default stays per token, as the official code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .batch import CreditBatch, CreditOutput
from .grpo import advantage_denominator, compute_grpo_advantages
from .prefix_tree import prefix_tree_values, tree_metrics
from .registry import register_advantage_estimator
from .segment_gae import max_segments, segment_counts

MACRO_ACTIONS = ("token", "ngram", "random_ngram", "punctuation", "perplexity", "step")
RANDOM_NGRAM_LENGTHS = (1, 2, 3, 5, 10)  # the official list (it contains 1)
VALUE_AGGREGATIONS = ("mean", "first", "last", "position")
REWARD_AGGREGATIONS = ("mean", "sum")
PPL_BOUNDARIES = ("code", "paper")
RATIO_LEVELS = ("token", "macro_product", "macro_geomean")


# ── segmentation primitives ───────────────────────────────────────────────────────────────────────────────────────
def _valid_positions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`valid (N, T)` bool, `pos (N, T)` index of each valid token among the valid tokens, `length (N,)`."""
    valid = mask.bool()
    pos = valid.long().cumsum(1) - 1
    return valid, pos, valid.sum(1)


def _cut(length: torch.Tensor, last_singleton: bool) -> torch.Tensor:
    """`(N, 1)` number of leading tokens a rule segments: all but the forced last singleton (when there is one)."""
    if not last_singleton:
        return length[:, None]
    return torch.where(length > 1, length - 1, length)[:, None]


def segments_from_starts(
    starts: torch.Tensor,
    mask: torch.Tensor,
    *,
    last_singleton: bool = True,
    max_len: int | None = None,
) -> torch.Tensor:
    r"""
    Turn macro starts into segment ids. The first valid token always starts a macro; starts on padding are ignored.

    Args:
        starts (`torch.Tensor` of shape `(N, T)`, bool):
            `True` where a new macro begins.
        mask (`torch.Tensor` of shape `(N, T)`):
            1 on valid completion tokens (holes allowed: positions count valid tokens only).
        last_singleton (`bool`, *optional*, defaults to `True`):
            Make the last valid token its own macro (official MA-RLHF convention).
        max_len (`int`, *optional*):
            Split every macro longer than `max_len` tokens into chunks of `max_len` (the last chunk may be shorter).

    Returns:
        `torch.Tensor` of shape `(N, T)`, long: macro index `0..K_i−1` on valid tokens, `-1` on padding.

    Example:
    ```python
    >>> mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    >>> segments_from_starts(torch.tensor([[0, 0, 1, 0, 0, 0]]).bool(), mask)
    tensor([[ 0,  0,  1,  1,  2, -1]])
    ```

    Notation: `N` completions, `T` tokens, `K_i` macros of completion `i`.
    """
    valid, pos, length = _valid_positions(mask)
    starts = (starts.bool() | (pos == 0)) & valid
    if max_len is not None:
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1 or None, got {max_len}.")
        # Offset of each token inside its macro = its position minus the position of the latest start.
        start_pos = torch.where(starts, pos, torch.full_like(pos, -1)).cummax(dim=1).values
        starts = starts | (valid & ((pos - start_pos) % max_len == 0))
    if last_singleton:
        starts = starts | (valid & (pos == (length - 1)[:, None]))
    seg = starts.long().cumsum(1) - 1
    return torch.where(valid, seg, torch.full_like(seg, -1))


def token_segments(mask: torch.Tensor) -> torch.Tensor:
    """One macro per valid token: `(N, T)` ids `0..T_i−1`, `-1` on padding (token-level credit)."""
    valid, pos, _ = _valid_positions(mask)
    return torch.where(valid, pos, torch.full_like(pos, -1))


def ngram_segments(mask: torch.Tensor, n: int, *, last_singleton: bool = True) -> torch.Tensor:
    r"""
    Fixed n-gram macros: a new macro every `n` valid tokens (MA-RLHF `fixed`).

    With `last_singleton=True` the first `T_i − 1` tokens are cut every `n` and the last token is alone, as in the
    official code but **without** its empty macro when `(T_i − 1) mod n = 0`; `n = 1` therefore equals
    [`token_segments`] exactly.

    Args:
        mask (`torch.Tensor` of shape `(N, T)`): 1 on valid tokens.
        n (`int`): macro length, ≥ 1.
        last_singleton (`bool`, *optional*, defaults to `True`): last valid token alone.

    Returns:
        `torch.Tensor` of shape `(N, T)`, long segment ids (`-1` on padding).

    Example (the spec's `T = 6, n = 2` worked example):
    ```python
    >>> ngram_segments(torch.ones(1, 6), 2)
    tensor([[0, 0, 1, 1, 2, 3]])
    ```
    """
    if n < 1:
        raise ValueError(f"The macro length n must be >= 1, got {n}: a macro of {n} tokens would be empty.")
    _, pos, _ = _valid_positions(mask)
    return segments_from_starts(pos % n == 0, mask, last_singleton=last_singleton)


def random_ngram_segments(
    mask: torch.Tensor,
    *,
    lengths: Sequence[int] = RANDOM_NGRAM_LENGTHS,
    repeat_times: int = 1,
    generator: torch.Generator | None = None,
    last_singleton: bool = True,
) -> torch.Tensor:
    r"""
    Randomized n-gram macros (MA-RLHF `randomized`): each completion shuffles `lengths` (each entry repeated
    `repeat_times`) and its consecutive macros take these lengths; the tokens left when the list is exhausted form one
    macro ("length ∞" in the official code).

    Args:
        mask (`torch.Tensor` of shape `(N, T)`): 1 on valid tokens.
        lengths (`Sequence[int]`, *optional*, defaults to `(1, 2, 3, 5, 10)`): the official list (it contains 1).
        repeat_times (`int`, *optional*, defaults to `1`): copies of each length in the list.
        generator (`torch.Generator`, *optional*): CPU generator for the shuffles (seed it for reproducibility).
        last_singleton (`bool`, *optional*, defaults to `True`): last valid token alone.

    Returns:
        `torch.Tensor` of shape `(N, T)`, long segment ids (`-1` on padding).
    """
    if len(lengths) == 0 or min(lengths) < 1 or repeat_times < 1:
        raise ValueError(f"lengths must be non-empty positive integers and repeat_times >= 1, got {lengths}, "
                         f"{repeat_times}.")  # fmt: skip
    valid, pos, length = _valid_positions(mask)
    N = mask.size(0)
    pool = torch.tensor(list(lengths) * repeat_times, dtype=torch.long)
    order = torch.rand(N, pool.numel(), generator=generator).argsort(dim=1)
    ends = pool[order].cumsum(1).to(mask.device)  # (N, L): exclusive end of each listed macro
    # Macro index of each position: how many listed macros end at or before it (L = the leftover macro).
    index = torch.searchsorted(ends, pos.clamp(min=0).contiguous(), right=True)
    cut = _cut(length, last_singleton)
    previous = torch.cat([torch.full_like(index[:, :1], -1), index[:, :-1]], dim=1)
    starts = valid & (pos < cut) & (index != previous)
    return segments_from_starts(starts, mask, last_singleton=last_singleton)


def perplexity_segments(
    logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    boundary: str = "code",
    last_singleton: bool = True,
    max_len: int | None = None,
) -> torch.Tensor:
    r"""
    Perplexity cut points (MA-RLHF `ppl`). With `ppl_t = exp(−logps_t)`, a rise `ppl_{i+1} > ppl_i` (for `i + 1` before
    the forced last singleton) starts a macro at token `i` (`boundary="code"`, the official code after its PPL fix) or
    at token `i + 1` (`boundary="paper"`: "terminate when the next token would increase the macro's perplexity", so
    the perplexity is non-increasing inside every macro).

    Args:
        logps (`torch.Tensor` of shape `(N, T)`):
            Per-token log-probabilities of the sampled tokens (the official code uses the reference model's; any
            log-probabilities TRL already has will do). `NaN` never triggers a cut.
        mask (`torch.Tensor` of shape `(N, T)`): 1 on valid tokens (a contiguous prefix of each row).
        boundary (`str`, *optional*, defaults to `"code"`): `"code"` or `"paper"`.
        last_singleton (`bool`, *optional*, defaults to `True`): last valid token alone.
        max_len (`int`, *optional*): split longer macros into chunks of `max_len`.

    Returns:
        `torch.Tensor` of shape `(N, T)`, long segment ids (`-1` on padding).

    Example (the spec's vector: PPL `[10, 9, 8, 8.5, 7.5, 7, 6.5, 6.8, 6, 5.5]`; starts {0, 2, 6} + the last token):
    ```python
    >>> ppl = torch.tensor([[10, 9, 8, 8.5, 7.5, 7, 6.5, 6.8, 6, 5.5]])
    >>> perplexity_segments(-ppl.log(), torch.ones_like(ppl))
    tensor([[0, 0, 1, 1, 1, 1, 2, 2, 2, 3]])
    ```
    """
    if boundary not in PPL_BOUNDARIES:
        raise ValueError(f"boundary must be one of {PPL_BOUNDARIES}, got {boundary!r}.")
    valid, pos, length = _valid_positions(mask)
    cut = _cut(length, last_singleton)
    logps = logps.float()
    # rise[:, i] compares token i with i + 1; both must be before the cut (the last singleton takes no part).
    rise = (logps[:, 1:] < logps[:, :-1]) & valid[:, 1:] & (pos[:, 1:] < cut)
    false = torch.zeros(rise.size(0), 1, dtype=torch.bool, device=rise.device)
    starts = torch.cat([rise, false], dim=1) if boundary == "code" else torch.cat([false, rise], dim=1)
    return segments_from_starts(starts, mask, last_singleton=last_singleton, max_len=max_len)


def boundary_segments(
    starts: Sequence[Sequence[int]],
    mask: torch.Tensor,
    *,
    last_singleton: bool = True,
    max_len: int | None = None,
) -> torch.Tensor:
    r"""
    Segments from explicit start positions per completion (e.g. reasoning-step boundaries from a text splitter).

    Args:
        starts (`Sequence[Sequence[int]]`, length `N`):
            Token positions (among the valid tokens) where a macro begins; position 0 is implied, out-of-range and
            duplicate positions are ignored.
        mask (`torch.Tensor` of shape `(N, T)`): 1 on valid tokens.
        last_singleton (`bool`, *optional*, defaults to `True`): last valid token alone.
        max_len (`int`, *optional*): split longer macros into chunks of `max_len`.

    Returns:
        `torch.Tensor` of shape `(N, T)`, long segment ids (`-1` on padding).
    """
    valid, pos, _ = _valid_positions(mask)
    if len(starts) != mask.size(0):
        raise ValueError(f"Expected one list of starts per completion ({mask.size(0)}), got {len(starts)}.")
    rows = [i for i, s in enumerate(starts) for _ in s]
    cols = [int(c) for s in starts for c in s]
    flags = torch.zeros(mask.size(0), mask.size(1) + 1, dtype=torch.bool, device=mask.device)
    if rows:
        cols_t = torch.tensor(cols, dtype=torch.long, device=mask.device).clamp(min=0, max=mask.size(1))
        flags[torch.tensor(rows, device=mask.device), cols_t] = True
    # Positions count valid tokens only, so map each valid token's position back to a start flag.
    on = flags.gather(1, pos.clamp(min=0, max=mask.size(1))) & valid
    return segments_from_starts(on, mask, last_singleton=last_singleton, max_len=max_len)


# ── punctuation / parse-style boundaries ──────────────────────────────────────────────────────────────────────────
BREAK_AFTER_SENTENCE = 1  # token ends a sentence: . ! ? …
BREAK_AFTER_CLAUSE = 2  # token ends a clause: , ; :
BREAK_AFTER_LINE = 4  # token contains a newline
BREAK_AFTER_CLOSE = 8  # token ends with a closing bracket
BREAK_BEFORE = 16  # token opens a constituent: an opening bracket, or a conjunction / relative word after a space
ATTACH = 32  # token never starts a macro: whitespace, closing punctuation, special tokens
DIGIT_CONTINUES = 64  # token starts with a digit (no space): "3" "." "14" and "1" "," "000" stay one macro

_SENTENCE_END = ".!?…。！？"
_CLAUSE_END = ",;:，；："
_OPENERS = "([{"
_CLOSERS = ")]}"
_ATTACHING = set(_SENTENCE_END + _CLAUSE_END + _CLOSERS + "\"'`”’»")
CONSTITUENT_WORDS = frozenset(
    "and or but so because since then which that while if when where therefore thus hence although unless "
    "whereas whose who whom".split()
)


def punctuation_token_flags(texts: Sequence[str], special: Sequence[bool] | None = None) -> torch.Tensor:
    r"""
    Classify every vocabulary entry once, from its decoded text, for [`punctuation_segments`].

    The rule set approximates the clause / phrase constituents the official parser produces, on token strings:

    1. a token whose text (trailing spaces removed) ends with `. ! ? …` (or the CJK forms) ends a sentence, and one
       ending with `, ; :` ends a clause: the next token starts a macro;
    2. a token containing a newline ends a line: the next token starts a macro;
    3. a token ending with `) ] }` closes a bracketed constituent: the next token starts a macro;
    4. a token whose text starts with `( [ {`, or is a whole conjunction / relative word preceded by a space
       (` and`, ` because`, ` which`, … see `CONSTITUENT_WORDS`), starts a macro itself;
    5. a token that is only whitespace or only closing punctuation (`".\n"` split as `"."` + `"\n"`, `")."`), and every
       special token (EOS), never starts a macro: it attaches to the macro before it;
    6. a sentence or clause end followed by a token starting with a digit and no space (`3` `.` `14`, `1` `,` `000`)
       is a decimal or thousands separator, not a boundary.

    Args:
        texts (`Sequence[str]`): decoded text of every token id (index = id), leading spaces included.
        special (`Sequence[bool]`, *optional*): `True` for special tokens.

    Returns:
        `torch.Tensor` of shape `(V,)`, long: OR of the `BREAK_*`, `ATTACH` and `DIGIT_CONTINUES` bit flags.

    Example:
    ```python
    >>> flags = punctuation_token_flags(["Hi", ".", " and", "\n", "3"])
    >>> [bool(f & BREAK_AFTER_SENTENCE) for f in flags], [bool(f & BREAK_BEFORE) for f in flags]
    ([False, True, False, False, False], [False, False, True, False, False])
    ```
    """
    out = []
    for i, text in enumerate(texts):
        flags = 0
        if special is not None and special[i]:
            out.append(ATTACH)
            continue
        stripped = text.rstrip(" \t")
        core = text.strip()
        if stripped.endswith(tuple(_SENTENCE_END)):
            flags |= BREAK_AFTER_SENTENCE
        elif stripped.endswith(tuple(_CLAUSE_END)):
            flags |= BREAK_AFTER_CLAUSE
        if "\n" in text:
            flags |= BREAK_AFTER_LINE
        if stripped.endswith(tuple(_CLOSERS)):
            flags |= BREAK_AFTER_CLOSE
        if core.startswith(tuple(_OPENERS)) or (text[:1].isspace() and core.lower() in CONSTITUENT_WORDS):
            flags |= BREAK_BEFORE
        if not core or set(core) <= _ATTACHING:
            flags |= ATTACH
        if text[:1].isdigit():
            flags |= DIGIT_CONTINUES
        out.append(flags)
    return torch.tensor(out, dtype=torch.long)


def punctuation_segments(
    completion_ids: torch.Tensor,
    mask: torch.Tensor,
    token_flags: torch.Tensor,
    *,
    last_singleton: bool = True,
    max_len: int | None = None,
) -> torch.Tensor:
    r"""
    Punctuation / parse-style macros from per-token flags (rules in [`punctuation_token_flags`]).

    Args:
        completion_ids (`torch.Tensor` of shape `(N, T)`, long): token ids.
        mask (`torch.Tensor` of shape `(N, T)`): 1 on valid tokens (a contiguous prefix of each row).
        token_flags (`torch.Tensor` of shape `(V,)`, long): from [`punctuation_token_flags`]; ids `≥ V` get no flag.
        last_singleton (`bool`, *optional*, defaults to `True`): last valid token alone.
        max_len (`int`, *optional*): split longer macros into chunks of `max_len` (the official parser's cutoff C = 5
            bounds macros from above in the same spirit).

    Returns:
        `torch.Tensor` of shape `(N, T)`, long segment ids (`-1` on padding).
    """
    table = token_flags.to(completion_ids.device)
    in_vocab = (completion_ids >= 0) & (completion_ids < table.numel())
    flags = torch.where(in_vocab, table[completion_ids.clamp(min=0, max=table.numel() - 1)], 0)
    prev = torch.cat([torch.zeros_like(flags[:, :1]), flags[:, :-1]], dim=1)
    punct_end = (prev & (BREAK_AFTER_SENTENCE | BREAK_AFTER_CLAUSE)) != 0
    number = (flags & DIGIT_CONTINUES) != 0
    after = (punct_end & ~number) | ((prev & (BREAK_AFTER_LINE | BREAK_AFTER_CLOSE)) != 0)
    starts = (after | ((flags & BREAK_BEFORE) != 0)) & ((flags & ATTACH) == 0)
    return segments_from_starts(starts, mask, last_singleton=last_singleton, max_len=max_len)


# ── macro statistics and aggregation ──────────────────────────────────────────────────────────────────────────────
def num_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """`(N,)` number of macros of each completion (0 for an empty row, and for every row when `T = 0`)."""
    return segment_counts(segment_ids)


def segment_metrics(segment_ids: torch.Tensor) -> dict[str, float]:
    """Mean macro count per completion and mean macro length (tokens), over non-empty completions."""
    counts = num_segments(segment_ids)
    nonempty = counts > 0
    if not nonempty.any():
        return {"macro_count": 0.0, "macro_len": 0.0}
    tokens = (segment_ids >= 0).sum()
    return {
        "macro_count": counts[nonempty].float().mean().item(),
        "macro_len": (tokens / counts.sum()).item(),
    }


def _scatter_sum(x: torch.Tensor, segment_ids: torch.Tensor, S: int) -> torch.Tensor:
    index = torch.where(segment_ids >= 0, segment_ids, S)  # padding goes to a dummy column, then dropped
    out = torch.zeros(x.size(0), S + 1, dtype=x.dtype, device=x.device)
    return out.scatter_add_(1, index, x)[:, :S]


def macro_aggregate(
    x: torch.Tensor, segment_ids: torch.Tensor, how: str = "mean", num_columns: int | None = None
) -> torch.Tensor:
    r"""
    Aggregate token quantities (values, rewards) per macro.

    Args:
        x (`torch.Tensor` of shape `(N, T)`): token values or rewards; padding is ignored.
        segment_ids (`torch.Tensor` of shape `(N, T)`, long): macro ids, `-1` on padding.
        how (`str`, *optional*, defaults to `"mean"`):
            `"mean"` (official σ = equal), `"sum"` (paper's macro reward), `"first"` (value at the macro's start
            state), `"last"` (official σ = unit), `"position"` (official σ_j ∝ 1/(j+1), normalized).
        num_columns (`int`, *optional*): `S`, defaults to the largest macro count.

    Returns:
        `torch.Tensor` of shape `(N, S)`; 0 beyond each completion's macros.

    Example:
    ```python
    >>> seg = torch.tensor([[0, 0, 1, 1, 2, 3]])
    >>> macro_aggregate(torch.tensor([[.1, .2, .3, .4, .5, .6]]), seg)
    tensor([[0.1500, 0.3500, 0.5000, 0.6000]])
    ```
    """
    S = max_segments(segment_ids) if num_columns is None else num_columns
    S = max(S, 1)
    valid = segment_ids >= 0
    x = torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))
    if how == "sum":
        return _scatter_sum(x, segment_ids, S)
    prev = torch.cat([torch.full_like(segment_ids[:, :1], -1), segment_ids[:, :-1]], dim=1)
    is_start = valid & (segment_ids != prev)
    if how == "mean":
        weights = valid.to(x.dtype)
    elif how == "first":
        weights = is_start.to(x.dtype)
    elif how == "last":
        nxt = torch.cat([segment_ids[:, 1:], torch.full_like(segment_ids[:, :1], -1)], dim=1)
        weights = (valid & (segment_ids != nxt)).to(x.dtype)
    elif how == "position":
        # Offset j of each token inside its macro; weight 1/(j+1).
        t = torch.arange(segment_ids.size(1), device=x.device).expand_as(segment_ids)
        start_t = torch.where(is_start, t, torch.zeros_like(t)).cummax(dim=1).values
        weights = torch.where(valid, 1.0 / (t - start_t + 1).to(x.dtype), torch.zeros((), dtype=x.dtype))
    else:
        raise ValueError(f"Unknown aggregation {how!r}; expected one of {('sum',) + VALUE_AGGREGATIONS}.")
    if how == "position":
        weighted = x * weights
    else:  # 0/1 weights select through `where`, so a one-token macro returns its value bit for bit
        weighted = torch.where(weights > 0, x, torch.zeros_like(x))
    total = _scatter_sum(weighted, segment_ids, S)
    count = _scatter_sum(weights, segment_ids, S)
    return torch.where(count > 0, total / count.clamp(min=torch.finfo(x.dtype).tiny), torch.zeros_like(total))


def broadcast_to_tokens(per_macro: torch.Tensor, segment_ids: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """`(N, S)` per-macro quantity → `(N, T)`: every token gets its macro's entry, `fill` on padding."""
    gathered = per_macro.gather(1, segment_ids.clamp(min=0))
    return torch.where(segment_ids >= 0, gathered, torch.full_like(gathered, fill))


def macro_log_ratio(log_ratio: torch.Tensor, segment_ids: torch.Tensor, level: str = "token") -> torch.Tensor:
    r"""
    Importance log-ratio at macro level (MA-RLHF's objective clips `π(ω_τ|s_τ)/π_old(ω_τ|s_τ)`; the official code
    uses per-token ratios).

    Args:
        log_ratio (`torch.Tensor` of shape `(N, T)`): `log π − log π_old` per token (differentiable).
        segment_ids (`torch.Tensor` of shape `(N, T)`, long): macro ids, `-1` on padding.
        level (`str`, *optional*, defaults to `"token"`):
            `"token"` (unchanged, official code), `"macro_product"` (sum of the macro's log-ratios: the paper's
            product of probabilities) or `"macro_geomean"` (their mean: GSPO-style, numerically safer).

    Returns:
        `torch.Tensor` of shape `(N, T)`: every token carries its macro's log-ratio (0 on padding).
    """
    if level == "token":
        return log_ratio
    if level not in ("macro_product", "macro_geomean"):
        raise ValueError(f"level must be 'token', 'macro_product' or 'macro_geomean', got {level!r}.")
    S = max(max_segments(segment_ids), 1)
    per_macro = macro_aggregate(log_ratio, segment_ids, "sum" if level == "macro_product" else "mean", S)
    return broadcast_to_tokens(per_macro, segment_ids)


# ── TEMPO at macro granularity ────────────────────────────────────────────────────────────────────────────────────
@torch.no_grad()
def compute_macro_tempo_advantages(
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    rewards: torch.Tensor,
    num_generations: int,
    segment_ids: torch.Tensor | None = None,
    scale_rewards: str = "group",
    branch_td_coef: float = 1.0,
    *,
    loss_mask: torch.Tensor | None = None,
    return_metrics: bool = False,
):
    r"""
    TEMPO (https://huggingface.co/papers/2509.18314) with prefix-tree nodes read only at macro boundaries:

    $$A_{i,t} = A^{\mathrm{GRPO}}_i + c \cdot \frac{V(s^i_{k+1}) - V(s^i_k)}{\sigma + \epsilon}, \qquad t \in \omega_k$$

    where `s_k` is the prefix before macro `ω_k` and `V` the tree value (mean outcome of the completions sharing the
    prefix). Tree values change only at branch tokens, so the macro TD is the sum of the token-level TEMPO TD terms
    inside the macro; every token of the macro receives it. Single-token macros give token-level TEMPO **exactly**.

    Args:
        completion_ids, completion_mask, rewards, num_generations, scale_rewards, branch_td_coef, loss_mask:
            As [`~trl_credit.credit.compute_tempo_advantages`].
        segment_ids (`torch.Tensor` of shape `(N, T)`, long, *optional*):
            Macro ids (`-1` on padding); `None` = one macro per token (token-level TEMPO).
        return_metrics (`bool`, *optional*, defaults to `False`):
            Also return the tree diagnostics.

    Returns:
        `torch.Tensor` of shape `(N, T)` (0 outside the loss mask), and a metrics dict if `return_metrics`.
    """
    rewards = rewards.to(torch.float32)
    tree = prefix_tree_values(completion_ids, completion_mask, rewards, num_generations)
    outcome = compute_grpo_advantages(rewards, num_generations, scale_rewards)
    denom = advantage_denominator(rewards, num_generations, scale_rewards)
    td = torch.where(tree.is_branch, tree.v_child - tree.v_parent, torch.zeros_like(tree.v_child))
    td = torch.nan_to_num(td, nan=0.0, posinf=0.0, neginf=0.0)  # empty subtrees (unscorable members only)
    if segment_ids is not None:
        S = max(max_segments(segment_ids), 1)
        td = broadcast_to_tokens(_scatter_sum(td, segment_ids, S), segment_ids)
    # A group whose std is undefined (one scorable member) has no TD signal, as in token-level TEMPO.
    extra = torch.nan_to_num(branch_td_coef * td / denom[:, None], nan=0.0, posinf=0.0, neginf=0.0)
    extra = torch.where(torch.isnan(rewards)[:, None], torch.zeros_like(extra), extra)
    keep = (loss_mask if loss_mask is not None else completion_mask) > 0
    advantages = torch.where(keep, outcome[:, None] + extra, torch.zeros_like(extra))
    if not return_metrics:
        return advantages
    return advantages, tree_metrics(tree, torch.where(keep, extra, torch.zeros_like(extra)))


@register_advantage_estimator("macro_tempo", requires=("segments",))
def macro_tempo_estimator(
    batch: CreditBatch,
    *,
    scale_rewards: str = "group",
    branch_td_coef: float = 1.0,
    multi_objective_aggregation: str = "sum_then_normalize",
) -> CreditOutput:
    """TEMPO on macro actions (`macro_action`); token-level TEMPO when no segmentation is configured."""
    if multi_objective_aggregation != "sum_then_normalize":
        raise ValueError(
            "advantage_estimator='macro_tempo' computes tree values of the aggregated reward and needs "
            f"multi_objective_aggregation='sum_then_normalize', got {multi_objective_aggregation!r}."
        )
    advantages, metrics = compute_macro_tempo_advantages(
        batch.completion_ids,
        batch.completion_mask,
        batch.rewards,
        batch.num_generations,
        batch.segment_ids,
        scale_rewards,
        branch_td_coef,
        loss_mask=batch.loss_mask,
        return_metrics=True,
    )
    return CreditOutput(advantages=advantages, metrics=metrics)
