"""`load_math_dataset` on the local copies of GSM8K and MATH in ../shared/data, and its error messages."""

import gzip
import json

import pytest

from trl_credit.data import DEFAULT_SYSTEM_PROMPT, HubDatasetError, last_boxed_answer, load_math_dataset
from trl_credit.rewards import gsm8k_reward, math_reward


@pytest.mark.parametrize("split, count", [("train", 7473), ("test", 1319)])
def test_gsm8k_local_directory_gives_prompts_and_bare_gold_numbers(data_dir, split, count):
    ds = load_math_dataset("gsm8k", split=split, source=data_dir / "gsm8k")
    assert len(ds) == count
    assert ds.column_names == ["prompt", "problem", "solution", "reference_solution"]
    row = ds[0]
    assert row["prompt"] == [
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": row["problem"]},
    ]
    assert row["reference_solution"].rsplit("####", 1)[1].strip().replace(",", "") == row["solution"]
    # SOURCE.md: every GSM8K answer is an integer, some written with thousands separators ("1,600").
    assert all(s.lstrip("-").isdigit() for s in ds["solution"])
    assert any("," in r.rsplit("####", 1)[1] for r in ds["reference_solution"])


def test_gsm8k_gold_column_is_what_gsm8k_reward_accepts(data_dir):
    ds = load_math_dataset("gsm8k", split="test", source=data_dir / "gsm8k", limit=200)
    assert gsm8k_reward(ds["reference_solution"], solution=ds["solution"]) == [1.0] * 200


def test_math_train_comes_from_the_gzipped_file_and_test_is_math500(data_dir):
    train = load_math_dataset("math", split="train", source=data_dir / "math")
    test = load_math_dataset("math", split="test", source=data_dir / "math")
    math500 = load_math_dataset("math500", source=data_dir / "math")
    assert (len(train), len(test), len(math500)) == (12000, 500, 500)
    assert test["unique_id"] == math500["unique_id"]
    assert not set(train["unique_id"]) & set(test["unique_id"])  # PRM800K split: disjoint
    raw = [json.loads(line) for line in (data_dir / "math" / "test.jsonl").open()]
    assert math500["solution"] == [r["answer"] for r in raw]
    assert math500["reference_solution"] == [r["solution"] for r in raw]
    assert {"subject", "level"} <= set(math500.column_names)


def test_math_answer_is_the_last_box_of_the_solution_when_the_source_has_no_answer_column(tmp_path, data_dir):
    rows = [json.loads(line) for line in (data_dir / "math" / "test.jsonl").open()][:50]
    path = tmp_path / "test.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for r in rows:
            f.write(json.dumps({"problem": r["problem"], "solution": r["solution"]}) + "\n")
    ds = load_math_dataset("math500", source=tmp_path)
    assert ds["solution"] == [r["answer"] for r in rows]
    assert math_reward(ds["reference_solution"], solution=ds["solution"]) == [1.0] * 50


def test_last_boxed_answer_balances_braces():
    assert last_boxed_answer(r"so $\boxed{\frac{a}{b}}$ and then \boxed{x^{2}}.") == "x^{2}"
    assert last_boxed_answer(r"\fbox{3} then \boxed 5.") == "5"
    assert last_boxed_answer(r"\boxed{unbalanced") is None
    assert last_boxed_answer("no box") is None


def test_plain_text_prompts_for_base_models_and_custom_templates(data_dir):
    plain = load_math_dataset("gsm8k", split="test", source=data_dir / "gsm8k", conversational=False, limit=2)
    assert plain[0]["prompt"].startswith("Question: " + plain[0]["problem"])
    assert plain[0]["prompt"].endswith("within \\boxed{}.\nAnswer:")
    custom = load_math_dataset("gsm8k", split="test", source=data_dir / "gsm8k" / "test.jsonl", limit=2,
                               template="Solve: {problem} Box it: \\boxed{}", system_prompt=None)  # fmt: skip
    assert custom[0]["prompt"] == [{"role": "user", "content": f"Solve: {custom[0]['problem']} Box it: \\boxed{{}}"}]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_errors_name_the_problem_and_the_fix(tmp_path, data_dir):
    with pytest.raises(ValueError, match="Unknown dataset 'gsm9k'"):
        load_math_dataset("gsm9k")
    with pytest.raises(ValueError, match="'math500' has no split 'train'"):
        load_math_dataset("math500", split="train", source=data_dir / "math")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_math_dataset("gsm8k", source=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"expected one of \['train.jsonl'"):
        load_math_dataset("gsm8k", split="train", source=tmp_path)
    with pytest.raises(ValueError, match=r"has no \['answer'\] column.*it has \['prompt', 'question'\]"):
        load_math_dataset("gsm8k", source=_write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "prompt": "p"}]))
    with pytest.raises(ValueError, match="no '#### <number>' final line"):
        load_math_dataset("gsm8k", source=_write_jsonl(tmp_path / "b.jsonl", [{"question": "q", "answer": "42"}]))
    with pytest.raises(ValueError, match="no `answer` column and its `solution` has no"):
        load_math_dataset("math", source=_write_jsonl(tmp_path / "c.jsonl", [{"problem": "p", "solution": "s"}]))
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{not json\n')
    with pytest.raises(ValueError, match="d.jsonl:2 is not valid JSON"):
        load_math_dataset("gsm8k", source=bad)
    with pytest.raises(ValueError, match="must contain '\\{problem\\}'"):
        load_math_dataset("gsm8k", source=data_dir / "gsm8k", template="no placeholder")


@pytest.mark.parametrize("limit, error", [(-1, ValueError), (0, ValueError), (-100, ValueError), (2.5, TypeError),
                                          (True, TypeError), ("3", TypeError)])  # fmt: skip
def test_limit_must_be_a_positive_integer(data_dir, limit, error):
    # limit=-1 used to drop the last problem silently (rows[:-1]).
    with pytest.raises(error, match="limit must be a positive integer"):
        load_math_dataset("gsm8k", split="test", source=data_dir / "gsm8k", limit=limit)
    assert len(load_math_dataset("gsm8k", split="test", source=data_dir / "gsm8k", limit=1)) == 1


def test_hub_errors_say_how_to_load_offline_in_the_callers_terms(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(HubDatasetError, match=r"OfflineModeIsEnabled.*load_math_dataset\('gsm8k', split='test', "
                       r"source='path/to/dir'\)") as info:  # fmt: skip
        load_math_dataset("gsm8k", split="test")
    assert "pass a local copy: --dataset_source path/to/dir" in str(info.value.fix("--dataset_source"))
    assert isinstance(info.value, RuntimeError)  # what callers caught before
