r"""
The demo's embedded task: running-sum chains where one wrong step dooms the final answer.

A problem is a list of single-digit terms; the prompt states them and the gold completion adds them one at a time,
one step per line, then gives the answer:

    prompt      "3+5+9+2\n"
    completion  "3+5=8\n8+9=17\n17+2=19\n#19"        (then EOS)

Every line is fully determined by the prompt, so all correct completions of a prompt are identical token for token
and a wrong completion leaves the gold path at a token the generator can point to (`first_error`): the group of a
prompt is a prefix tree whose branches are exactly the step errors. The reward is 1 iff the last line is `#<n>` with
`n` the true sum ([`chain_reward`], TRL's reward-function signature), so an arithmetic slip carried forward
consistently (`8+9=16`, `16+2=18`, `#18`) gets 0 although every later step is right given the wrong one.

Demonstrations for the starting policy (`demonstration`) inject step errors at a controlled rate: a result is
replaced by a wrong value (off by one or two, or a dropped/extra carry of ten) that later steps carry forward, and
the final answer is guaranteed wrong.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..rewards import completion_text


EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"
ALPHABET = "0123456789+=#\n"
# Wrong results a tired human makes: off by one or two, or a carry dropped / added.
ERROR_OFFSETS = (-10, -2, -1, 1, 2, 10)
_ANSWER = re.compile(r"#(\d+)")


@dataclass(frozen=True)
class ChainSpec:
    """
    Shape of the problems.

    Args:
        min_terms (`int`, *optional*, defaults to `4`):
            Fewest terms of a problem (`min_terms − 1` additions).
        max_terms (`int`, *optional*, defaults to `6`):
            Most terms of a problem.
        max_term (`int`, *optional*, defaults to `9`):
            Terms are drawn uniformly from `1 … max_term`.
    """

    min_terms: int = 4
    max_terms: int = 6
    max_term: int = 9

    def __post_init__(self):
        if not (2 <= self.min_terms <= self.max_terms):
            raise ValueError(f"Need 2 <= min_terms <= max_terms, got {self.min_terms} and {self.max_terms}.")
        if not (1 <= self.max_term <= 9):
            raise ValueError(f"max_term must be in 1..9 (single-digit terms), got {self.max_term}.")

    @property
    def max_completion_chars(self) -> int:
        """Characters of the longest possible completion (wrong ones included), a bound for generation lengths."""
        # Each step "a+b=c" has at most 3 + 1 + 1 + 1 + 3 characters (sums stay below 1000), plus newlines and
        # the answer line; a generous bound is cheap and never truncates a well-formed completion.
        return (self.max_terms - 1) * 10 + 5


def sample_terms(rng: random.Random, spec: ChainSpec) -> list[int]:
    """One problem: `min_terms … max_terms` terms drawn uniformly from `1 … max_term`."""
    n = rng.randint(spec.min_terms, spec.max_terms)
    return [rng.randint(1, spec.max_term) for _ in range(n)]


def prompt_text(terms: Sequence[int]) -> str:
    """`[3, 5, 9, 2]` → `"3+5+9+2\n"`."""
    if len(terms) < 2:
        raise ValueError(f"A chain needs at least two terms, got {list(terms)}.")
    return "+".join(str(t) for t in terms) + "\n"


def parse_prompt(prompt: str) -> list[int]:
    """Inverse of [`prompt_text`] (accepts the prompt with or without its trailing newline)."""
    body = prompt.strip()
    if not re.fullmatch(r"\d+(\+\d+)+", body):
        raise ValueError(f"Not a chain prompt: {prompt!r}.")
    return [int(t) for t in body.split("+")]


def chain_lines(terms: Sequence[int], results: Sequence[int] | None = None) -> list[str]:
    """
    The lines of a completion: one `a+b=c` per addition, then `#<answer>`. `results` gives the value written after
    each `=` (defaults to the true running sums); every step uses the previous line's value, as written.

    Example:
    ```python
    >>> chain_lines([3, 5, 9, 2])
    ['3+5=8', '8+9=17', '17+2=19', '#19']
    >>> chain_lines([3, 5, 9, 2], results=[8, 16, 18])       # a slip at step 2, carried forward
    ['3+5=8', '8+9=16', '16+2=18', '#18']
    ```
    """
    if results is None:
        results = gold_results(terms)
    if len(results) != len(terms) - 1:
        raise ValueError(f"{len(terms)} terms need {len(terms) - 1} results, got {len(results)}.")
    lines, acc = [], terms[0]
    for term, result in zip(terms[1:], results, strict=True):
        lines.append(f"{acc}+{term}={result}")
        acc = result
    lines.append(f"#{acc}")
    return lines


def gold_results(terms: Sequence[int]) -> list[int]:
    """The true running sums after each addition."""
    out, acc = [], terms[0]
    for term in terms[1:]:
        acc += term
        out.append(acc)
    return out


def gold_completion(terms: Sequence[int]) -> str:
    """The unique correct completion (without EOS)."""
    return "\n".join(chain_lines(terms))


def demonstration(terms: Sequence[int], error_rate: float, rng: random.Random) -> tuple[str, list[int]]:
    """
    A demonstration whose additions are each wrong with probability `error_rate`. A wrong result is the right one
    (given the previous line) plus an offset from [`ERROR_OFFSETS`]; later lines add to it as written, so the error
    is carried forward. The final answer of a demonstration with an error is always wrong (an offset that would
    cancel the earlier ones is redrawn).

    Returns:
        `(completion, error_steps)`: the text (without EOS) and the 0-based indices of the wrong additions.
    """
    if not 0.0 <= error_rate <= 1.0:
        raise ValueError(f"error_rate must be in [0, 1], got {error_rate}.")
    truth = gold_results(terms)
    results, errors, acc = [], [], terms[0]
    for k, term in enumerate(terms[1:]):
        value = acc + term
        if rng.random() < error_rate:
            # Carried forward, the running value stays off by (acc − truth); a new slip must never cancel it.
            offsets = [d for d in ERROR_OFFSETS if value + d >= 0 and value + d != truth[k]]
            value += rng.choice(offsets)
            errors.append(k)
        results.append(value)
        acc = value
    return "\n".join(chain_lines(terms, results)), errors


@dataclass(frozen=True)
class Analysis:
    """
    What the generator knows about one sampled completion.

    Attributes:
        correct (`bool`): the reward is 1 (the last line is `#<true sum>`).
        first_error_char (`int` or `None`): index of the first character where the completion leaves the gold one
            (`None` when it is exactly the gold completion).
        first_error_step (`int` or `None`): 0-based line of that character in the gold completion (the line of the
            first wrong step; the answer line counts as a step).
        num_steps (`int`): lines of the gold completion.
        step_errors (`int`): wrong addition lines, each judged against the previous line *as written*: the line must
            be `prev+next_term=prev+next_term`, so a slip carried forward consistently counts once. A malformed or
            missing line counts as wrong and ends the judging.
        steps_judged (`int`): addition lines judged.
    """

    correct: bool
    first_error_char: int | None
    first_error_step: int | None
    num_steps: int
    step_errors: int
    steps_judged: int


def analyze(terms: Sequence[int], completion: str) -> Analysis:
    """Compare a sampled completion (text, without EOS) with the gold one. See [`Analysis`]."""
    gold = gold_completion(terms)
    n = 0
    limit = min(len(gold), len(completion))
    while n < limit and gold[n] == completion[n]:
        n += 1
    diverged = not (n == len(gold) == len(completion))
    lines = completion.split("\n")
    errors = judged = 0
    prev = terms[0]
    for k, term in enumerate(terms[1:]):
        judged += 1
        m = re.fullmatch(r"(\d+)\+(\d+)=(\d+)", lines[k]) if k < len(lines) else None
        if m is None:
            errors += 1
            break
        a, b, c = (int(g) for g in m.groups())
        errors += not (a == prev and b == term and c == a + b)
        prev = c
    return Analysis(
        correct=score(terms, completion) == 1.0,
        first_error_char=n if diverged else None,
        first_error_step=gold[:n].count("\n") if diverged else None,
        num_steps=gold.count("\n") + 1,
        step_errors=errors,
        steps_judged=judged,
    )


def score(terms: Sequence[int], completion: str) -> float:
    """1.0 iff the completion's last line is exactly `#<sum of terms>`."""
    last = completion.rstrip("\n").rsplit("\n", 1)[-1]
    m = _ANSWER.fullmatch(last)
    return 1.0 if m is not None and int(m.group(1)) == sum(terms) else 0.0


def chain_reward(completions, answer: Sequence[int], **kwargs) -> list[float]:
    r"""
    1.0 iff the completion's last line is `#<answer>`, else 0.0 (TRL's reward-function signature).

    Args:
        completions (`list[str]` or `list[list[dict[str, str]]]`):
            The completions, as text or as chat messages (the last message's `content` is graded).
        answer (`list[int]`):
            The true sums (the dataset's `answer` column).
        **kwargs:
            Other dataset columns and trainer arguments; unused.

    Example:
    ```python
    >>> chain_reward(["3+5=8\n8+9=17\n17+2=19\n#19", "3+5=8\n8+9=16\n16+2=18\n#18"], answer=[19, 19])
    [1.0, 0.0]
    ```
    """
    out = []
    for completion, gold in zip(completions, answer, strict=True):
        last = completion_text(completion).rstrip("\n").rsplit("\n", 1)[-1]
        m = _ANSWER.fullmatch(last)
        out.append(1.0 if m is not None and int(m.group(1)) == int(gold) else 0.0)
    return out


def make_problems(n: int, spec: ChainSpec, seed: int, exclude: set[tuple[int, ...]] | None = None) -> list[list[int]]:
    """`n` distinct problems (never one in `exclude`), reproducible from `seed`."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    out: list[list[int]] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * n + 1000:
            raise ValueError(f"Could not draw {n} distinct problems from {spec}: the problem space is too small.")
        terms = sample_terms(rng, spec)
        key = tuple(terms)
        if key in seen:
            continue
        seen.add(key)
        out.append(terms)
    return out


@dataclass
class Splits:
    """Disjoint problem sets: `train` (RL prompts), `validation` (tuning only), `evaluation` (the reported numbers)."""

    train: list[list[int]]
    validation: list[list[int]]
    evaluation: list[list[int]]


def make_splits(spec: ChainSpec, num_train: int, num_validation: int, num_evaluation: int, seed: int = 0) -> Splits:
    """Draw the evaluation set first (fixed by `seed`), then validation and train problems disjoint from it."""
    evaluation = make_problems(num_evaluation, spec, seed=seed * 1000 + 1)
    taken = {tuple(t) for t in evaluation}
    validation = make_problems(num_validation, spec, seed=seed * 1000 + 2, exclude=taken)
    taken |= {tuple(t) for t in validation}
    train = make_problems(num_train, spec, seed=seed * 1000 + 3, exclude=taken)
    return Splits(train=train, validation=validation, evaluation=evaluation)


def rl_dataset(problems: Sequence[Sequence[int]]):
    """A `datasets.Dataset` with a plain-text `prompt` column and the true sum in `answer`."""
    from datasets import Dataset

    return Dataset.from_dict(
        {"prompt": [prompt_text(t) for t in problems], "answer": [sum(t) for t in problems]}
    )


def build_tokenizer():
    """
    A character-level tokenizer over the task's alphabet (`0-9 + = # \n`) plus EOS, PAD and UNK, built locally with
    `tokenizers` and wrapped as a `PreTrainedTokenizerFast`. One token per character, so a token's position is its
    character's position and `first_error` maps directly to tokens.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD_TOKEN: 0, EOS_TOKEN: 1, UNK_TOKEN: 2}
    for ch in ALPHABET:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, unk_token=UNK_TOKEN, bos_token=None
    )
    hf.padding_side = "left"
    return hf


def load_tokenizer(path: str):
    """
    The tokenizer saved with a demo model. Loaded as `PreTrainedTokenizerFast` on purpose: `AutoTokenizer` picks the
    tokenizer class from the model type (Qwen2) and rebuilds a byte-level pre-tokenizer that drops the newlines.
    """
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(path)
    tok.padding_side = "left"
    return tok
