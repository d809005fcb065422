"""Math rewards: agreement with real labels, MATH-500 self-consistency, adversarial inputs, deadlines, worker pool."""

import json
import os
import pickle
import random
import signal
import threading
import time

import pytest

from trl_credit.rewards import (
    MathVerifyReward,
    completion_text,
    format_reward,
    gsm8k_reward,
    math_reward,
    math_verify_reward,
)
from trl_credit.rewards._pool import VerifierPool, _Pending
from trl_credit.rewards.checks import check_reward_output, checked_reward_funcs


# Slack over a deadline for scheduling on a loaded 2-core CI machine (the deadline itself is 1 s in these tests).
SLACK_S = 4.0
PATHOLOGICAL = [
    # Math-Verify#65: parse() "hangs forever despite the timeout functionality"
    r"\boxed{\dfrac{5^{\left(5^{\left(5^{\left(5^5\right)}\right)} - 4\right)} - 5}{16}}",
    # pytorch/torchtitan#4442: a huge power tower in the final answer
    r"The last three digits of \(2003^{2002^{2001}}\) are \boxed{2003^{2002^{2001}}}",
    r"$10^{10^{10^{10}}}$ so the answer: $10^{10^{10^{10}}}$",
    "\\boxed{" + "{" * 3000 + "1" + "}" * 3000 + "}",  # 25 s in math-verify without a deadline
]


def _gsm8k_labelled(data_dir):
    keys = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")
    path = data_dir / "completions" / "gsm8k_gpt3_example_model_solutions.jsonl"
    rows = [json.loads(line) for line in path.open()]
    gsm8k = [json.loads(line) for line in (data_dir / "gsm8k" / "test.jsonl").open()]
    assert len(rows) == len(gsm8k) == 1319
    completions, golds, labels = [], [], []
    for row, reference in zip(rows, gsm8k, strict=True):
        assert row["question"] == reference["question"]  # same order, as SOURCE.md says
        for k in keys:
            completions.append(row[k]["solution"])
            golds.append(reference["answer"])  # the "... #### 18" reference solution
            labels.append(row[k]["is_correct"])
    return completions, golds, labels


# ── correctness on real data ───────────────────────────────────────────────────────────────────────────────────────
def test_gsm8k_reward_agrees_with_the_labels_of_5276_real_gpt3_completions(data_dir):
    completions, golds, labels = _gsm8k_labelled(data_dir)
    assert len(completions) == 5276
    rewards = gsm8k_reward(completions, answer=golds)
    disagreements = [i for i, (r, label) in enumerate(zip(rewards, labels, strict=True)) if (r == 1.0) != label]
    for i in disagreements:
        print(f"DISAGREEMENT #{i}: label={labels[i]} reward={rewards[i]} gold={golds[i][-20:]!r} "
              f"completion tail={completions[i][-160:]!r}")  # fmt: skip
    agreement = 1 - len(disagreements) / len(labels)
    print(f"gsm8k_reward agreement with the labels: {agreement:.4%} ({len(disagreements)} of {len(labels)} disagree)")
    assert agreement >= 0.999


def test_gsm8k_reward_reads_gold_from_hashes_answer_lines_and_bare_numbers():
    completion = "She buys 3 * 360 = <<3*360=1080>>1080 apples.\nA: 1,080"
    golds = ["... so 1,080 in total.\n#### 1,080", "So 1,080 apples\nA: 1080", "1,080", "1080.0", "1081"]
    assert gsm8k_reward([completion] * 5, solution=golds) == [1.0, 1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize(
    "completion, correct",
    [
        ("so x = 3, the final result is \\boxed{-12}", True),  # boxed wins over the last number
        ("The answer is -12 degrees, as 3 * 4 = 12.", True),  # "answer is": the first number after it
        ("#### -12\n\nWait, let me check 5 - 2 = 3", True),  # the last anchor's first number
        ("It loses 4 * 3 = <<4*3=12>>12 degrees, to -12", True),  # no anchor: the last number
        ("A: $-12.00", True),  # currency, decimals
        ("The answer is 12.", False),  # the sign matters
        ("I do not know.", False),
    ],
)
def test_gsm8k_reward_extracts_the_final_number(completion, correct):
    assert gsm8k_reward([completion], solution=["#### -12"]) == [float(correct)]


@pytest.mark.parametrize(
    "completion",
    [
        "The answer is 52 - 40 = x",  # issue 16: was graded as 12
        "The answer is 52 - 40",
        "A: 52-40",
        "#### 6*2",
        "\\boxed{52 - 40}",
        "The answer is $\\frac{24}{2}$",
        "The answer is 24/2",
        "A: 12 = 52 - 40",  # the statement ends in a calculation
        "The answer is 12 + 0 = 12 + 0",
        "so the total is 2 * (3 + 4) - 2",  # no anchor: the text ends in a calculation
        "so the total is (3 + 4) * 2 - 2",
        "The result is 6 \u00d7 2",
        "The answer is 52 \u2212 40",  # Unicode minus
        "The answer is 6 x 2",  # "x" as multiplication
    ],
)
def test_gsm8k_reward_refuses_a_calculation_instead_of_a_number(completion):
    reward = math_verify_reward("gsm8k")
    [verdict] = reward.score([completion], ["#### 12"])
    assert (verdict.reward, verdict.status, verdict.answer) == (0.0, "no_answer", None)


@pytest.mark.parametrize(
    "completion",
    [
        "A: 3 + 9 = 12",  # an equation that ends in the number: that number
        "The answer is x = 12",
        "6 x 2 = 12 eggs",
        "The answer is 12 (since 52 - 40 = 12)",
        "A: **12**",  # Markdown bold (was graded wrong)
        "The answer is $12$.",
        "\\boxed{\\$12}",
        "\\boxed{12 \\text{ apples}}",
        "A: 12%",
        "The answer is 12\nWait, 52 - 40 is what I had",  # the anchored line is a number; later text is not graded
    ],
)
def test_gsm8k_reward_accepts_a_number_however_it_is_dressed(completion):
    assert gsm8k_reward([completion], solution=["12"]) == [1.0]


def test_every_math500_gold_answer_verifies_against_its_own_reference_solution(data_dir):
    rows = [json.loads(line) for line in (data_dir / "math" / "test.jsonl").open()]
    assert len(rows) == 500
    completions = [[{"role": "assistant", "content": r["solution"]}] for r in rows]
    rewards = math_reward(completions, solution=[r["answer"] for r in rows])
    failures = [(r["unique_id"], r["answer"]) for r, x in zip(rows, rewards, strict=True) if x != 1.0]
    for failure in failures:
        print("NOT VERIFIED:", failure)
    assert not failures
    # A wrong answer in the same LaTeX context must not verify: the check above is not vacuous.
    wrong = [r["solution"][: r["solution"].rfind("\\boxed{")] + f"\\boxed{{{r['answer']} + 1}}" for r in rows[:20]]
    assert math_reward(wrong, solution=[r["answer"] for r in rows[:20]]) == [0.0] * 20


def test_math_reward_reads_boxed_answers_with_nested_braces_and_latex():
    completions = [
        [{"role": "assistant", "content": r"So $x = \boxed{\frac{1}{3}}$."}],  # chat message
        r"On reflection, \boxed{\left( 3, \frac{\pi}{2} \right)}",  # nested braces
        "The final answer is $\\frac43$.",  # anchored LaTeX, malformed \frac
        "The answer is $2k$.",
        "It is \\boxed{0.5}",
    ]
    golds = [r"\frac13", r"\left( 3, \frac{\pi}{2} \right)", r"\dfrac{4}{3}", "2k", r"\frac{1}{3}"]
    assert math_reward(completions, solution=golds) == [1.0, 1.0, 1.0, 1.0, 0.0]
    # The gold may also be a full reference solution, or come from an `answer` column.
    assert math_reward(["\\boxed{7}"], answer=["We get $3 + 4 = \\boxed{7}$."]) == [1.0]


def test_unparseable_gold_gives_none_and_is_counted_in_log_metric():
    logged = {}
    reward = math_verify_reward("math", name="probe_reward")
    rewards = reward(["\\boxed{3}", "\\boxed{3}", "no answer here"], solution=["", "3", "3"],
                     log_metric=logged.__setitem__)  # fmt: skip
    assert rewards == [None, 1.0, 0.0]
    assert logged == {
        "rewards/probe_reward/gold_unparseable": 1.0,
        "rewards/probe_reward/timeouts": 0.0,
        "rewards/probe_reward/errors": 0.0,
        "rewards/probe_reward/no_answer": 1.0,
    }
    assert reward.counts == {"gold_unparseable": 1, "correct": 1, "no_answer": 1}


def test_missing_gold_column_names_the_problem():
    with pytest.raises(ValueError, match="`solution` \\(or `answer`\\) dataset column"):
        math_reward(["\\boxed{1}"], question=["q"])
    with pytest.raises(ValueError, match="'final' column"):
        math_verify_reward(gold_column="final")(["\\boxed{1}"], solution=["1"])


def test_format_reward_wants_a_balanced_nonempty_box():
    completions = ["so \\boxed{\\frac{1}{2}}.", "so \\boxed{}", "the answer is 2", "\\boxed{\\frac{1}{2}",
                   [{"role": "assistant", "content": "\\boxed {x^{2}}"}], "\\boxed{" * 20000]  # fmt: skip
    assert format_reward(completions) == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def test_completion_text_handles_strings_messages_and_content_blocks():
    assert completion_text("a") == "a"
    assert completion_text([{"role": "assistant", "content": "b"}]) == "b"
    blocks = [{"type": "text", "text": "c"}, {"type": "image"}]
    assert completion_text([{"role": "assistant", "content": blocks}]) == "c"
    assert completion_text(None) == ""


def test_reward_objects_pickle_and_keep_their_settings():
    reward = math_verify_reward("gsm8k", timeout=2.5, name="my_gsm8k")
    clone = pickle.loads(pickle.dumps(reward))
    assert isinstance(clone, MathVerifyReward) and clone.__name__ == "my_gsm8k" and clone.timeout == 2.5
    assert clone(["A: 7"], solution=["#### 7"]) == [1.0]
    assert pickle.loads(pickle.dumps(math_reward)) is math_reward  # module-level functions pickle by reference


def test_bad_extraction_presets_are_rejected():
    with pytest.raises(ValueError, match="not a preset"):
        math_verify_reward("boxed")
    with pytest.raises(ValueError, match="timeout must be > 0"):
        math_verify_reward(timeout=0)


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_timeouts_are_refused_because_a_reward_must_have_a_deadline(timeout):
    # nan used to be accepted and grade every answer 0; inf crashed the first call with OverflowError.
    with pytest.raises(ValueError, match="timeout must be a finite number of seconds"):
        math_verify_reward(timeout=timeout)
    with VerifierPool("time:sleep", num_workers=1) as pool, pytest.raises(ValueError, match="finite"):
        pool.map([(0.0,)], timeout=timeout)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"timeout": None}, TypeError, "timeout must be a number of seconds"),
        ({"timeout": "5"}, TypeError, "timeout must be a number of seconds"),
        ({"timeout": True}, TypeError, "timeout must be a number of seconds"),
        ({"timeout": 10**6}, ValueError, "<= 86400 seconds"),  # epoll's timeout overflows at ~24 days
        ({"num_workers": 0}, ValueError, "num_workers must be >= 1"),  # was silently the default
        ({"num_workers": -2}, ValueError, "num_workers must be >= 1"),
        ({"num_workers": 1.5}, TypeError, "num_workers must be an integer"),
        ({"num_workers": True}, TypeError, "num_workers must be an integer"),
        ({"max_memory_mb": -1}, ValueError, "max_memory_mb must be >= 0"),
        ({"max_memory_mb": 512.5}, TypeError, "max_memory_mb must be an integer"),
        ({"max_memory_mb": "4096"}, TypeError, "max_memory_mb must be an integer"),
    ],
)
def test_bad_reward_settings_are_refused_at_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        math_verify_reward(**kwargs)


def test_pool_refuses_zero_workers_and_negative_memory_limits():
    with pytest.raises(ValueError, match="num_workers must be >= 1"):
        VerifierPool("time:sleep", num_workers=0)
    with pytest.raises(ValueError, match="max_memory_mb must be >= 0"):
        VerifierPool("time:sleep", max_memory_mb=-5)


def test_workers_out_of_memory_at_startup_name_max_memory_mb_not_the_installation():
    # 40 MiB of address space is too little to import math-verify: the workers die while starting.
    reward = math_verify_reward(max_memory_mb=40, num_workers=1)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"out of memory during start-up.*max_memory_mb=40") as info:
        reward(["\\boxed{1}"], solution=["1"])
    assert "can import trl_credit" not in str(info.value)
    assert time.monotonic() - start < 60  # reported at the first failure, not after retries
    assert math_verify_reward(max_memory_mb=0, num_workers=1)(["\\boxed{1}"], solution=["1"]) == [1.0]


def test_score_reports_progress_as_completions_are_graded():
    reward = math_verify_reward("math", num_workers=1)
    done = []
    verdicts = reward.score(["\\boxed{1}", "\\boxed{2}", "no answer"] * 5, ["1"] * 15, on_done=done.append)
    assert len(verdicts) == 15 and sum(done) == 15 and all(n > 0 for n in done)



def test_score_sends_a_groups_completions_keyed_by_their_gold_answer(monkeypatch):
    """docs/rewards.md detail 6: items are keyed by gold so a worker reuses the gold it parsed (real pool, spied)."""
    seen = []
    original = VerifierPool.map

    def spy(self, args_list, *args, keys=None, **kwargs):
        seen.append(keys)
        return original(self, args_list, *args, keys=keys, **kwargs)

    monkeypatch.setattr(VerifierPool, "map", spy)
    reward = math_verify_reward("math", num_workers=2)
    verdicts = reward.score(["\\boxed{1}", "\\boxed{2}", "\\boxed{2}", "x"], ["1", "1", "2", None])
    assert seen == [["1", "1", "2", ""]]
    assert [v.reward for v in verdicts] == [1.0, 0.0, 1.0, None]  # no gold: unscorable

# ── what reward functions return ───────────────────────────────────────────────────────────────────────────────────
def test_reward_outputs_that_are_numbers_or_none_pass_through_as_floats():
    import numpy as np
    import torch

    assert check_reward_output([1, 0.5, True, None], "r") == [1.0, 0.5, 1.0, None]
    assert check_reward_output((np.float32(0.25), np.int64(2), np.bool_(False)), "r") == [0.25, 2.0, 0.0]
    assert check_reward_output(torch.tensor([0.5, 1.0]), "r", num_completions=2) == [0.5, 1.0]
    assert check_reward_output(np.array([1.0, 2.0]), "r") == [1.0, 2.0]
    assert check_reward_output((x for x in [1.0]), "r") == [1.0]  # any finite iterable
    assert check_reward_output([float("inf")], "r") == [float("inf")]  # non-finite: the trainer's rule, not this one


@pytest.mark.parametrize(
    "output, message",
    [
        (["1.0", "0.0"], r"'my_reward' returned str '1.0' for completion 0 \(a number written as a string: convert"),
        ([1.0, "correct"], r"'my_reward' returned str 'correct' for completion 1; a reward function must return one "),
        ([1.0, [0.5]], r"returned list \[0.5\] for completion 1"),
        ([1j], r"returned complex 1j for completion 0"),
        ([{"score": 1}], r"returned dict \{'score': 1\} for completion 0"),
        (None, r"'my_reward' returned NoneType None instead of a list"),
        (1.0, r"returned float 1.0 instead of a list"),
        ("1.0", r"returned str '1.0' instead of a list"),
        ([[1.0, 0.0]], r"returned list \[1.0, 0.0\] for completion 0"),
    ],
)
def test_reward_outputs_that_are_not_numbers_name_the_function_the_completion_and_the_value(output, message):
    with pytest.raises(TypeError, match=message):
        check_reward_output(output, "my_reward")


def test_reward_output_arrays_must_be_one_dimensional_and_one_per_completion():
    import numpy as np
    import torch

    with pytest.raises(TypeError, match=r"array of shape \(2, 1\)"):
        check_reward_output(torch.zeros(2, 1), "r")
    with pytest.raises(TypeError, match=r"array of shape \(\)"):
        check_reward_output(np.array(1.0), "r")
    with pytest.raises(ValueError, match="'r' returned 1 rewards for 2 completions"):
        check_reward_output([1.0], "r", num_completions=2)
    with pytest.raises(TypeError, match=r"returned str_ np.str_\('a'\) for completion 0"):
        check_reward_output(np.array(["a"]), "r")


def test_checked_wrappers_keep_sync_async_and_reward_models_apart():
    import asyncio

    import torch
    from trl.trainer.utils import is_async_callable

    def sync_reward(completions, **kwargs):
        return ["1"] * len(completions)

    async def async_reward(completions, **kwargs):
        return ["1"] * len(completions)

    model = torch.nn.Linear(1, 1)
    checked = checked_reward_funcs([sync_reward, async_reward, model], ["sync_reward", "async_reward", "model"])
    assert checked[2] is model  # TRL reads a reward model's logits itself
    assert not is_async_callable(checked[0]) and is_async_callable(checked[1])  # TRL dispatches on this
    with pytest.raises(TypeError, match="'sync_reward' returned str '1' for completion 0"):
        checked[0](completions=["a"])
    with pytest.raises(TypeError, match="'async_reward' returned str '1' for completion 0"):
        asyncio.run(checked[1](completions=["a"]))


@pytest.mark.slow
def test_grpo_trainer_names_a_reward_function_that_returns_strings(tiny_model_dir, tmp_path):
    # TRL alone fails inside torch.tensor with "too many dimensions 'str'", naming neither the function nor the value.
    from trl_credit import GRPOConfig, GRPOTrainer
    from trl_credit.testing import tiny_math_dataset

    def string_reward(completions, **kwargs):
        return ["1.0" for _ in completions]

    args = GRPOConfig(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, num_generations=4,
        max_completion_length=4, report_to="none", use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = GRPOTrainer(model=tiny_model_dir, reward_funcs=[format_reward, string_reward], args=args,
                          train_dataset=tiny_math_dataset(4))  # fmt: skip
    with pytest.raises(TypeError, match=r"'string_reward' returned str '1.0' for completion 0"):
        trainer.train()
    assert trainer.reward_funcs[1] is string_reward  # the wrappers exist only during the call


# ── never hang, never crash ────────────────────────────────────────────────────────────────────────────────────────
def _adversarial_strings(n=500, seed=0):
    rng = random.Random(seed)
    alphabet = "0123456789+-*/^_{}()[]\\$=., abcxyz\n" + "".join(chr(c) for c in range(0x370, 0x3A0))
    tokens = ["\\boxed{", "\\frac{", "}", "{", "$", "$$", "\\left(", "\\right)", "\\sqrt{", "^{", "\\dfrac{", "9" * 50]
    strings = list(PATHOLOGICAL)
    strings += ["9" * 100_000, "\\boxed{" + "9" * 5000 + "}", "$" * 100_000, "\\boxed{" * 14_000, "{" * 100_000]
    strings += [" ".join(rng.choice(["the", "answer", "is", "$x$", "=", "42", "\\boxed{"]) for _ in range(20_000))]
    strings += ["\\boxed{\\frac{1}{2" * 1000, "}" * 50_000 + "\\boxed{3}", "\x00\xff\ud7ff" * 1000, ""]
    while len(strings) < n:
        kind = rng.random()
        if kind < 0.45:
            s = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 300)))
        elif kind < 0.9:
            s = "".join(rng.choice(tokens) for _ in range(rng.randint(1, 60)))
        else:  # nested fractions: from a few levels to past what math-verify parses within the deadline
            depth = rng.randint(1, 60)
            s = "\\boxed{" + "\\frac{" * depth + "1" + "}{2}" * rng.randint(0, depth) + "}"
        strings.append(s)
    return strings[:n]


def test_500_adversarial_strings_return_within_the_deadline_without_exception():
    reward = math_verify_reward("math", timeout=1.0, num_workers=2)
    reward(["\\boxed{1}"], solution=["1"])  # start the workers outside the timing
    strings = _adversarial_strings()
    assert len(strings) == 500 and max(len(s) for s in strings) >= 100_000
    start = time.monotonic()
    verdicts = reward.score(strings, ["3"] * len(strings))
    elapsed = time.monotonic() - start
    statuses = {v.status for v in verdicts}
    print(f"500 adversarial strings: {elapsed:.1f} s, statuses {sorted(statuses)}, {reward.counts}")
    assert len(verdicts) == 500
    assert statuses <= {"correct", "wrong", "no_answer", "timeout", "error"}
    assert all(v.reward in (0.0, 1.0) for v in verdicts)
    # Every item is bounded by the 1 s deadline: the whole batch fits in (timed-out items x 1 s) / 2 workers plus the
    # normal work (the fast items take ~2 ms each).
    timeouts = sum(v.status == "timeout" for v in verdicts)
    assert elapsed < timeouts * 1.0 / 2 + 60


@pytest.mark.parametrize("text", PATHOLOGICAL, ids=["math-verify-65", "power-tower", "nested-powers", "deep-braces"])
def test_pathological_completion_is_cut_at_the_deadline(text):
    reward = math_verify_reward("math", timeout=1.0, num_workers=2)
    reward(["\\boxed{1}"], solution=["1"])
    start = time.monotonic()
    [verdict] = reward.score([text], ["3"])
    assert time.monotonic() - start < 1.0 + SLACK_S
    assert verdict.reward == 0.0 and verdict.status in ("timeout", "wrong")


def test_reward_called_from_worker_threads_still_enforces_the_deadline():
    reward = math_verify_reward("math", timeout=1.0, num_workers=2)
    results, errors = {}, []

    def call(name, texts):
        try:
            start = time.monotonic()
            results[name] = (reward.score(texts, ["3"] * len(texts)), time.monotonic() - start)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    # math-verify's own timeouts raise "signal only works in main thread" here (Math-Verify#55, trl#5281).
    threads = [threading.Thread(target=call, args=("hang", [PATHOLOGICAL[3]])),
               threading.Thread(target=call, args=("normal", ["\\boxed{3}", "\\boxed{4}"]))]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    [hung], hang_s = results["hang"]
    assert hung.status == "timeout" and hang_s < 1.0 + SLACK_S + 3.0  # + start-up of the pool's workers
    assert [v.reward for v in results["normal"][0]] == [1.0, 0.0]


def test_pool_kills_an_item_stuck_past_the_hard_deadline_and_keeps_going():
    # No soft deadline: the worker never ends the item itself, exactly like code stuck in C.
    with VerifierPool("time:sleep", num_workers=2, soft_deadline=False) as pool:
        pool.map([(0.0,)], timeout=5.0)
        start = time.monotonic()
        results = pool.map([(30.0,), (0.01,), (0.01,), (0.01,)], timeout=0.5)
        assert time.monotonic() - start < 0.5 + SLACK_S
        assert [status for status, _ in results] == ["timeout", "ok", "ok", "ok"]
        assert pool.stats["restarts"] == 1 and pool.stats["timeouts"] == 1
        assert [status for status, _ in pool.map([(0.01,)] * 4, timeout=5.0)] == ["ok"] * 4


def test_pool_survives_workers_that_crash_or_are_killed():
    with VerifierPool("os:_exit", num_workers=1) as pool:
        assert pool.map([(3,), (3,)], timeout=5.0) == [("error", "verification worker died")] * 2
        assert pool.stats["restarts"] == 2
    with VerifierPool("time:sleep", num_workers=2) as pool:
        pool.map([(0.0,)] * 2, timeout=5.0)
        for worker in pool._workers:
            os.kill(worker.proc.pid, signal.SIGKILL)
            worker.proc.wait()
        assert pool.map([(0.0,)] * 4, timeout=5.0) == [("ok", None)] * 4


def test_pool_gives_a_worker_the_key_it_had_and_an_idle_worker_a_key_nobody_is_on():
    pending = _Pending(["a", "a", "b", "b", "c"])
    assert pending.pop(last_key=None, busy_keys=set()) == 0  # first item
    assert pending.pop(last_key=None, busy_keys={"a"}) == 2  # another worker is on "a": start "b"
    assert pending.pop(last_key="a", busy_keys={"b"}) == 1  # stay on "a"
    assert pending.pop(last_key="a", busy_keys={"b"}) == 4  # "a" done, "b" taken: "c"
    assert pending.pop(last_key="c", busy_keys={"b"}) == 3  # only "b" is left: share it
    assert len(pending) == 0
    pending.push_front(3)  # a requeued item comes back first
    assert len(pending) == 1 and pending.pop(last_key=None, busy_keys=set()) == 3
