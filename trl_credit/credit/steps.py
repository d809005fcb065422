r"""
Reasoning-step segmentation of completions for step-level credit (VinePPO, https://huggingface.co/papers/2410.01679).

A completion of `T` tokens is cut into `S` steps with token boundaries `0 = b_0 < b_1 < … < b_S = T`. The state
before step `k` is the prompt followed by the first `b_k` completion tokens: a **token-id prefix of the actual
completion**, never re-tokenized text. Splitting works on the decoded text, then each token takes the step of its
**first character** (the official rule); a token without characters of its own (EOS, other special tokens) takes the
step of the token before it, so a trailing EOS belongs to the last step.

Splitters (`step_split`):

- `"newline"`: the official GSM8K rule: split before every `\n` (the newline starts the next step), empty and
  whitespace-only pieces merged into the following step, the `\n#### <answer>` line merged into the last step.
- `"math"`: the official LaTeX-aware MATH splitter (`split_solution_inplace` of the official code), rewritten from its
  description: math is protected by fixed-length placeholders, the text is split at sentence ends and newlines, short
  pieces are merged, sentences that end inside math are split, display math is split at its own newlines, and parts
  over 100 characters are broken at the language or math separator closest to their middle. Inline math (`$…$`,
  `\(…\)`) is never cut.
- `"token_chunks"`: every `n` tokens, for outputs without text structure.

Deviations from the official code:

- Steps are mapped to tokens of the completion that was sampled (the official code re-tokenizes text prefixes).
- A splitter that fails falls back to `"newline"`, then to a single step, and is counted (the official code drops the
  trajectory, which TRL's fixed group shapes do not allow).
- `"math"` also merges a part made only of a closing delimiter (`\]`, `$$`, `\end{…}`) into the part before it, so
  no state ends just before a closing delimiter; an unclosed `$` is plain text, and inline math may not contain a
  blank line (LaTeX forbids it), which keeps one stray `$` in generated text from swallowing the rest of the answer.

Notation: `N` completions, `T` padded completion length, `S` steps (segments), `c` the cap `vine_max_steps`, `m` the
boundary stride.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import re
from collections.abc import Callable, Sequence

import torch


STEP_SPLITS = ("newline", "math", "token_chunks")
MAX_PART_LENGTH = 100  # official MAX_PART_LENGTH of the MATH splitter
PLACEHOLDER_LENGTH = 60  # official placeholder length
_SHORT_PART = 20  # parts shorter than this that do not end a sentence are merged forward
_TINY_PART = 3
_LANGUAGE_MIN_HALF = 40
_MATH_MIN_HALF = 20


# ── "newline": the official GSM8K rule ─────────────────────────────────────────────────────────────────────────────
def split_newline(text: str) -> list[int]:
    r"""
    Character boundaries `[0, …, len(text)]` of the GSM8K newline split.

    Each `\n` starts a new step; pieces with no visible content (consecutive newlines, leading whitespace) are merged
    into the step that follows them, the final answer line (`\n#### 42`) and trailing whitespace into the step
    before.

    Example:
    ```python
    >>> text = "Tom has 3.\n\nHe buys 2.\n#### 5"
    >>> b = split_newline(text)
    >>> [text[i:j] for i, j in zip(b, b[1:])]
    ['Tom has 3.', '\n\nHe buys 2.\n#### 5']
    ```
    """
    n = len(text)
    bounds = [0] + [i for i, ch in enumerate(text) if ch == "\n" and i > 0] + [n]
    bounds = sorted(set(bounds))
    # Pieces without visible content join the following piece (leading empties, blank lines).
    kept = [0]
    for k in range(1, len(bounds) - 1):
        if text[kept[-1] : bounds[k]].strip():
            kept.append(bounds[k])
    kept.append(n)
    # The answer line and a trailing whitespace-only piece join the piece before.
    while len(kept) > 2:
        last = text[kept[-2] : kept[-1]]
        if not last.strip() or last.lstrip("\n").startswith("####"):
            del kept[-2]
        else:
            break
    return kept


# ── "math": the LaTeX-aware MATH splitter ──────────────────────────────────────────────────────────────────────────
class _Span:
    """A protected region of the text: `kind` is "inline" ($…$, \\(…\\)), "display" ($$…$$, \\[…\\], environments) or
    "block" ([asy]…[/asy], tabular: never split inside)."""

    __slots__ = ("start", "end", "kind", "open_len", "close_len")

    def __init__(self, start: int, end: int, kind: str, open_len: int, close_len: int):
        self.start, self.end, self.kind, self.open_len, self.close_len = start, end, kind, open_len, close_len


_BEGIN = re.compile(r"\\begin\{([^{}\n]+)\}")


def _is_escaped(text: str, i: int) -> bool:
    backslashes = 0
    while i - 1 - backslashes >= 0 and text[i - 1 - backslashes] == "\\":
        backslashes += 1
    return backslashes % 2 == 1


def _find_unescaped(text: str, token: str, start: int) -> int:
    i = text.find(token, start)
    while i >= 0 and _is_escaped(text, i):
        i = text.find(token, i + 1)
    return i


def _matching_end(text: str, env: str, start: int) -> int:
    """Index just past the `\\end{env}` that closes the `\\begin{env}` ending at `start` (nesting-aware), or -1."""
    begin, end = f"\\begin{{{env}}}", f"\\end{{{env}}}"
    depth, i = 1, start
    while depth:
        j = text.find(end, i)
        if j < 0:
            return -1
        depth += text.count(begin, i, j) - 1
        i = j + len(end)
    return i


def find_math_spans(text: str) -> list[_Span]:
    r"""
    The protected regions of `text`, left to right, non-overlapping: `[asy]…[/asy]`, `\begin{env}…\end{env}`
    (tabular as an unsplittable block), `$$…$$`, `\[…\]`, `\(…\)`, `$…$`. Escaped dollars (`\$5`) are text; an
    unclosed delimiter is text; inline `$…$` cannot contain a blank line.
    """
    spans: list[_Span] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "[" and text.startswith("[asy]", i):
            j = text.find("[/asy]", i + 5)
            if j >= 0:
                spans.append(_Span(i, j + 6, "block", 5, 6))
                i = j + 6
                continue
        elif ch == "\\":
            nxt = text[i + 1 : i + 2]
            if nxt == "b" and (m := _BEGIN.match(text, i)):
                env = m.group(1)
                j = _matching_end(text, env, m.end())
                if j >= 0:
                    kind = "block" if env.startswith("tabular") else "display"
                    spans.append(_Span(i, j, kind, m.end() - i, len(f"\\end{{{env}}}")))
                    i = j
                    continue
            elif nxt in ("[", "("):
                close = "\\]" if nxt == "[" else "\\)"
                j = text.find(close, i + 2)
                if j >= 0:
                    spans.append(_Span(i, j + 2, "display" if nxt == "[" else "inline", 2, 2))
                    i = j + 2
                    continue
            i += 2  # an escaped character (\$, \\, \{): never a delimiter
            continue
        elif ch == "$":
            if text.startswith("$$", i):
                j = _find_unescaped(text, "$$", i + 2)
                if j >= 0:
                    spans.append(_Span(i, j + 2, "display", 2, 2))
                    i = j + 2
                    continue
                i += 2
                continue
            j = _find_unescaped(text, "$", i + 1)
            if j >= 0 and "\n\n" not in text[i + 1 : j]:
                spans.append(_Span(i, j + 1, "inline", 1, 1))
                i = j + 1
                continue
        i += 1
    return spans


class _PlaceholderText:
    """The text with every math span replaced by a 60-character placeholder, and the index map back."""

    def __init__(self, text: str, spans: list[_Span]):
        pieces, ph_starts, orig_starts, kinds = [], [], [], []
        pos = ph = 0
        for span in spans:
            if span.start > pos:
                pieces.append(text[pos : span.start])
                ph_starts.append(ph)
                orig_starts.append(pos)
                kinds.append(None)
                ph += span.start - pos
            digest = hashlib.md5(text[span.start : span.end].encode("utf-8")).hexdigest()
            # Lower-case letters only: a placeholder never looks like a sentence start or an abbreviation.
            placeholder = ("math" + "".join(chr(ord("a") + int(c, 16)) for c in digest)).ljust(PLACEHOLDER_LENGTH, "x")
            pieces.append(placeholder)
            ph_starts.append(ph)
            orig_starts.append(span.start)
            kinds.append(span)
            ph += PLACEHOLDER_LENGTH
            pos = span.end
        if pos < len(text):
            pieces.append(text[pos:])
            ph_starts.append(ph)
            orig_starts.append(pos)
            kinds.append(None)
            ph += len(text) - pos
        self.text = "".join(pieces)
        self._ph_starts, self._orig_starts, self._spans = ph_starts, orig_starts, kinds
        self._orig_len = len(text)

    def to_orig(self, idx: int) -> int:
        if idx >= len(self.text):
            return self._orig_len
        k = bisect.bisect_right(self._ph_starts, idx) - 1
        span = self._spans[k]
        if span is None:
            return self._orig_starts[k] + idx - self._ph_starts[k]
        if idx != self._ph_starts[k]:
            raise AssertionError("a boundary fell inside a math placeholder")
        return span.start

    def placeholders(self):
        """(placeholder end index, span) for every math span."""
        return [(s + PLACEHOLDER_LENGTH, sp) for s, sp in zip(self._ph_starts, self._spans) if sp is not None]


_SENTENCE_END = re.compile(r"\.(?=\s+[A-Z])")
_WORD_BEFORE = re.compile(r"\S+$")
# The word before the period of an abbreviation, not a sentence end: "e.g", "i.e" (letters joined by periods), or a
# capitalized one- or two-letter word ("Mr", "Dr", an initial "J").
_ABBREVIATION = re.compile(r"(?:[A-Za-z]\.)+[A-Za-z]|[A-Z][a-z]?")


def _merge(bounds: list[int], text: str, merge_into_next: Callable[[str], bool]) -> list[int]:
    """Drop the boundary after every part (accumulated left to right) for which `merge_into_next(part)` holds."""
    out = [bounds[0]]
    for k in range(1, len(bounds) - 1):
        if not merge_into_next(text[out[-1] : bounds[k]]):
            out.append(bounds[k])
    out.append(bounds[-1])
    return out


def _short_without_period(part: str) -> bool:
    return len(part) < _SHORT_PART and not part.rstrip().endswith(".")


def _inside(spans: list[_Span], pos: int, kinds: Sequence[str]) -> bool:
    k = bisect.bisect_right([s.start for s in spans], pos - 1) - 1
    return k >= 0 and spans[k].start < pos < spans[k].end and spans[k].kind in kinds


def _best_cut(candidates: list[int], start: int, end: int, min_half: int) -> int | None:
    mid = (start + end) / 2
    ok = [c for c in candidates if c - start >= min_half and end - c >= min_half]
    return min(ok, key=lambda c: (abs(c - mid), c)) if ok else None


def _back_over_spaces(text: str, pos: int, floor: int) -> int:
    while pos > floor and text[pos - 1] in " \t":
        pos -= 1
    return pos


def _split_long_part(text: str, spans: list[_Span], start: int, end: int) -> int | None:
    """The cut of step 5 for the part `text[start:end]`, or None when it cannot be split."""
    # Language split: never inside any math; "," and ":" stay with the left half, " and"/" to" start the right one.
    lang = []
    for m in re.finditer(r"[,:]| and | to ", text[start:end]):
        p = start + m.start()
        cut = p + 1 if m.group() in (",", ":") else p
        if not _inside(spans, p, ("inline", "display", "block")) and not _inside(
            spans, cut, ("inline", "display", "block")
        ):
            lang.append(cut)
    cut = _best_cut(lang, start, end, _LANGUAGE_MIN_HALF)
    if cut is not None:
        return cut
    # Math split: after a closing delimiter preceded by a comma, or before =, \equiv, +, \cancelto; never inside
    # inline math or an [asy]/tabular block.
    math = []
    for m in re.finditer(r",\$|,\\\)|,\\\]|=|\\equiv|\+|\\cancelto", text[start:end]):
        p = start + m.start()
        cut = p + len(m.group()) if m.group().startswith(",") else _back_over_spaces(text, p, start)
        if _inside(spans, cut, ("inline", "block")) or cut in (start, end):
            continue
        math.append(cut)
    return _best_cut(math, start, end, _MATH_MIN_HALF)


def split_math(text: str) -> list[int]:
    r"""
    Character boundaries `[0, …, len(text)]` of the LaTeX-aware MATH splitter (see the module docstring).

    Example:
    ```python
    >>> text = "We have $x = 2.$ Then $y = 3$, so the sum is $5$.\nThus the answer is $\\boxed{5}$."
    >>> b = split_math(text)
    >>> [text[i:j] for i, j in zip(b, b[1:])]
    ['We have $x = 2.$', ' Then $y = 3$, so the sum is $5$.', '\nThus the answer is $\\boxed{5}$.']
    ```
    """
    n = len(text)
    if n == 0:
        return [0]
    spans = find_math_spans(text)
    ph = _PlaceholderText(text, spans)
    t = ph.text

    # 2. sentence ends (guarding 1-2 letter abbreviations) and newlines; merge lone "\n" and short parts forward.
    cuts = {0, len(t)}
    for m in _SENTENCE_END.finditer(t):
        word = _WORD_BEFORE.search(t, 0, m.start())
        if word is None or not _ABBREVIATION.fullmatch(word.group()):
            cuts.add(m.end())
    cuts.update(i for i, ch in enumerate(t) if ch == "\n" and i > 0)
    bounds = sorted(cuts)
    bounds = _merge(bounds, t, lambda part: part == "\n")
    bounds = _merge(bounds, t, _short_without_period)

    # 3. a sentence that ends inside math: split after the placeholder, then merge short parts again.
    cuts = set(bounds)
    for end, span in ph.placeholders():
        if end < len(t) and text[span.start : span.end].endswith((".$", ".$$", ".\\)", ".\\]")):
            cuts.add(end)
    bounds = _merge(sorted(cuts), t, _short_without_period)

    # 4. restore the math; split display math at its own newlines; merge delimiter-only, tiny and "\n" parts.
    bounds = sorted({ph.to_orig(b) for b in bounds})
    cuts = set(bounds)
    for span in spans:
        if span.kind == "display":
            cuts.update(i for i in range(span.start + 1, span.end) if text[i] == "\n")
    bounds = sorted(cuts)
    openers = {(s.start, s.start + s.open_len) for s in spans}
    closers = {s.end for s in spans}

    def only_opener(a: int, b: int) -> bool:
        stripped_start = a + len(text[a:b]) - len(text[a:b].lstrip())
        stripped_end = a + len(text[a:b].rstrip())
        return (stripped_start, stripped_end) in openers

    out = [bounds[0]]
    for k in range(1, len(bounds) - 1):
        part = text[out[-1] : bounds[k]]
        if only_opener(out[-1], bounds[k]) or len(part) < _TINY_PART or part == "\n":
            continue
        out.append(bounds[k])
    out.append(n)
    # ours: a part that is only the closing delimiter of a span joins the part before it
    bounds = [out[0]]
    for k in range(1, len(out) - 1):
        a, b = out[k], out[k + 1]
        stripped = text[a:b].strip()
        if stripped and b in closers and a + len(text[a:b]) - len(text[a:b].lstrip()) + len(stripped) == b:
            span_closer = next(s for s in spans if s.end == b)
            if len(stripped) == span_closer.close_len and a > span_closer.start:
                continue
        bounds.append(a)
    bounds.append(n)
    if len(bounds) > 2 and len(text[bounds[-2] :]) < _TINY_PART:
        del bounds[-2]  # a tiny last part joins the one before (there is no next part)

    # 5. break long parts at the separator closest to their middle, until none can be split.
    changed = True
    while changed:
        changed = False
        for a, b in zip(bounds, bounds[1:]):
            if b - a > MAX_PART_LENGTH:
                cut = _split_long_part(text, spans, a, b)
                if cut is not None:
                    bounds = sorted({*bounds, cut})
                    changed = True
                    break
    return bounds


# ── token boundaries ───────────────────────────────────────────────────────────────────────────────────────────────
def split_text(text: str, step_split: str) -> list[int]:
    """Character boundaries of `text` under `step_split` (`"newline"` or `"math"`)."""
    if step_split == "newline":
        return split_newline(text)
    if step_split == "math":
        return split_math(text)
    raise ValueError(f"step_split={step_split!r} does not split text; text splitters are 'newline' and 'math'.")


def token_char_starts(token_ids: Sequence[int], batch_decode: Callable[[list[list[int]]], list[str]]):
    """
    The decoded completion and the character offset where each token starts in it.

    `batch_decode` decodes a list of token-id lists (special tokens skipped, no clean-up of spaces). Fast path: the
    tokens decoded one by one concatenate to the text. Otherwise (a character split across byte-level tokens, a
    SentencePiece leading space) the start of token `j` is the length of the common prefix of the text and the decoded
    first `j` tokens, O(T²) characters.

    Returns:
        `(text, starts)` with `starts` a non-decreasing list of `len(token_ids)` ints in `[0, len(text)]`.
    """
    ids = list(token_ids)
    text = batch_decode([ids])[0]
    if not ids:
        return text, []
    pieces = batch_decode([[t] for t in ids])
    if "".join(pieces) == text:
        starts, pos = [], 0
        for piece in pieces:
            starts.append(pos)
            pos += len(piece)
        return text, starts
    prefixes = batch_decode([ids[:j] for j in range(len(ids))])
    starts, last = [], 0
    for prefix in prefixes:
        last = max(last, min(len(os.path.commonprefix([prefix, text])), len(text)))
        starts.append(last)
    return text, starts


def char_to_token_boundaries(char_bounds: Sequence[int], starts: Sequence[int], text_length: int) -> list[int]:
    """
    Token boundaries `[0 = b_0 < … < b_S = T]` from character boundaries: each token takes the step of its first
    character; a token with no characters (EOS) takes the step of the token before; steps without a token vanish.

    Example:
    ```python
    >>> # text "ab\\ncd" in tokens "a", "b\\n", "cd", EOS; character steps "ab" | "\\ncd"
    >>> char_to_token_boundaries([0, 2, 5], starts=[0, 1, 3, 5], text_length=5)
    [0, 2, 4]
    ```
    """
    T = len(starts)
    if T == 0:
        return [0]
    interior = list(char_bounds[1:-1])
    ends = list(starts[1:]) + [text_length]
    steps: list[int | None] = [
        bisect.bisect_right(interior, starts[j]) if ends[j] > starts[j] else None for j in range(T)
    ]
    # A token without characters of its own: the leading bytes of a multi-byte character join the token that
    # completes it (the next one with characters); trailing special tokens (EOS) join the last step.
    following = None
    for j in range(T - 1, -1, -1):
        if steps[j] is None:
            steps[j] = following
        else:
            following = steps[j]
    previous = 0
    for j in range(T):
        steps[j] = previous if steps[j] is None else max(steps[j], previous)
        previous = steps[j]
    return [0] + [j for j in range(1, T) if steps[j] != steps[j - 1]] + [T]


def token_chunk_boundaries(num_tokens: int, chunk_tokens: int, num_trailing_special: int = 0) -> list[int]:
    """`[0, n, 2n, …, T]`; trailing special tokens (EOS) join the last chunk instead of forming a state of their own."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}.")
    if num_tokens == 0:
        return [0]
    body = max(num_tokens - num_trailing_special, 1)
    return list(range(0, body, chunk_tokens)) + [num_tokens]


def completion_boundaries(
    token_ids: Sequence[int],
    *,
    step_split: str,
    batch_decode: Callable[[list[list[int]]], list[str]] | None = None,
    chunk_tokens: int = 32,
    special_token_ids: frozenset[int] | set[int] = frozenset(),
) -> tuple[list[int], bool]:
    """
    Token boundaries of one completion, and whether the splitter failed (then `"newline"`, then a single step, is
    used). `batch_decode` is needed by the text splitters.
    """
    ids = list(token_ids)
    T = len(ids)
    if T == 0:
        return [0], False
    if step_split == "token_chunks":
        trailing = 0
        while trailing < T and ids[T - 1 - trailing] in special_token_ids:
            trailing += 1
        return token_chunk_boundaries(T, chunk_tokens, trailing), False
    if step_split not in STEP_SPLITS:
        raise ValueError(f"Unknown step_split {step_split!r}; choose one of {STEP_SPLITS}.")
    if batch_decode is None:
        raise ValueError(f"step_split={step_split!r} splits decoded text and needs batch_decode.")
    text, starts = token_char_starts(ids, batch_decode)
    for splitter in dict.fromkeys((step_split, "newline")):
        try:
            char_bounds = split_text(text, splitter)
            if char_bounds[0] != 0 or char_bounds[-1] != len(text) or any(
                a >= b for a, b in zip(char_bounds, char_bounds[1:])
            ):
                raise AssertionError(f"invalid character boundaries from {splitter!r}")
            return char_to_token_boundaries(char_bounds, starts, len(text)), splitter != step_split
        except Exception:  # noqa: BLE001 - any splitter failure falls back; counted as parse_failed
            continue
    return [0, T], True


def boundaries_to_segment_ids(boundaries: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    """
    `(N, width)` long segment ids from per-row token boundaries: token `t` of row `i` gets the `k` with
    `b_k ≤ t < b_{k+1}`; `-1` beyond `b_S` (padding) and for rows without tokens.
    """
    out = torch.full((len(boundaries), width), -1, dtype=torch.long)
    for i, b in enumerate(boundaries):
        if len(b) < 2 or b[-1] == 0:
            continue
        if b[-1] > width:
            raise ValueError(f"row {i} has {b[-1]} tokens but the segment_ids width is {width}.")
        lengths = torch.tensor([e - s for s, e in zip(b, b[1:])], dtype=torch.long)
        out[i, : b[-1]] = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    return out


def segment_ids_to_boundaries(segment_ids: torch.Tensor) -> list[list[int]]:
    """Inverse of `boundaries_to_segment_ids`: per row, `[0, start of segment 1, ..., number of tokens]` (`[0]` for a
    row without tokens)."""
    out = []
    for row in segment_ids.tolist():
        n = sum(1 for s in row if s >= 0)
        starts = [t for t in range(1, n) if row[t] != row[t - 1]]
        out.append([0, *starts, n] if n else [0])
    return out


def segment_completions(
    completions: Sequence[Sequence[int]],
    width: int,
    *,
    step_split: str,
    batch_decode: Callable[[list[list[int]]], list[str]] | None = None,
    chunk_tokens: int = 32,
    special_token_ids: frozenset[int] | set[int] = frozenset(),
) -> tuple[torch.Tensor, list[list[int]], int]:
    """
    Segment a batch of completions.

    Args:
        completions (`Sequence[Sequence[int]]`):
            `N` completions as token ids (real tokens only, EOS included); an empty one has no steps.
        width (`int`):
            Padded width `T` of the output (≥ the longest completion).
        step_split (`str`):
            `"newline"`, `"math"` or `"token_chunks"`.
        batch_decode (`Callable`, *optional*):
            Decodes a list of token-id lists (special tokens skipped); needed for the text splitters.
        chunk_tokens (`int`, *optional*, defaults to `32`):
            Step length of `"token_chunks"`.
        special_token_ids (`set[int]`, *optional*):
            Tokens without text (EOS): trailing ones join the last chunk of `"token_chunks"`.

    Returns:
        `(segment_ids, boundaries, num_failed)`: `segment_ids` `(N, T)` long (`-1` on padding), the token boundaries
        of every row, and how many rows fell back because their splitter failed.
    """
    boundaries, failed = [], 0
    for ids in completions:
        b, fell_back = completion_boundaries(
            ids,
            step_split=step_split,
            batch_decode=batch_decode,
            chunk_tokens=chunk_tokens,
            special_token_ids=special_token_ids,
        )
        boundaries.append(b)
        failed += int(fell_back)
    return boundaries_to_segment_ids(boundaries, width), boundaries, failed


def estimated_state_mask(
    num_segments: torch.Tensor, num_columns: int, max_steps: int | None = None, stride: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Which step states get a Monte-Carlo estimate.

    State `k` (before step `k`, `k = 0..S_i−1`; the state after the last step is terminal with value 0) is estimated
    when `k ≤ c` (`max_steps`, the official `max_step_for_value_estimation`; `None` = no cap) and `k % m == 0`
    (`stride`, sparse boundaries). States past the cap are back-filled with the reward-to-go (advantage 0); states
    skipped by the stride are interpolated.

    Args:
        num_segments (`torch.Tensor` of shape `(N,)`): `S_i`.
        num_columns (`int`): `S ≥ max S_i`.
        max_steps (`int`, *optional*): the cap `c`.
        stride (`int`, *optional*, defaults to `1`): the stride `m`.

    Returns:
        `(estimated, interpolated)`, two `(N, S)` bool masks.

    Example:
    ```python
    >>> est, interp = estimated_state_mask(torch.tensor([5]), 5, max_steps=3, stride=2)
    >>> est.int().tolist(), interp.int().tolist()
    ([[1, 0, 1, 0, 0]], [[0, 1, 0, 1, 0]])
    ```
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}.")
    k = torch.arange(num_columns)[None, :]
    inside = k < num_segments.to(torch.long)[:, None]
    capped = k <= max_steps if max_steps is not None else torch.ones_like(k, dtype=torch.bool)
    within = inside & capped
    estimated = within & (k % stride == 0)
    return estimated, within & ~estimated
