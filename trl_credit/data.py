r"""GSM8K and MATH as TRL prompt datasets, from the Hugging Face Hub or from local JSONL files.

    from trl_credit.data import load_math_dataset
    ds = load_math_dataset("gsm8k", split="train")                           # Hub: openai/gsm8k
    ds = load_math_dataset("math", split="test", source="../shared/data/math")  # local: MATH-500

Every dataset comes out with the same columns, whatever the source:

- `prompt`: the conversation `[{"role": "system", ...}, {"role": "user", ...}]` built from `system_prompt` and
  `template` (by default asking for a `\boxed{}` answer), or a plain string with `conversational=False` (base models);
- `problem`: the question;
- `solution`: the gold final answer (`"18"`, `"\frac{1}{2}"`), the column [`~trl_credit.rewards.math_reward`],
  [`~trl_credit.rewards.gsm8k_reward`] and TRL's `accuracy_reward` read;
- `reference_solution`: the worked reference solution;
- any other column of the source (`subject`, `level`, `unique_id` for MATH).

Splits: GSM8K `train` (7,473) / `test` (1,319). MATH follows PRM800K (https://github.com/openai/prm800k): `train` is the
12,000 problems outside MATH-500 and `test` is MATH-500; `"math500"` is that test split alone.
"""

from __future__ import annotations

import gzip
import json
import numbers
import os
import re
from pathlib import Path
from typing import Any


DEFAULT_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
DEFAULT_TEMPLATE = "{problem}"
# For base models (`conversational=False`): the instruction and a cue to start answering.
DEFAULT_TEXT_TEMPLATE = (
    "Question: {problem}\nPlease reason step by step, and put your final answer within \\boxed{}.\nAnswer:"
)

# name -> (Hub dataset id, Hub config, {split: Hub split}, default split)
DEFAULT_SOURCES: dict[str, tuple[str, str | None, dict[str, str], str]] = {
    "gsm8k": ("openai/gsm8k", "main", {"train": "train", "test": "test"}, "train"),
    # PRM800K's split of MATH: 12,000 train / 500 test (MATH-500).
    "math": ("nlile/hendrycks-MATH-benchmark", None, {"train": "train", "test": "test"}, "train"),
    "math500": ("HuggingFaceH4/MATH-500", None, {"test": "test"}, "test"),
}
_LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")


def load_math_dataset(
    name: str,
    split: str | None = None,
    source: str | os.PathLike | None = None,
    *,
    template: str | None = None,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    conversational: bool = True,
    limit: int | None = None,
):
    r"""
    Load GSM8K, MATH or MATH-500 as a `datasets.Dataset` ready for TRL's `GRPOTrainer` with the math rewards.

    Args:
        name (`str`):
            `"gsm8k"`, `"math"` (PRM800K split: 12,000 train / MATH-500 test) or `"math500"` (test only).
        split (`str`, *optional*):
            `"train"` or `"test"`. Defaults to `"train"`, or `"test"` for `"math500"`.
        source (`str` or `os.PathLike`, *optional*):
            Where the data comes from. Defaults to the Hub dataset `openai/gsm8k` (config `main`),
            `nlile/hendrycks-MATH-benchmark` or `HuggingFaceH4/MATH-500`. A Hub id loads that dataset instead. A local
            file (`.jsonl`, `.jsonl.gz`, `.json`, `.parquet`) is read whatever the split; a local directory must hold
            `<split>.jsonl` or `<split>.jsonl.gz` (e.g. `../shared/data/gsm8k`, or `../shared/data/math` whose train
            split is `train.jsonl.gz`).
        template (`str`, *optional*):
            The user message (or the whole prompt with `conversational=False`), with `{problem}` replaced by the
            question (other braces are kept as they are, so `\boxed{}` needs no escaping). Defaults to
            `"{problem}"`, or to `"Question: {problem}\nPlease reason step by step, and put your final answer within
            \boxed{}.\nAnswer:"` with `conversational=False`.
        system_prompt (`str`, *optional*, defaults to `DEFAULT_SYSTEM_PROMPT`):
            The system message of conversational prompts (by default "Please reason step by step, and put your final
            answer within \boxed{}."); `None` for no system message. Unused with `conversational=False`.
        conversational (`bool`, *optional*, defaults to `True`):
            Chat-message prompts (instruct models, formatted with the tokenizer's chat template) or plain strings
            (base models).
        limit (`int`, *optional*):
            Keep only the first `limit` problems (a positive integer; `None` keeps them all).

    Returns:
        `datasets.Dataset`: columns `prompt`, `problem`, `solution` (gold final answer), `reference_solution`, and
        the source's other columns.

    Example:
    ```python
    >>> from trl_credit.data import load_math_dataset

    >>> ds = load_math_dataset("gsm8k", split="test", source="../shared/data/gsm8k", limit=2)
    >>> ds[0]["prompt"][1]["content"][:30], ds[0]["solution"]
    ('Janet’s ducks lay 16 eggs per ', '18')
    ```
    """
    from datasets import Dataset

    if name not in DEFAULT_SOURCES:
        raise ValueError(f"Unknown dataset {name!r}; choose one of {sorted(DEFAULT_SOURCES)}.")
    check_limit(limit)
    hub_id, hub_config, hub_splits, default_split = DEFAULT_SOURCES[name]
    split = split or default_split
    if split not in hub_splits:
        raise ValueError(f"{name!r} has no split {split!r}; its splits are {sorted(hub_splits)}.")
    if template is None:
        template = DEFAULT_TEMPLATE if conversational else DEFAULT_TEXT_TEMPLATE
    if "{problem}" not in template:
        raise ValueError(f"template must contain '{{problem}}' where the question goes; got {template!r}.")

    where = str(source) if source is not None else hub_id
    if source is None or not _looks_local(source):
        rows = _load_hub(where, hub_config if where == hub_id else None, hub_splits[split], name)
    else:
        rows = _read_local(_local_file(Path(source), split, name))
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise ValueError(f"{where} ({split}) holds no records.")

    out = []
    for i, row in enumerate(rows):
        problem, gold, reference, extra = _normalize(name, row, i, where)
        content = template.replace("{problem}", problem)
        if conversational:
            prompt: Any = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
                {"role": "user", "content": content}
            ]
        else:
            prompt = content
        out.append({"prompt": prompt, "problem": problem, "solution": gold, "reference_solution": reference, **extra})
    return Dataset.from_list(out)


def check_limit(limit, name: str = "limit") -> None:
    """`ValueError`/`TypeError` unless `limit` is `None` or an integer >= 1 (`name` is how the caller spells it)."""
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer (or None for every problem), got "
                        f"{type(limit).__name__} {limit!r}.")  # fmt: skip
    if limit < 1:
        raise ValueError(
            f"{name} must be a positive integer (the number of problems to keep), got {limit}; leave it unset (None) "
            "to keep every problem."
        )


class HubDatasetError(RuntimeError):
    """A named dataset could not be loaded from the Hugging Face Hub (offline, unknown id, network error).
    `fix(option)` gives the same error with the remedy in a command's terms (`--dataset_source path/to/dir`)."""

    def __init__(self, name: str, split: str, hub_id: str, cause: BaseException, option: str | None = None):
        self.name, self.split, self.hub_id, self.cause, self.option = name, split, hub_id, cause, option
        remedy = (
            f"{option} path/to/dir" if option else f"load_math_dataset({name!r}, split={split!r}, source='path/to/dir')"
        )
        super().__init__(
            f"Could not load {name!r} split {split!r} from the Hugging Face Hub dataset {hub_id!r} "
            f"({type(cause).__name__}: {cause}). Offline, pass a local copy: {remedy} (a directory with {split}.jsonl, "
            "or a JSONL file)."
        )

    def __reduce__(self):
        return (type(self), (self.name, self.split, self.hub_id, self.cause, self.option))

    def fix(self, option: str) -> HubDatasetError:
        """This error with the remedy `option path/to/dir` (a command's flag such as `--dataset_source`)."""
        return HubDatasetError(self.name, self.split, self.hub_id, self.cause, option)


# ── sources ────────────────────────────────────────────────────────────────────────────────────────────────────────
def _looks_local(source: str | os.PathLike) -> bool:
    text = str(source)
    if Path(text).exists():
        return True
    # A Hub id is "owner/name"; anything else that does not exist is a mistyped path.
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not text.startswith("."):
        return False
    raise FileNotFoundError(
        f"Data source {text!r} does not exist (absolute: {Path(text).resolve()}). Give an existing JSONL file or "
        "directory, or a Hub dataset id like 'openai/gsm8k'."
    )


def _load_hub(hub_id: str, config: str | None, split: str, name: str) -> list[dict]:
    from datasets import load_dataset

    try:
        dataset = load_dataset(hub_id, config, split=split) if config else load_dataset(hub_id, split=split)
    except Exception as e:
        raise HubDatasetError(name, split, hub_id, e) from e
    return list(dataset)


def _local_file(path: Path, split: str, name: str) -> Path:
    if path.is_file():
        return path
    candidates = [path / f"{split}{suffix}" for suffix in _LOCAL_SUFFIXES]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    raise FileNotFoundError(
        f"No {split!r} split of {name!r} in {path}: expected one of {[c.name for c in candidates]}, found {found}. "
        "Pass the file itself as `source` if it is named differently."
    )


def _read_local(path: Path) -> list[dict]:
    name = path.name.lower()
    if name.endswith(".parquet"):
        from datasets import Dataset

        return list(Dataset.from_parquet(str(path)))
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    if name.endswith((".json", ".json.gz")) and text.lstrip().startswith("["):
        return json.loads(text)
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno} is not valid JSON ({e.msg}); expected one JSON object per line.") from e
    return rows


# ── records ────────────────────────────────────────────────────────────────────────────────────────────────────────
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def _require(row: dict, columns: tuple[str, ...], index: int, where: str, what: str) -> None:
    missing = [c for c in columns if c not in row]
    if missing:
        raise ValueError(
            f"Record {index} of {where} has no {missing} column(s) (it has {sorted(row)}); {what} Rename the columns "
            "or pass a source with this schema."
        )


def last_boxed_answer(
    solution: str, *, commands: tuple[str, ...] = ("\\boxed", "\\fbox"), allow_unbraced: bool = True
) -> str | None:
    r"""The content of the last `\boxed{...}` or `\fbox{...}` of a solution (braces balanced; `\boxed 5` gives `5`
    unless `allow_unbraced=False`), or `None`. Linear time."""
    command = max(commands, key=solution.rfind)
    start = solution.rfind(command)
    if start == -1:
        return None
    rest = solution[start + len(command) :]
    if not rest.lstrip(" \t").startswith("{"):
        if not allow_unbraced:
            return None
        token = rest.split(None, 1)[0] if rest.startswith(" ") and rest.strip() else ""
        return token.rstrip(".$") or None
    i = len(rest) - len(rest.lstrip(" \t"))
    depth = 0
    for j in range(i, len(rest)):
        if rest[j] == "{":
            depth += 1
        elif rest[j] == "}":
            depth -= 1
            if depth == 0:
                return rest[i + 1 : j]
    return None


def _normalize(name: str, row: dict, index: int, where: str) -> tuple[str, str, str, dict]:
    """`(problem, gold answer, reference solution, other columns)` of one record."""
    if name == "gsm8k":
        _require(row, ("question", "answer"), index, where, "GSM8K records need `question` and `answer` (a "
                 "reference solution ending in '#### <number>').")  # fmt: skip
        reference = str(row["answer"])
        if "####" not in reference:
            raise ValueError(
                f"Record {index} of {where}: the GSM8K `answer` has no '#### <number>' final line: "
                f"{reference[-200:]!r}."
            )
        gold = _THOUSANDS.sub("", reference.rsplit("####", 1)[1].strip())
        extra = {k: v for k, v in row.items() if k not in ("question", "answer")}
        return str(row["question"]), gold, reference, extra
    _require(row, ("problem",), index, where, "MATH records need `problem` and `answer` or a `solution` with a "
             "\\boxed{} answer.")  # fmt: skip
    reference = str(row.get("solution") or "")
    gold = row.get("answer")
    if gold is None:
        gold = last_boxed_answer(reference)
        if gold is None:
            raise ValueError(
                f"Record {index} of {where} has no `answer` column and its `solution` has no \\boxed{{}} answer "
                f"({reference[-200:]!r}); MATH records need one of the two."
            )
    extra = {k: v for k, v in row.items() if k not in ("problem", "solution", "answer")}
    return str(row["problem"]), str(gold), reference, extra


# ── generated word problems ────────────────────────────────────────────────────────────────────────────────────────
_PEOPLE = (("Tom", "he", "his"), ("Anna", "she", "her"), ("Ben", "he", "his"), ("Lucy", "she", "her"),
           ("Sam", "he", "his"), ("Mia", "she", "her"), ("Leo", "he", "his"), ("Emma", "she", "her"),
           ("Jack", "he", "his"), ("Lily", "she", "her"), ("Max", "he", "his"), ("Zoe", "she", "her"))  # fmt: skip
_ITEMS = ("pencils", "apples", "stickers", "marbles", "books", "cookies", "cards", "balloons", "shells", "stamps")


def _word_problem(rng, max_operand: int, two_step: bool) -> tuple[str, str, int]:
    """One `(question, GSM8K-style worked answer, final answer)`; every operand is in [1, max_operand]."""
    (name, he, his), (friend, _, _) = rng.sample(_PEOPLE, 2)
    it = rng.choice(_ITEMS)
    He = he.capitalize()
    r = lambda lo=1, hi=max_operand: rng.randint(lo, max(lo, hi))  # noqa: E731
    if not two_step:
        kind = rng.randrange(4)
        if kind == 0:
            a, b = r(), r(2)
            q = f"{name} has {a} {it}. {He} buys {b} more {it}. How many {it} does {name} have now?"
            return q, f"{name} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} {it} now.", a + b
        if kind == 1:
            a = r(2)
            b = r(1, a - 1)
            q = f"{name} has {a} {it}. {He} gives {b} {it} to {friend}. How many {it} does {name} have left?"
            return q, f"{name} has {a} - {b} = <<{a}-{b}={a - b}>>{a - b} {it} left.", a - b
        if kind == 2:
            a, b = r(2, min(10, max_operand)), r(2, min(10, max_operand))
            q = f"{name} buys {a} boxes of {it}. Each box has {b} {it}. How many {it} does {name} buy?"
            return q, f"{name} buys {a} * {b} = <<{a}*{b}={a * b}>>{a * b} {it}.", a * b
        a, b = r(2, min(10, max_operand)), r(2, min(10, max_operand))
        q = f"{name} has {a * b} {it} and puts them into {a} equal groups. How many {it} are in each group?"
        return q, f"Each group has {a * b} / {a} = <<{a * b}/{a}={b}>>{b} {it}.", b
    kind = rng.randrange(4)
    if kind == 0:
        a, b = r(), r()
        c = r(1, a + b - 1)
        q = (f"{name} has {a} {it}. {He} buys {b} more {it}, then gives {c} {it} to {friend}. "
             f"How many {it} does {name} have now?")  # fmt: skip
        s = f"{name} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} {it} after buying.\n"
        return q, s + f"Then {a + b} - {c} = <<{a + b}-{c}={a + b - c}>>{a + b - c} {it} are left.", a + b - c
    if kind == 1:
        a, b, c = r(2, min(10, max_operand)), r(2, min(10, max_operand)), r()
        q = (f"{name} buys {a} packs of {it} with {b} {it} in each pack. {He} already had {c} {it}. "
             f"How many {it} does {name} have now?")  # fmt: skip
        s = f"{name} buys {a} * {b} = <<{a}*{b}={a * b}>>{a * b} {it}.\n"
        return q, s + f"{He} has {a * b} + {c} = <<{a * b}+{c}={a * b + c}>>{a * b + c} {it} now.", a * b + c
    if kind == 2:
        a, b = r(), r()
        q = (f"{name} has {a} {it}. {friend} has {b} more {it} than {name}. "
             f"How many {it} do {name} and {friend} have together?")  # fmt: skip
        s = f"{friend} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} {it}.\n"
        return q, s + f"Together they have {a} + {a + b} = <<{a}+{a + b}={2 * a + b}>>{2 * a + b} {it}.", 2 * a + b
    a = r(2)
    b, c = r(1, a - 1), r(2, min(5, max_operand))
    q = (f"{name} had {a} {it} and lost {b} of them. {friend} has {c} times as many {it} as {name} has now. "
         f"How many {it} does {friend} have?")  # fmt: skip
    s = f"{name} has {a} - {b} = <<{a}-{b}={a - b}>>{a - b} {it} now.\n"
    return q, s + f"{friend} has {a - b} * {c} = <<{a - b}*{c}={(a - b) * c}>>{(a - b) * c} {it}.", (a - b) * c


def word_problems(n: int, seed: int = 0, *, max_operand: int = 20, two_step_fraction: float = 0.5,
                  exclude: set[str] | frozenset[str] = frozenset()) -> list[dict]:  # fmt: skip
    """
    `n` distinct generated one- and two-step word problems with small numbers, as GSM8K records (`question`, and an
    `answer` with the worked solution and a final `#### N` line), for models too small for GSM8K itself:

        Tom has 7 pencils. He buys 5 more pencils. How many pencils does Tom have now?

    Eight templates (add, subtract, multiply, divide; add-then-subtract, multiply-then-add, "more than" then total,
    subtract-then-multiply), operands in `[1, max_operand]`, answers non-negative integers. SmolLM2-135M-Instruct
    answers ≈ 34 % of them greedily (≈ 70-token answers) and near none of GSM8K. Questions in `exclude` are skipped
    (disjoint splits: see [`write_word_problems`]). Deterministic in `seed`.
    """
    import random

    if n < 0 or max_operand < 2 or not 0.0 <= two_step_fraction <= 1.0:
        raise ValueError(f"Need n >= 0, max_operand >= 2, 0 <= two_step_fraction <= 1; got {n}, {max_operand}, "
                         f"{two_step_fraction}.")  # fmt: skip
    rng = random.Random(seed)
    seen, out = set(exclude), []
    for _ in range(200 * n + 1000):
        if len(out) == n:
            return out
        question, worked, answer = _word_problem(rng, max_operand, rng.random() < two_step_fraction)
        if question not in seen:
            seen.add(question)
            out.append({"question": question, "answer": f"{worked}\n#### {answer}"})
    raise ValueError(f"Could not generate {n} distinct problems with max_operand={max_operand}; lower n.")


def write_word_problems(directory: str | os.PathLike, splits: dict[str, int] | None = None, seed: int = 0,
                        **kwargs) -> Path:  # fmt: skip
    """
    Write disjoint splits of [`word_problems`] as `<split>.jsonl` files in GSM8K's format and return the directory:
    `load_math_dataset("gsm8k", "train", source=directory)`, `trl-credit train --dataset_name gsm8k --dataset_source
    DIR` and `trl-credit eval --dataset gsm8k --source DIR` read them like GSM8K (other split names: pass the file,
    `DIR/validation.jsonl`, as the source). Defaults: `{"train": 1000, "validation": 200, "test": 500}`.
    """
    splits = splits or {"train": 1000, "validation": 200, "test": 500}
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    for i, (split, n) in enumerate(splits.items()):
        rows = word_problems(n, seed=seed * 1000 + i, exclude=used, **kwargs)
        used.update(row["question"] for row in rows)
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return out
