r"""Math rewards for TRL trainers, built on math-verify's `parse` and `verify`, that never hang and never crash.

    from trl_credit.rewards import math_reward, gsm8k_reward, format_reward
    trainer = GRPOTrainer(..., reward_funcs=[math_reward, format_reward], train_dataset=ds)

Every reward has TRL's reward-function signature: `completions` (strings or chat messages), the dataset columns as
keyword arguments, `**kwargs`; it returns `list[float | None]`, where `None` means "gold answer unparseable, skip this
completion" (TRL's NaN-aware baselines ignore it) and is counted, never a silent 0.

Parsing and verification run in a bounded pool of worker processes (`trl_credit.rewards._pool`) with a hard wall-clock
deadline per completion: math-verify's own timeouts use `signal.alarm`, which works only on the main thread
(Math-Verify#55, huggingface/trl#5281), and some inputs outlast them anyway (Math-Verify#65). A completion over the
deadline scores 0 and is counted; the worker ends it itself or, if stuck in C code, is killed and replaced.

Deviations from TRL's `accuracy_reward` (on purpose):

1. the gold answer is wrapped in `\boxed{}` before parsing (unless it already holds a `\boxed`, e.g. a full reference
   solution): `parse("2k")` without it finds `2`; with it, `2k` (Skywork-OR1#16). TRL's reward accepts 392 of the 500
   MATH-500 reference solutions (51 golds unparseable), this one 500;
2. the completion is parsed with math-verify's default LaTeX normalization (TRL keeps only `units=True`), so
   `\boxed{\frac43}` parses, plus anchored plain numbers ("The answer is 5") after boxed answers;
3. completions may be plain strings as well as chat messages.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from ..data import last_boxed_answer
from ._pool import check_max_memory_mb, check_num_workers, check_timeout, get_pool


logger = logging.getLogger(__name__)

_TARGET = "trl_credit.rewards.math:_score"
PRESETS = ("math", "gsm8k")
# Text kept for the logs and the evaluation files: a completion's extracted answer can be 100 kB of garbage.
_MAX_ANSWER_CHARS = 200


class Verdict(NamedTuple):
    """The outcome for one completion.

    Attributes:
        reward (`float` or `None`):
            `1.0` correct, `0.0` wrong / no answer / timed out / error, `None` gold answer unparseable.
        status (`str`):
            One of `"correct"`, `"wrong"`, `"no_answer"`, `"gold_unparseable"`, `"timeout"`, `"error"`.
        answer (`str` or `None`):
            The answer math-verify extracted from the completion (normalized LaTeX or number string, truncated), or
            `None`. Equal strings mean equal answers, which majority voting relies on.
        gold (`str` or `None`):
            The extracted gold answer string, or `None`.
    """

    reward: float | None
    status: str
    answer: str | None
    gold: str | None


class _Spec(NamedTuple):
    preset: str | None
    extraction: tuple | None
    gold_extraction: tuple | None
    extraction_mode: str


def completion_text(completion: Any) -> str:
    """The text of one completion: a string, or the content of the last message of a conversational completion."""
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, (list, tuple)) and completion:
        content = completion[-1].get("content", "") if isinstance(completion[-1], dict) else completion[-1]
        if isinstance(content, list):  # content blocks: [{"type": "text", "text": ...}, ...]
            return "".join(b.get("text", "") for b in content if isinstance(b, dict))
        return "" if content is None else str(content)
    return "" if isinstance(completion, (list, tuple)) else str(completion)


# ── worker side: everything below runs inside the verification processes ───────────────────────────────────────────
_CALCULATOR = re.compile(r"<<[^<>\n]*>>")  # GSM8K calculator annotations: "<<48/2=24>>24"
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# The last of these starts the final answer of a GSM8K-style solution: "#### 18", an "A: 18" line, "The answer is 18".
_GSM8K_ANCHOR = re.compile(r"####|^[ \t]*A[ \t]*:|\b(?i:answer)(?:[ \t]+is[ \t]*:?|[ \t]*:)", re.MULTILINE)


@functools.cache
def _configs():
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    return {
        # Boxed first (boxed_match_priority=0) as in TRL's accuracy_reward; no free-floating LaTeX or numbers, which
        # would grade the last equation of the reasoning when the model gave no answer.
        "pred": (
            LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False),
            ExprExtractionConfig(try_extract_without_anchor=False),
        ),
        "gold": (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()),
        "number": (ExprExtractionConfig(),),
    }


def _answer_string(parsed: list) -> str | None:
    # parse() returns [sympy object, extracted string]; never str() the sympy object: printing 5^(5^3125) hangs.
    for item in reversed(parsed):
        if isinstance(item, str):
            return item[:_MAX_ANSWER_CHARS]
    return None


def _gold_text(gold: str, preset: str | None) -> str:
    gold = gold.strip()
    if "####" in gold:  # a GSM8K reference solution
        gold = gold.rsplit("####", 1)[1].strip()
    elif preset == "gsm8k":
        anchors = list(_GSM8K_ANCHOR.finditer(gold))
        if anchors:  # "A: 18" ending the reference solutions of the GPT-3 GSM8K samples
            gold = gold[anchors[-1].end() :].strip()
    if preset == "gsm8k":
        gold = _THOUSANDS.sub("", gold)
    if len(gold) > 1 and gold[0] == gold[-1] == "$":
        gold = gold[1:-1]
    return gold if "\\boxed" in gold else f"\\boxed{{{gold}}}"


@functools.lru_cache(maxsize=4096)
def _parse_gold(spec: _Spec, gold: str) -> tuple[list, str | None]:
    from math_verify import parse

    config = spec.gold_extraction or _configs()["gold"]
    parsed = parse(_gold_text(gold, spec.preset), extraction_config=config, parsing_timeout=None)
    return parsed, _answer_string(parsed)


# A GSM8K answer is a number. A "chain" is numbers joined by arithmetic operators or "=" on one line: "18",
# "52 - 40", "3 + 9 = 12", "2 x 0.5 = 1.0". Its answer is its last side when that side is a lone number ("3 + 9 = 12"
# gives 12); an expression ("52 - 40"), a chain ending in "=" ("52 - 40 = x") or a number that is an operand of a
# longer expression ("2 * (3 + 4)") is no answer: a policy must not learn to state a calculation instead of a result.
_NUMBER = r"(?:\d+(?:\.\d+)?|\.\d+)"
_OPERATOR = r"(?:[-+*/^×÷·]|(?<=[\d \t])[xX](?=[ \t\d.]))"  # "x" only as multiplication between numbers
_CHAIN = re.compile(rf"-?{_NUMBER}(?:[ \t]*(?:{_OPERATOR}|=)[ \t]*-?{_NUMBER})*")
_LONE_NUMBER = re.compile(rf"-?{_NUMBER}")
_DANGLING = re.compile(rf"[ \t]*(?:=|{_OPERATOR}[ \t]*[(\d.])")  # after a chain: "= x", "* (3 + 4)"
_OPERAND_BEFORE = re.compile(rf"[)\d.][ \t]*{_OPERATOR}[ \t]*\(?[ \t]*$")  # before a chain: "(3 + 4) * "
_LATEX_TEXT = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|operatorname)[ \t]*\{([^{}]*)\}")
_LATEX_FRAC = re.compile(r"\\[dt]?frac[ \t]*\{([^{}]*)\}[ \t]*\{([^{}]*)\}")
_PLAIN = (
    ("\\times", "*"), ("\\cdot", "*"), ("\\div", "/"), ("\\left", ""), ("\\right", ""), ("\\%", "%"), ("\\$", ""),
    ("$", ""), ("{,}", ""), ("\\,", ""), ("\\!", ""), ("\\;", " "), ("\\(", " "), ("\\)", " "), ("\\[", " "),
    ("\\]", " "), ("**", ""), ("\u2212", "-"),
)  # fmt: skip
_NOT_A_NUMBER = "expression"  # what `_gsm8k_number` returns for an answer that is a calculation, not a number


def _plain_math(text: str) -> str:
    """LaTeX and Markdown dressing removed, so that `$\\frac{24}{2}$` reads `24/2` and `**$1,080**` reads `1080`."""
    text = _LATEX_TEXT.sub(r" \1 ", text)
    text = _LATEX_FRAC.sub(r"\1/\2", text)
    for old, new in _PLAIN:
        text = text.replace(old, new)
    return _THOUSANDS.sub("", text)


def _chain_answer(text: str, match: re.Match) -> str:
    """The lone number a chain ends with, or `_NOT_A_NUMBER`."""
    if _DANGLING.match(text, match.end()) or _OPERAND_BEFORE.search(text, 0, match.start()):
        return _NOT_A_NUMBER
    last = match.group().rsplit("=", 1)[-1].strip()
    return last if _LONE_NUMBER.fullmatch(last) else _NOT_A_NUMBER


def _gsm8k_number(text: str) -> str | None:
    """The answer of the first chain of `text`: a number string, `_NOT_A_NUMBER`, or `None` (no number at all)."""
    text = _plain_math(text)
    match = _CHAIN.search(text)
    return None if match is None else _chain_answer(text, match)


def _parse_gsm8k_prediction(text: str) -> list | str:
    """math-verify's parse of the completion's final number, `[]` if it has none, `_NOT_A_NUMBER` if its final answer
    is a calculation. Boxed answer first, else the first chain after the last anchor ("####", an "A:" line, "The
    answer is"), else math-verify's pick (an "answer 18" it recognizes, else the last expression of the text)."""
    from math_verify import parse

    text = _THOUSANDS.sub("", _CALCULATOR.sub("", text))
    number = None
    if "\\boxed" in text or "\\fbox" in text:
        boxed = last_boxed_answer(text)
        if boxed is not None:
            number = _gsm8k_number(boxed)
    if number is None:
        anchors = list(_GSM8K_ANCHOR.finditer(text))
        if anchors:
            # The first number after the anchor: "A: 18 dollars for 2 days" is 18, not 2.
            number = _gsm8k_number(text[anchors[-1].end() :].lstrip().split("\n", 1)[0])
    if number is None:
        # math-verify's own choice ("answer 18 ..." first, else the last expression), which must be a lone number.
        parsed = parse(text, extraction_config=_configs()["number"], parsing_timeout=None)
        answer = _answer_string(parsed) if parsed else None
        if answer is None:
            return []
        return parsed if _LONE_NUMBER.fullmatch(_plain_math(answer).strip()) else _NOT_A_NUMBER
    if number == _NOT_A_NUMBER:
        return _NOT_A_NUMBER
    return parse(number, extraction_config=_configs()["number"], parsing_timeout=None)


_VERIFIED: dict[tuple, bool] = {}


def _worker_init() -> None:
    """Compile math-verify's regexes and load its LaTeX parser once per worker, outside any item's deadline."""
    for preset in PRESETS:
        _score(_Spec(preset, None, None, "first_match"), "\\frac{1}{2}", "So $x = \\boxed{\\frac{1}{2}}$.\nA: 0.5")
    _parse_gold.cache_clear()
    _VERIFIED.clear()


def _score(spec: _Spec, gold: str, text: str) -> tuple[str, float | None, str | None, str | None]:
    """One completion against one gold answer: `(status, reward, answer, gold)`. Runs in a worker process."""
    from math_verify import parse, verify

    gold_parsed, gold_str = _parse_gold(spec, gold)
    if not gold_parsed:
        return "gold_unparseable", None, None, None
    if spec.preset == "gsm8k":
        parsed = _parse_gsm8k_prediction(text)
        if parsed == _NOT_A_NUMBER:
            return "no_answer", 0.0, None, gold_str
    else:
        parsed = parse(
            text, extraction_config=spec.extraction or _configs()["pred"], extraction_mode=spec.extraction_mode,
            parsing_timeout=None,
        )  # fmt: skip
    if not parsed:
        return "no_answer", 0.0, None, gold_str
    # In a GRPO group most completions repeat a few answers: verify each distinct (gold, answer) pair once. Keys are
    # the parsed objects (sympy hashes and compares structurally, without evaluating).
    try:
        key = (spec, gold, tuple(parsed))
        correct = _VERIFIED.get(key)
    except TypeError:  # unhashable (mutable matrices)
        key, correct = None, None
    if correct is None:
        correct = bool(verify(gold_parsed, parsed, timeout_seconds=None))
        if key is not None:
            if len(_VERIFIED) >= 16384:
                _VERIFIED.clear()
            _VERIFIED[key] = correct
    return ("correct" if correct else "wrong"), float(correct), _answer_string(parsed), gold_str


# ── parent side ─────────────────────────────────────────────────────────────────────────────────────────────────────
class MathVerifyReward:
    r"""
    A math-verify reward as a picklable callable object (TRL's async reward worker pickles reward functions; a closure
    would not pickle). Build it with [`math_verify_reward`].

    Calling it follows TRL's reward-function contract; [`~MathVerifyReward.score`] gives the full [`Verdict`] per
    completion (extracted answer, status) for evaluation. `counts` accumulates the statuses over all calls.
    """

    def __init__(
        self,
        extraction: str | Sequence = "math",
        *,
        gold_extraction: Sequence | None = None,
        extraction_mode: str = "first_match",
        gold_column: str | None = None,
        timeout: float = 5.0,
        num_workers: int | None = None,
        max_memory_mb: int = 4096,
        name: str | None = None,
    ):
        if isinstance(extraction, str):
            if extraction not in PRESETS:
                raise ValueError(
                    f"extraction={extraction!r} is not a preset; use one of {PRESETS} or a sequence of math-verify "
                    "configs, e.g. `[LatexExtractionConfig(), ExprExtractionConfig()]`."
                )
            self._spec = _Spec(extraction, None, _tuple_or_none(gold_extraction), extraction_mode)
        else:
            configs = tuple(extraction)
            if not configs:
                raise ValueError("extraction is an empty sequence; give at least one math-verify extraction config.")
            self._spec = _Spec(None, configs, _tuple_or_none(gold_extraction), extraction_mode)
        if extraction_mode not in ("first_match", "any_match"):
            raise ValueError(f"extraction_mode must be 'first_match' or 'any_match', got {extraction_mode!r}.")
        self.extraction = extraction
        self.gold_column = gold_column
        self.timeout = check_timeout(timeout)
        self.num_workers = check_num_workers(num_workers)
        self.max_memory_mb = check_max_memory_mb(max_memory_mb)
        self.__name__ = name or (f"{extraction}_reward" if isinstance(extraction, str) else "math_verify_reward")
        self.counts: Counter[str] = Counter()
        self._counts_lock = threading.Lock()
        self._warned = 0

    # Locks do not pickle; the counters start afresh in the receiving process.
    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_counts_lock"]
        state["counts"] = Counter()
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._counts_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MathVerifyReward(name={self.__name__!r}, extraction={self.extraction!r}, timeout={self.timeout})"

    def score(
        self, completions: Sequence[Any], golds: Sequence[Any], on_done: Callable[[int], None] | None = None
    ) -> list[Verdict]:
        """A [`Verdict`] per completion (strings or chat messages) against its gold answer (any string form).
        `on_done(n)` is called as `n` more completions are graded (e.g. a tqdm bar's `update`)."""
        if len(completions) != len(golds):
            raise ValueError(f"{self.__name__}: {len(completions)} completions but {len(golds)} gold answers.")
        pool = get_pool(_TARGET, self.num_workers, self.max_memory_mb)
        items = [
            (self._spec, "" if g is None else str(g), completion_text(c))
            for c, g in zip(completions, golds, strict=True)
        ]
        verdicts = []
        # Keyed by gold answer: a group's completions go to the worker that already parsed its gold (detail 6 of
        # docs/rewards.md), so each gold is parsed once and repeated answers are verified once.
        keys = [item[1] for item in items]
        for status, value in pool.map(items, timeout=self.timeout, keys=keys, on_done=on_done):
            if status == "ok":
                verdict_status, reward, answer, gold = value
                verdicts.append(Verdict(reward, verdict_status, answer, gold))
            else:  # the pool's "timeout" or "error": scored 0, counted
                verdicts.append(Verdict(0.0, status, None, None))
        with self._counts_lock:
            self.counts.update(v.status for v in verdicts)
        self._warn(verdicts, golds)
        return verdicts

    def __call__(
        self,
        completions: Sequence[Any],
        solution: Sequence[Any] | None = None,
        answer: Sequence[Any] | None = None,
        log_metric: Callable[[str, float], None] | None = None,
        log_extra: Callable[[str, list], None] | None = None,
        **kwargs,
    ) -> list[float | None]:
        golds = self._golds(solution, answer, kwargs)
        verdicts = self.score(completions, golds)
        if log_metric is not None:
            # The same keys on every call and rank: TRL gathers metrics key by key across processes.
            statuses = Counter(v.status for v in verdicts)
            for key in ("gold_unparseable", "timeouts", "errors", "no_answer"):
                status = {"timeouts": "timeout", "errors": "error"}.get(key, key)
                log_metric(f"rewards/{self.__name__}/{key}", float(statuses[status]))
        if log_extra is not None:
            log_extra(f"{self.__name__}/answer", [v.answer for v in verdicts])
            log_extra(f"{self.__name__}/status", [v.status for v in verdicts])
        return [v.reward for v in verdicts]

    def _golds(self, solution, answer, kwargs) -> Sequence[Any]:
        if self.gold_column is not None:
            columns = {"solution": solution, "answer": answer, **kwargs}
            if columns.get(self.gold_column) is None:
                raise ValueError(
                    f"{self.__name__} reads gold answers from the {self.gold_column!r} column, which the trainer did "
                    f"not pass (got {sorted(k for k, v in columns.items() if v is not None)}). Add that column to the "
                    "dataset or set `gold_column`."
                )
            return columns[self.gold_column]
        if solution is not None:
            return solution
        if answer is not None:
            return answer
        raise ValueError(
            f"{self.__name__} needs the gold answers in a `solution` (or `answer`) dataset column, but the trainer "
            f"passed only {sorted(kwargs)}. Load the data with `trl_credit.data.load_math_dataset`, rename the "
            "column, or build the reward with `math_verify_reward(..., gold_column=...)`."
        )

    def _warn(self, verdicts: list[Verdict], golds: Sequence[Any]) -> None:
        for verdict, gold in zip(verdicts, golds, strict=True):
            if self._warned >= 5:
                return
            if verdict.status == "gold_unparseable":
                self._warned += 1
                logger.warning(
                    "%s: the gold answer %r cannot be parsed; its completions get reward None (skipped by TRL).",
                    self.__name__, str(gold)[:200],
                )  # fmt: skip
            elif verdict.status in ("timeout", "error"):
                self._warned += 1
                logger.warning(
                    "%s: a completion %s (deadline %.1f s); it scores 0.",
                    self.__name__, "timed out" if verdict.status == "timeout" else "crashed its verifier",
                    self.timeout,
                )  # fmt: skip


def _tuple_or_none(configs) -> tuple | None:
    return None if configs is None else tuple(configs)


def math_verify_reward(
    extraction: str | Sequence = "math",
    *,
    gold_extraction: Sequence | None = None,
    extraction_mode: str = "first_match",
    gold_column: str | None = None,
    timeout: float = 5.0,
    num_workers: int | None = None,
    max_memory_mb: int = 4096,
    name: str | None = None,
) -> MathVerifyReward:
    r"""
    Build a math-verify reward function (a picklable [`MathVerifyReward`] object) for TRL trainers.

    Args:
        extraction (`str` or sequence of math-verify extraction configs, *optional*, defaults to `"math"`):
            How answers are found in completions. `"math"`: boxed answer first, then LaTeX or numbers after an answer
            anchor ("The final answer is $x$"), as [`math_reward`]. `"gsm8k"`: calculator annotations and thousands
            separators removed, then a boxed answer, else the number after the last `####`, `A:` line or "answer
            is", else the last number; a calculation instead of a number is no answer, as [`gsm8k_reward`]. Or any
            sequence of `math_verify.LatexExtractionConfig` / `ExprExtractionConfig` / `StringExtractionConfig`,
            passed to `math_verify.parse`.
        gold_extraction (sequence of math-verify extraction configs, *optional*):
            How gold answers are parsed. Defaults to LaTeX (boxed first) then plain expressions. A gold answer without
            `\boxed` is wrapped in one first; a GSM8K reference solution is cut after its `####`.
        extraction_mode (`str`, *optional*, defaults to `"first_match"`):
            `math_verify.parse`'s `extraction_mode` for completions with a sequence of configs.
        gold_column (`str`, *optional*):
            Dataset column holding the gold answers. Defaults to `solution`, else `answer`.
        timeout (`float`, *optional*, defaults to `5.0`):
            Hard wall-clock deadline in seconds for one completion (gold parsing, answer parsing and verification).
            A completion over it scores 0 and is counted as a timeout. Must be finite, in (0, 86400]: `None`, `inf`
            and `nan` are refused, since a reward without a deadline can hang training.
        num_workers (`int`, *optional*):
            Verification processes (shared by all rewards with the same setting), at least 1. Defaults to half the
            usable CPU cores, at least 1 and at most 8.
        max_memory_mb (`int`, *optional*, defaults to `4096`):
            Address-space limit of each verification process in MiB; a completion over it scores 0 (`"error"`). `0`
            disables the limit; negative values are refused. A limit too small for the workers to import math-verify
            (about 70 MiB on Linux x86-64) fails the first call with an error that says so.
        name (`str`, *optional*):
            The function's `__name__`, used by TRL in metric names (`rewards/<name>/mean`). Defaults to
            `"<extraction>_reward"` for presets, else `"math_verify_reward"`.

    Returns:
        [`MathVerifyReward`]: a reward function with TRL's signature.

    Example:
    ```python
    >>> from math_verify import ExprExtractionConfig
    >>> from trl_credit.rewards import math_verify_reward

    >>> numbers_only = math_verify_reward([ExprExtractionConfig()], name="number_reward", timeout=2.0)
    >>> numbers_only(["so 3 + 4 = 7", "I get 8"], solution=["7", "7"])
    [1.0, 0.0]
    ```
    """
    return MathVerifyReward(
        extraction, gold_extraction=gold_extraction, extraction_mode=extraction_mode, gold_column=gold_column,
        timeout=timeout, num_workers=num_workers, max_memory_mb=max_memory_mb, name=name,
    )  # fmt: skip


_MATH = MathVerifyReward("math", name="math_reward")
_GSM8K = MathVerifyReward("gsm8k", name="gsm8k_reward")


def math_reward(
    completions: Sequence[Any],
    solution: Sequence[Any] | None = None,
    answer: Sequence[Any] | None = None,
    log_metric: Callable[[str, float], None] | None = None,
    log_extra: Callable[[str, list], None] | None = None,
    **kwargs,
) -> list[float | None]:
    r"""
    1.0 if the completion's final answer equals the gold answer according to math-verify, else 0.0; `None` when the
    gold answer cannot be parsed (TRL then skips the completion).

    The completion's answer is its `\boxed{...}` (nested braces and LaTeX are fine), else LaTeX or a number after an
    answer anchor ("The final answer is $\frac{1}{2}$"). The gold answer is a final answer (`\frac{1}{2}`, `2k`), a
    full reference solution with a `\boxed{}`, or a GSM8K solution ending in `#### 18`. Each completion is verified
    in a worker process with a 5 s hard deadline; one over it scores 0 (build your own with [`math_verify_reward`]
    to change the deadline).

    Args:
        completions (`list[str]` or `list[list[dict[str, str]]]`):
            The completions, as text or as chat messages (the last message's `content` is graded).
        solution (`list[str]`, *optional*):
            The gold answers (the dataset's `solution` column).
        answer (`list[str]`, *optional*):
            The gold answers when the dataset has an `answer` column and no `solution` column.
        log_metric (`callable`, *optional*):
            Provided by TRL: logs `rewards/math_reward/{gold_unparseable,timeouts,errors,no_answer}`, counts per call.
        log_extra (`callable`, *optional*):
            Provided by TRL: adds the extracted answer and the status of each completion to the completions table.
        **kwargs:
            Other dataset columns and trainer arguments; unused.

    Returns:
        `list[float | None]`: one reward per completion.

    Example:
    ```python
    >>> from trl_credit.rewards import math_reward

    >>> completions = [[{"role": "assistant", "content": r"So $x = \boxed{\frac{1}{3}}$."}], "It is \\boxed{0.5}"]
    >>> math_reward(completions, solution=[r"\frac13", r"\frac{1}{3}"])
    [1.0, 0.0]
    ```
    """
    return _MATH(completions, solution, answer, log_metric=log_metric, log_extra=log_extra, **kwargs)


def gsm8k_reward(
    completions: Sequence[Any],
    solution: Sequence[Any] | None = None,
    answer: Sequence[Any] | None = None,
    log_metric: Callable[[str, float], None] | None = None,
    log_extra: Callable[[str, list], None] | None = None,
    **kwargs,
) -> list[float | None]:
    r"""
    1.0 if the completion's final number equals the GSM8K gold answer, else 0.0; `None` when the gold answer cannot be
    parsed.

    Gold: the text after the last `####` of a GSM8K reference solution (the `answer` column of `openai/gsm8k`), an
    `A: 18` line, or a bare answer (`"1,600"`; `solution` column of [`~trl_credit.data.load_math_dataset`]).
    Prediction: calculator annotations (`<<48/2=24>>`), thousands separators, currency signs, LaTeX and Markdown
    dressing removed, then the `\boxed{}` answer, else the first number after the last `####`, `A:` line, or "The
    answer is", else the last number of the text. The answer must be a number (negative and decimal numbers, units
    and percent signs are fine): a calculation (`52 - 40`, `\frac{24}{2}`, `52 - 40 = x`) is no answer (0.0), while an
    equation that ends in a number (`3 + 9 = 12`) counts as that number.

    Args:
        completions (`list[str]` or `list[list[dict[str, str]]]`):
            The completions, as text or as chat messages (the last message's `content` is graded).
        solution (`list[str]`, *optional*):
            The gold answers or reference solutions (read first).
        answer (`list[str]`, *optional*):
            GSM8K reference solutions ending in `#### <answer>` (read when there is no `solution` column).
        log_metric (`callable`, *optional*):
            Provided by TRL: logs `rewards/gsm8k_reward/{gold_unparseable,timeouts,errors,no_answer}`.
        log_extra (`callable`, *optional*):
            Provided by TRL: adds the extracted answer and the status of each completion to the completions table.
        **kwargs:
            Other dataset columns and trainer arguments; unused.

    Returns:
        `list[float | None]`: one reward per completion.

    Example:
    ```python
    >>> from trl_credit.rewards import gsm8k_reward

    >>> completions = ["She pays 2 * 540 = <<2*540=1080>>1080 dollars.\nA: $1,080", "The answer is -3 apples."]
    >>> gsm8k_reward(completions, answer=["... so 1,080 in total.\n#### 1,080", "#### 3"])
    [1.0, 0.0]
    ```
    """
    return _GSM8K(completions, solution, answer, log_metric=log_metric, log_extra=log_extra, **kwargs)


def format_reward(completions: Sequence[Any], **kwargs) -> list[float]:
    r"""
    1.0 if the completion gives a final answer in a `\boxed{...}` with balanced braces and non-empty content (what the
    prompts of [`~trl_credit.data.load_math_dataset`] ask for), else 0.0. Pure string scan in the calling process: no
    math-verify, linear time.

    Args:
        completions (`list[str]` or `list[list[dict[str, str]]]`):
            The completions, as text or as chat messages.
        **kwargs:
            Dataset columns and trainer arguments; unused.

    Returns:
        `list[float]`: one reward per completion.

    Example:
    ```python
    >>> from trl_credit.rewards import format_reward

    >>> format_reward(["so \\boxed{\\frac{1}{2}}.", "so \\boxed{}", "the answer is 2", "\\boxed{\\frac{1}{2}"])
    [1.0, 0.0, 0.0, 0.0]
    ```
    """
    out = []
    for completion in completions:
        content = last_boxed_answer(completion_text(completion), commands=("\\boxed",), allow_unbraced=False)
        out.append(1.0 if content is not None and content.strip() else 0.0)
    return out
