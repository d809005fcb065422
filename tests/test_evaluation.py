"""pass@k metrics, `trl-credit eval` end to end (transformers and real vLLM on CPU), and the training callback."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import require_vllm
from trl_credit.evaluation import MathEvalCallback, compute_metrics, evaluate, majority_vote, pass_at_k


# ── metrics ────────────────────────────────────────────────────────────────────────────────────────────────────────
@given(st.integers(1, 60).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_equals_one_minus_the_binomial_ratio(nck):
    n, c, k = nck
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_k_hand_values_and_bounds():
    assert pass_at_k(16, 4, 1) == 0.25
    assert pass_at_k(4, 1, 2) == 0.5  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_majority_vote_ignores_missing_answers_and_breaks_ties_by_first_seen():
    assert majority_vote(["2", None, None, "3", "3"], [False, False, False, True, True])
    assert not majority_vote(["2", "3", "3", "2"], [False, True, True, False])  # tie: "2" was seen first
    assert not majority_vote([None, None], [False, False])


def _records(answers, correct):
    status = lambda a, ok: "correct" if ok else ("no_answer" if a is None else "wrong")  # noqa: E731
    return [{"answer": a, "correct": ok, "reward": float(ok), "status": status(a, ok), "num_tokens": 10}
            for a, ok in zip(answers, correct, strict=True)]  # fmt: skip


def test_compute_metrics_on_hand_made_problems():
    problems = [
        _records(["1", "1", "2", "1"], [True, True, False, True]),  # c = 3
        _records(["5", "6", "6", None], [True, False, False, False]),  # c = 1, majority "6" is wrong
    ]
    skipped = [dict(r, reward=None, status="gold_unparseable") for r in _records(["1"] * 4, [False] * 4)]
    metrics = compute_metrics(problems + [skipped], k_values=[1, 2, 4])
    assert metrics["num_problems"] == 3 and metrics["num_graded_problems"] == 2 and metrics["gold_unparseable"] == 1
    assert metrics["pass@1"] == pytest.approx((3 / 4 + 1 / 4) / 2)
    assert metrics["pass@2"] == pytest.approx((1.0 + 0.5) / 2)
    assert metrics["pass@4"] == 1.0
    assert metrics["maj@4"] == 0.5
    assert metrics["no_answer_rate"] == pytest.approx(1 / 12)


# ── end to end on the tiny model ───────────────────────────────────────────────────────────────────────────────────
def _check_outputs(output_dir: Path, problems: int, samples: int, backend: str) -> list[dict]:
    records = [json.loads(line) for line in (output_dir / "samples.jsonl").open()]
    summary = json.loads((output_dir / "metrics.json").read_text())
    assert summary["config"]["backend"] == backend
    assert len(records) == problems * samples
    assert {(r["problem_index"], r["sample_index"]) for r in records} == {
        (i, j) for i in range(problems) for j in range(samples)
    }
    for r in records:
        assert r["status"] in ("correct", "wrong", "no_answer")
        assert (r["answer"] is None) == (r["status"] == "no_answer")
        assert r["correct"] == (r["status"] == "correct")
    # The printed metrics are those of the file.
    pass1 = sum(r["correct"] for r in records) / len(records)
    assert summary["metrics"]["pass@1"] == pytest.approx(pass1)
    assert summary["metrics"]["num_problems"] == problems
    return records


def test_trl_credit_eval_end_to_end_with_transformers(tiny_model_dir, data_dir, tmp_path, capsys):
    from trl_credit.cli import main

    out = tmp_path / "eval"
    rc = main(["eval", "--model", tiny_model_dir, "--dataset", "gsm8k", "--source", str(data_dir / "gsm8k"),
               "--backend", "transformers", "--limit", "3", "--num-samples", "4", "--max-new-tokens", "12",
               "--temperature", "1.0", "--batch-size", "8", "--output-dir", str(out), "--no-progress"])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    for key in ("pass@1", "pass@2", "pass@4", "maj@4", "samples.jsonl"):
        assert key in printed
    records = _check_outputs(out, problems=3, samples=4, backend="transformers")
    assert len({r["completion"] for r in records}) > 3  # sampled, not 12 copies
    assert records[0]["gold"] == "18"  # first GSM8K test problem


def test_evaluation_grades_a_completion_correct_when_the_gold_is_its_own_answer(tiny_model_dir, data_dir):
    from trl_credit.data import load_math_dataset

    ds = load_math_dataset("gsm8k", split="test", source=data_dir / "gsm8k", limit=4)
    options = dict(backend="transformers", num_samples=2, max_new_tokens=12, temperature=1.0, seed=7, progress=False)
    first = evaluate(tiny_model_dir, ds, **options)
    answers = [first.samples[2 * i]["answer"] for i in range(4)]
    keep = [i for i, a in enumerate(answers) if a is not None]
    assert keep, "the tiny model produced no number at all"
    # Same problems in the same order (so the same random stream), golds replaced by the first sample's answers.
    relabelled = ds.map(lambda row, i: {"solution": answers[i] or row["solution"]}, with_indices=True)
    second = evaluate(tiny_model_dir, relabelled, reward="gsm8k", **options)
    assert [s["completion"] for s in second.samples] == [s["completion"] for s in first.samples]
    assert all(second.samples[2 * i]["correct"] for i in keep)
    assert second.metrics["pass@1"] >= len(keep) / 8 and second.metrics["pass@2"] >= len(keep) / 4


@pytest.mark.vllm
def test_trl_credit_eval_end_to_end_with_vllm_cpu(tiny_model_dir, data_dir, tmp_path):
    require_vllm()
    out = tmp_path / "eval"
    script = Path(sys.executable).with_name("trl-credit")  # the console script declared in pyproject.toml
    command = [str(script)] if script.exists() else [sys.executable, "-m", "trl_credit.cli"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TORCHDYNAMO_DISABLE="1")
    proc = subprocess.run(
        [*command, "eval", "--model", tiny_model_dir, "--dataset", "math500", "--source", str(data_dir / "math"),
         "--backend", "vllm", "--limit", "3", "--num-samples", "4", "--max-new-tokens", "16", "--temperature", "1.0",
         "--vllm-max-model-len", "1024", "--vllm-kv-cache-mib", "64", "--output-dir", str(out), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "pass@1" in proc.stdout and "maj@4" in proc.stdout
    records = _check_outputs(out, problems=3, samples=4, backend="vllm")
    assert all(r["num_tokens"] > 0 for r in records)
    assert len({r["completion"] for r in records}) > 3


# ── during training ────────────────────────────────────────────────────────────────────────────────────────────────
@pytest.mark.slow
def test_grpo_training_with_math_reward_on_local_gsm8k_and_the_eval_callback(tiny_model_dir, data_dir, tmp_path):
    from trl_credit import GRPOConfig, GRPOTrainer
    from trl_credit.data import load_math_dataset
    from trl_credit.rewards import format_reward, math_reward

    args = GRPOConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, num_generations=4,
        max_completion_length=12, learning_rate=1e-2, report_to="none", bf16=False, use_cpu=True,
        save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
    )  # fmt: skip
    train = load_math_dataset("gsm8k", split="train", source=data_dir / "gsm8k", limit=16)
    trainer = GRPOTrainer(model=tiny_model_dir, reward_funcs=[math_reward, format_reward], args=args,
                          train_dataset=train)  # fmt: skip
    callback = MathEvalCallback(trainer, "gsm8k", source=data_dir / "gsm8k", eval_steps=2, num_samples=2, limit=2,
                                max_new_tokens=8, batch_size=4)  # fmt: skip
    trainer.add_callback(callback)
    trainer.train()

    logs = trainer.state.log_history
    train_logs = [h for h in logs if "loss" in h]
    assert len(train_logs) == 2 and all(math.isfinite(h["loss"]) for h in train_logs)
    for key in ("rewards/math_reward/mean", "rewards/format_reward/mean", "rewards/math_reward/timeouts",
                "rewards/math_reward/gold_unparseable"):  # fmt: skip
        assert all(key in h for h in train_logs), key
    assert all(h["rewards/math_reward/gold_unparseable"] == 0 for h in train_logs)
    eval_logs = [h for h in logs if "eval_gsm8k/pass@1" in h]
    assert [h["step"] for h in eval_logs] == [2]
    assert (tmp_path / "math_eval" / "step_2" / "samples.jsonl").read_text().count("\n") == 4


# ── bad settings ───────────────────────────────────────────────────────────────────────────────────────────────────
def _eval_cli_error(capsys, *args):
    from trl_credit.cli import main

    with pytest.raises(SystemExit) as info:
        main(["eval", "--model", "/nonexistent/model", *args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("trl-credit eval: error: "), err[:300]  # the useful line first, no usage block
    return err.splitlines()[0]


def test_eval_cli_refuses_greedy_decoding_with_several_samples_naming_both_flags(capsys):
    # Used to fail inside transformers' generate with a message naming neither flag.
    line = _eval_cli_error(capsys, "--temperature", "0", "--num-samples", "4")
    assert "--temperature 0 is greedy decoding" in line and "--num-samples 1" in line


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--temperature", "-0.5"], "argument --temperature: expected a temperature >= 0"),
        (["--temperature", "nan"], "argument --temperature: expected a temperature >= 0 (a finite number)"),
        (["--top-p", "0"], "argument --top-p: expected a probability in (0, 1]"),
        (["--top-p", "1.2"], "argument --top-p: expected a probability in (0, 1]"),
        (["--num-samples", "0"], "argument --num-samples: expected an integer >= 1"),
        (["--max-new-tokens", "-1"], "argument --max-new-tokens: expected an integer >= 1"),
        (["--batch-size", "0"], "argument --batch-size: expected an integer >= 1"),
        (["--limit", "-1"], "argument --limit: expected an integer >= 1"),
        (["--seed", "-3"], "argument --seed: expected an integer >= 0"),
        (["--k", "0"], "argument --k: expected an integer >= 1"),
        (["--k", "2", "32"], "--k values must be <= --num-samples (16)"),
        (["--timeout", "inf"], "argument --timeout: expected a number of seconds in (0, 86400] (a finite number)"),
        (["--timeout", "0"], "argument --timeout: expected a number of seconds in (0, 86400]"),
        (["--dataset", "math500", "--split", "train"], "--split must be one of ['test'] for --dataset math500"),
        (["--template", "no placeholder"], "--template must contain '{problem}'"),
        (["--vllm-kv-cache-mib", "0"], "argument --vllm-kv-cache-mib: expected an integer >= 1"),
        (["--vllm-gpu-memory-utilization", "1.5"], "argument --vllm-gpu-memory-utilization: expected a fraction"),
    ],
)
def test_eval_cli_refuses_values_that_cannot_work_naming_the_flag(capsys, flags, expected):
    assert expected in _eval_cli_error(capsys, *flags)


def test_eval_help_shows_the_defaults(capsys):
    from trl_credit.cli import main

    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for fragment in ("completions per problem (n) (default: 16)", "(default: 0.6)", "(default: 1024)",
                     "sampling seed (default: 0)", "(default: math500)", "(default: 5.0)", "(default: 64)"):  # fmt: skip
        assert fragment in text, fragment


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": 0.0, "num_samples": 4}, "temperature 0 is greedy decoding.*num_samples is 4"),
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"num_samples": 0}, "num_samples must be an integer >= 1"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
        ({"batch_size": -1}, "batch_size must be an integer >= 1"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"k_values": [0, 2]}, r"k_values must be integers in \[1, num_samples=16\]"),
        ({"limit": -1}, "limit must be a positive integer"),
    ],
)
def test_evaluate_refuses_bad_settings_before_any_work(kwargs, message):
    # The model path does not exist: the settings are checked before anything is loaded.
    with pytest.raises(ValueError, match=message):
        evaluate("/nonexistent/model", "gsm8k", **kwargs)


def test_math_eval_callback_checks_its_settings_at_construction():
    with pytest.raises(ValueError, match="temperature 0 is greedy decoding"):
        MathEvalCallback(trainer=None, num_samples=4, temperature=0.0)
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        MathEvalCallback(trainer=None, limit=0)
    with pytest.raises(TypeError, match=r"unknown evaluate\(\) arguments \['temprature'\]"):
        MathEvalCallback(trainer=None, temprature=0.5)


def test_eval_offline_without_source_points_at_the_source_flag(capsys, monkeypatch):
    import datasets

    from trl_credit.cli import main

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert main(["eval", "--model", "/nonexistent/model", "--dataset", "gsm8k"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trl-credit eval: error: Could not load 'gsm8k'") and "--source path/to/dir" in err
    assert "load_math_dataset(" not in err


def test_grading_shows_a_progress_bar_over_the_completions(tiny_model_dir, data_dir, capsys):
    evaluate(tiny_model_dir, "gsm8k", source=data_dir / "gsm8k", limit=2, num_samples=2, max_new_tokens=4,
             temperature=1.0, backend="transformers", progress=True)  # fmt: skip
    err = capsys.readouterr().err
    assert "grading" in err and "4/4" in err and "completion" in err
