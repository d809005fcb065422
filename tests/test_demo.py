"""`trl-credit demo`: the embedded task and its reward, error injection, credit diagnostics, and the CLI end to end."""

import json
import math
import random
import struct

import pytest
import torch

from trl_credit.credit import compute_grpo_advantages
from trl_credit.demo.rl import CreditStats, accumulate, batch_credit
from trl_credit.demo.sft import SFTSettings, load_or_train, policy_stats
from trl_credit.demo.task import (
    ChainSpec,
    analyze,
    build_tokenizer,
    chain_lines,
    chain_reward,
    demonstration,
    gold_completion,
    make_splits,
    parse_prompt,
    prompt_text,
    sample_terms,
)


# ── the task and its reward ────────────────────────────────────────────────────────────────────────────────────────
def test_gold_completion_is_the_running_sum_chain_of_the_issue():
    assert prompt_text([3, 5, 9, 2]) == "3+5+9+2\n"
    assert gold_completion([3, 5, 9, 2]) == "3+5=8\n8+9=17\n17+2=19\n#19"
    assert parse_prompt("3+5+9+2\n") == [3, 5, 9, 2]
    assert chain_lines([3, 5, 9, 2], results=[8, 16, 18]) == ["3+5=8", "8+9=16", "16+2=18", "#18"]


@pytest.mark.parametrize(
    "completion, reward",
    [
        ("3+5=8\n8+9=17\n17+2=19\n#19", 1.0),
        ("#19", 1.0),  # the reward checks the outcome only
        ("3+5=8\n8+9=16\n16+2=18\n#18", 0.0),  # slip carried forward: every later line consistent, answer wrong
        ("3+5=8\n8+9=16\n16+2=19\n#19", 1.0),  # two slips that cancel still give the right final number
        ("3+5=8\n8+9=17\n17+2=19\n#190", 0.0),
        ("3+5=8\n8+9=17\n17+2=19\n# 19", 0.0),
        ("3+5=8\n8+9=17\n17+2=19", 0.0),  # no answer line
        ("3+5=8\n8+9=17\n17+2=19\n#19\n", 1.0),  # a trailing newline is not a line
        ("#19\n17+2=19", 0.0),  # the answer must be the last line
        ("", 0.0),
    ],
)
def test_reward_is_one_iff_the_last_line_is_the_true_sum(completion, reward):
    assert chain_reward([completion], answer=[19]) == [reward]
    # TRL hands conversational completions as message lists
    assert chain_reward([[{"role": "assistant", "content": completion}]], answer=[19]) == [reward]


def test_reward_of_gold_is_one_and_of_any_other_final_number_zero_on_random_problems():
    rng = random.Random(0)
    spec = ChainSpec(2, 8)
    for _ in range(300):
        terms = sample_terms(rng, spec)
        gold = gold_completion(terms)
        wrong = gold.rsplit("#", 1)[0] + f"#{sum(terms) + rng.choice([-11, -1, 1, 2, 10])}"
        assert chain_reward([gold, wrong], answer=[sum(terms)] * 2) == [1.0, 0.0]


def test_analysis_points_at_the_first_wrong_token_and_line():
    terms = [3, 5, 9, 2]
    right = analyze(terms, "3+5=8\n8+9=17\n17+2=19\n#19")
    assert right.correct and right.first_error_char is None and right.step_errors == 0 and right.steps_judged == 3
    slip = analyze(terms, "3+5=8\n8+9=16\n16+2=18\n#18")
    assert "3+5=8\n8+9=16"[slip.first_error_char] == "6" and slip.first_error_char == 11
    assert slip.first_error_step == 1 and slip.step_errors == 1  # carried forward consistently: one error
    copy = analyze(terms, "3+5=8\n8+7=15\n15+2=17\n#17")  # wrong operand: a step error too
    assert copy.first_error_char == 8 and copy.step_errors == 1
    cut = analyze(terms, "3+5=8\n8+9=")
    assert cut.first_error_char == 10 and cut.step_errors == 1 and cut.steps_judged == 2


def test_tokenizer_is_one_token_per_character_and_round_trips():
    tok = build_tokenizer()
    text = "3+5+9+2\n3+5=8\n8+9=17\n17+2=19\n#19"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text
    assert tok.convert_ids_to_tokens(ids)[7] == "\n"


def test_splits_are_disjoint_reproducible_and_evaluation_comes_first():
    spec = ChainSpec()
    a = make_splits(spec, 300, 50, 60, seed=0)
    b = make_splits(spec, 300, 50, 60, seed=0)
    assert a.evaluation == b.evaluation and a.train == b.train
    keys = [{tuple(t) for t in s} for s in (a.train, a.validation, a.evaluation)]
    assert len(keys[0]) == 300 and not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    # a larger evaluation set extends the smaller one (quick and default modes share their first problems)
    assert make_splits(spec, 10, 10, 120, seed=0).evaluation[:60] == a.evaluation


# ── the starting policy's demonstrations ───────────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3])
def test_injected_step_error_rate_matches_the_setting(rate):
    rng = random.Random(1)
    spec = ChainSpec()
    slips = additions = 0
    for _ in range(3000):
        terms = sample_terms(rng, spec)
        _, errors = demonstration(terms, rate, rng)
        slips += len(errors)
        additions += len(terms) - 1
    # ~15 000 additions: the binomial std of the rate is ≤ 0.004; allow 4 std.
    assert abs(slips / additions - rate) < 0.016


def test_injected_errors_are_carried_forward_and_always_doom_the_answer():
    rng = random.Random(2)
    spec = ChainSpec(2, 8)
    seen_wrong = 0
    for _ in range(2000):
        terms = sample_terms(rng, spec)
        text, errors = demonstration(terms, 0.4, rng)
        a = analyze(terms, text)
        assert a.step_errors == len(errors)  # every later line adds to the written value: no extra error
        assert a.correct == (not errors)  # a later slip never cancels an earlier one
        if errors:
            seen_wrong += 1
            assert a.first_error_step == errors[0]
            lines = text.split("\n")
            for prev, line in zip(lines, lines[1:-1]):
                assert line.split("+")[0] == prev.split("=")[1]  # the next step starts from the written result
    assert seen_wrong > 500


def test_policy_stats_count_accuracy_and_step_errors():
    problems = [[3, 5, 9, 2], [1, 1]]
    completions = [["3+5=8\n8+9=17\n17+2=19\n#19", "3+5=8\n8+9=16\n16+2=18\n#18"], ["1+1=2\n#2", "1+1=3\n#3"]]
    stats = policy_stats(problems, completions)
    assert stats["accuracy"] == 0.5
    assert stats["step_error_rate"] == pytest.approx(2 / 8)
    assert stats["off_gold_rate"] == 0.5


def test_starting_policy_is_cached_under_a_key_of_its_settings(tmp_path):
    settings = SFTSettings(spec=ChainSpec(2, 3), steps=2, batch_size=4)
    assert settings.key() != SFTSettings(spec=ChainSpec(2, 3), steps=2, batch_size=4, error_rate=0.2).key()
    assert settings.key() != SFTSettings(spec=ChainSpec(2, 4), steps=2, batch_size=4).key()
    path, info = load_or_train(settings, tmp_path, progress=False)
    assert not info["cached"]
    again, info2 = load_or_train(settings, tmp_path, progress=False)
    assert again == path and info2["cached"]


# ── credit diagnostics ─────────────────────────────────────────────────────────────────────────────────────────────
def _batch(tok, texts):
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    T = max(map(len, ids))
    completion_ids = torch.full((len(ids), T), tok.pad_token_id)
    mask = torch.zeros(len(ids), T, dtype=torch.long)
    for i, row in enumerate(ids):
        completion_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return completion_ids, mask


def test_negative_credit_is_split_at_the_first_wrong_token_and_line():
    tok = build_tokenizer()
    prompts = [prompt_text([3, 5, 9, 2])] * 2
    right, slip = "3+5=8\n8+9=17\n17+2=19\n#19", "3+5=8\n8+9=16\n16+2=18\n#18"
    ids, mask = _batch(tok, [right, slip])
    # GRPO: one advantage per completion (TRL's formula on rewards 1, 0), broadcast over its tokens
    grpo = compute_grpo_advantages(torch.tensor([1.0, 0.0]), 2)
    rows = batch_credit(tok, prompts, ids, mask, grpo, num_generations=2)
    assert rows[1]["first_error_token"] == 11 and rows[1]["first_error_step_token"] == 6
    assert rows[0]["grpo_advantage"] > 0 > rows[1]["grpo_advantage"]
    stats = CreditStats()
    accumulate(stats, rows)
    n = len(slip) + 1  # + EOS
    d = stats.as_dict()
    assert d["neg_share_after_first_error_token"] == pytest.approx((n - 11) / n)
    assert d["neg_share_after_first_error_step"] == pytest.approx((n - 6) / n)
    assert d["extra_credit_token_frac"] == 0.0  # the GRPO advantage itself
    # all the negative credit on the slip token: share 1, and only one token differs from GRPO's advantage
    token_level = torch.zeros(2, ids.shape[1])
    token_level[1, 11] = -1.0
    token_level[0, : len(right) + 1] = rows[0]["grpo_advantage"]
    stats = CreditStats()
    accumulate(stats, batch_credit(tok, prompts, ids, mask, token_level, num_generations=2))
    d = stats.as_dict()
    assert d["neg_share_after_first_error_token"] == 1.0 and d["neg_share_after_first_error_step"] == 1.0
    # the slip row differs from its GRPO advantage on every token, the right row on none
    assert len(right) == len(slip) and d["extra_credit_token_frac"] == 0.5


@pytest.mark.slow
def test_replayed_completions_get_exactly_the_trainers_tempo_credit(tmp_path):
    """The credit map replays fixed completions through the trainer: the result is TEMPO on that very batch."""
    from trl_credit.credit import compute_tempo_advantages
    from trl_credit.demo.rl import PRESETS, RLSettings, build_config, demo_trainer_class, trainer_classes
    from trl_credit.demo.sft import build_model
    from trl_credit.demo.task import chain_reward, load_tokenizer, rl_dataset

    tok = build_tokenizer()
    model_dir = tmp_path / "policy"
    build_model(SFTSettings(), tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    tok = load_tokenizer(str(model_dir))
    settings = RLSettings(steps=1, num_generations=4, prompts_per_step=1)
    args = build_config(PRESETS["tempo"], settings, output_dir=str(tmp_path / "out"), seed=0,
                        max_completion_length=40)  # fmt: skip
    trainer = demo_trainer_class(trainer_classes(PRESETS["tempo"])[1])(
        model=str(model_dir), reward_funcs=chain_reward, args=args, train_dataset=rl_dataset([[3, 5, 9, 2]]),
        processing_class=tok,
    )  # fmt: skip
    texts = ["3+5=8\n8+9=17\n17+2=19\n#19", "3+5=8\n8+9=16\n16+2=18\n#18", "3+5=8\n8+9=17\n17+2=19\n#19", "3+5=9"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    out = trainer.credit_of([prompt_text([3, 5, 9, 2])] * 4, [19] * 4, ids)
    assert out["completion_ids"][1, : len(ids[1])].tolist() == ids[1]  # the forced completions, not samples
    rewards = torch.tensor(chain_reward(texts, answer=[19] * 4))
    expected = compute_tempo_advantages(out["completion_ids"], out["completion_mask"], rewards, 4)
    assert (expected[:, 1:] != expected[:, :1]).any()  # token-level credit, not one number per row
    torch.testing.assert_close(out["advantages"], expected.to(out["advantages"].dtype))


def test_credit_statistics_count_only_trained_tokens_and_report_the_trained_share():
    # SPO's probability mask: tokens outside the loss mask are not trained; their advantage 0 is no credit, so it
    # must not count as "extra credit" against GRPO's advantage, nor as a zero in the mean |A|.
    tok = build_tokenizer()
    prompts = [prompt_text([3, 5, 9, 2])] * 2
    right, slip = "3+5=8\n8+9=17\n17+2=19\n#19", "3+5=8\n8+9=16\n16+2=18\n#18"
    ids, mask = _batch(tok, [right, slip])
    loss_mask = torch.zeros(ids.shape)
    loss_mask[0, 4] = loss_mask[1, 11] = 1.0  # one trained (cutpoint) token per row: the right `8`, the slip `6`
    advantages = torch.zeros(ids.shape)
    advantages[0, 4], advantages[1, 11] = 0.5, -2.0
    rows = batch_credit(tok, prompts, ids, mask, advantages, num_generations=2, loss_mask=loss_mask)
    assert rows[1]["trained"] == [int(t == 11) for t in range(len(slip) + 1)]
    stats = CreditStats()
    accumulate(stats, rows)
    d = stats.as_dict()
    assert d["trained_token_frac"] == pytest.approx(2 / (2 * (len(slip) + 1)))
    assert d["extra_credit_token_frac"] == 1.0  # both trained tokens differ from GRPO's ±0.71; the rest is not credit
    assert d["mean_abs_advantage"] == pytest.approx(1.25) and d["zero_advantage_token_frac"] == 0.0
    assert d["neg_share_after_first_error_token"] == 1.0
    # without a loss mask every real token is trained, as before
    plain = batch_credit(tok, prompts, ids, mask, advantages, num_generations=2)
    assert all(all(r["trained"]) for r in plain)


def test_credit_map_draws_tokens_outside_the_loss_mask_grey_as_not_trained_not_white_as_zero(tmp_path):
    from trl_credit.demo.report import NOT_TRAINED_NOTE, credit_panels
    from trl_credit.viz import credit_map_html

    prompt = prompt_text([3, 5, 9, 2])
    text = "3+5=8\n8+9=16\n16+2=18\n#18"
    analysis = {"first_error_step": 1}
    n = len(text) + 1
    base = {"prompt": prompt, "text": text, "reward": 0.0, "analysis": analysis, "first_error_token": 11}
    masked = [{**base, "advantages": [0.0] * 11 + [-1.0] + [0.0] * (n - 12),
               "trained": [0] * 11 + [1] + [0] * (n - 12)}]  # fmt: skip
    plain = [{**base, "advantages": [-0.5] * n}]  # no "trained" field: results.json of older runs, every token trained
    runs = [{"seed": 0, "credit": {"neg_share_after_first_error_step": 1.0}}]
    results = {"estimators": {"grpo": {"label": "GRPO", "probe": plain, "runs": runs},
                              "spo_chain": {"label": "SPO-chain", "probe": masked, "runs": runs}}}  # fmt: skip
    panels, notes = credit_panels(results)
    spo = panels["SPO-chain"][0].advantages
    assert spo[11] == -1.0 and all(math.isnan(a) for i, a in enumerate(spo) if i != 11)
    assert not any(math.isnan(a) for a in panels["GRPO"][0].advantages)
    assert NOT_TRAINED_NOTE in notes["SPO-chain"] and NOT_TRAINED_NOTE not in notes["GRPO"]
    html = credit_map_html(panels, notes=notes)
    assert "not trained (no advantage)" in html and "A=-1.0000" in html and "A=+nan" not in html


def test_spo_tree_credit_map_shows_its_own_tree_samples_selected_from_its_own_rows():
    from trl_credit.demo.report import credit_panels

    prompt = prompt_text([3, 5, 9, 2])

    def row(text, reward, own=False):
        n = len(text) + 1
        return {"prompt": prompt, "text": text, "reward": reward, "analysis": {"first_error_step": 1},
                "first_error_token": None if reward else 11, "advantages": [0.1] * n, "trained": [1] * n,
                "own_samples": own}  # fmt: skip

    right, slip, other = "3+5=8\n8+9=17\n17+2=19\n#19", "3+5=8\n8+9=16\n16+2=18\n#18", "3+5=9\n9+9=18\n18+2=20\n#20"
    runs = [{"seed": 0, "credit": {"neg_share_after_first_error_step": 0.5}}]
    results = {"estimators": {
        "grpo": {"label": "GRPO", "probe": [row(right, 1.0), row(slip, 0.0)], "runs": runs},
        "spo_tree": {"label": "SPO-tree", "probe": [row(other, 0.0, True), row(right, 1.0, True)], "runs": runs},
    }}  # fmt: skip
    panels, notes = credit_panels(results)
    assert [r.tokens[:5] for r in panels["SPO-tree"]] == [list("3+5=8"), list("3+5=9")]  # its rows, right first
    assert "its own tree samples" in notes["SPO-tree"] and "own tree" not in notes["GRPO"]


@pytest.mark.parametrize("G, shape", [(4, [2, 2]), (8, [2, 4]), (2, [2]), (3, [3])])
def test_spo_tree_preset_shape_has_one_leaf_per_generation_for_any_group_size(tmp_path, G, shape):
    from trl_credit.demo.rl import PRESETS, RLSettings, build_config

    settings = RLSettings(num_generations=G, prompts_per_step=2)
    args = build_config(PRESETS["spo_tree"], settings, output_dir=str(tmp_path), seed=0, max_completion_length=56)
    assert args.spo_tree_shape == shape and math.prod(shape) == G
    assert PRESETS["spo_tree"].fields(settings)["spo_tree_shape"] == shape  # what the report records


@pytest.mark.parametrize("name", ["grpo", "tempo", "gigpo", "vineppo", "ppo", "tempo+rhythm", "spo_chain", "spo_tree"])
def test_every_preset_builds_its_config_with_the_demo_settings(tmp_path, name):
    from trl_credit.demo.rl import PRESETS, RLSettings, build_config

    assert name in PRESETS
    args = build_config(PRESETS[name], RLSettings(), output_dir=str(tmp_path), seed=0,
                        max_completion_length=ChainSpec().max_completion_chars + 1)  # fmt: skip
    for key, value in PRESETS[name].config.items():
        assert getattr(args, key) == value, key


def test_presets_are_exactly_the_tested_ones():
    from trl_credit.demo.rl import PRESETS

    assert list(PRESETS) == ["grpo", "tempo", "gigpo", "vineppo", "ppo", "tempo+rhythm", "spo_chain", "spo_tree"]


@pytest.fixture(scope="module")
def briefly_trained_policy(tmp_path_factory):
    """A starting policy after 100 SFT steps (≈ 15 s): it writes the format with confident tokens and uncertain
    digits, so SPO's probability mask keeps some tokens and drops others (an untrained model is uncertain everywhere:
    every token would be a cutpoint)."""
    path, _ = load_or_train(SFTSettings(steps=100), tmp_path_factory.mktemp("sft100"), progress=False)
    return path


def parity_reward(completions, **kwargs):
    """Mixed rewards in every group (the brief policy solves almost nothing): 1 for an even-length completion."""
    return [float(len(c) % 2 == 0) for c in completions]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["spo_chain", "spo_tree"])
def test_spo_preset_trains_a_step_and_its_credit_map_marks_the_untrained_tokens(briefly_trained_policy, tmp_path,
                                                                                 name):  # fmt: skip
    """One real training step of the preset's trainer, then the credit-map probe through its own pipeline: the
    advantages are 0 exactly where the loss mask (the probability mask) is 0, and the rows say which tokens train."""
    from trl_credit.demo.rl import (
        PRESETS, CreditStats, RLSettings, batch_credit, build_config, demo_trainer_class, loss_mask_of,
        samples_own_group, trainer_classes,
    )  # fmt: skip
    from trl_credit.demo.task import load_tokenizer, rl_dataset

    tok = load_tokenizer(briefly_trained_policy)
    settings = RLSettings(steps=1, num_generations=4, prompts_per_step=2)
    max_len = ChainSpec().max_completion_chars + 1
    args = build_config(PRESETS[name], settings, output_dir=str(tmp_path / "out"), seed=0,
                        max_completion_length=max_len)  # fmt: skip
    trainer = demo_trainer_class(trainer_classes(PRESETS[name])[1])(
        model=briefly_trained_policy, reward_funcs=parity_reward, args=args,
        train_dataset=rl_dataset([[3, 5, 9, 2], [4, 6, 1, 7, 2]]), processing_class=tok,
    )  # fmt: skip
    trainer.demo_stats = CreditStats()
    trainer.train()
    stats = trainer.demo_stats
    assert trainer.state.global_step == 1 and stats.completions == 8
    assert 0 < stats.trained_tokens < stats.tokens  # the probability mask trained a subset of the tokens
    assert samples_own_group(trainer) == (name == "spo_tree")
    texts = ["3+5=8\n8+9=17\n17+2=19\n#19", "3+5=8\n8+9=16\n16+2=18\n#18", "3+5=8\n8+9=17\n17+2=19\n#19",
             "3+5=9"]  # fmt: skip
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    prompts = [prompt_text([3, 5, 9, 2])] * 4
    out = trainer.credit_of(prompts, [19] * 4, ids)
    if name == "spo_chain":
        assert out["completion_ids"][1, : len(ids[1])].tolist() == ids[1]  # the probe's completions, scored
    loss_mask = loss_mask_of(out)
    assert "tool_mask" in out and (loss_mask < out["completion_mask"]).any()
    assert (out["advantages"][loss_mask == 0] == 0).all()
    rows = batch_credit(tok, prompts, out["completion_ids"], out["completion_mask"], out["advantages"], 4, loss_mask)
    for i, row in enumerate(rows):
        n = len(row["trained"])
        assert row["trained"] == (loss_mask[i, :n] > 0).long().tolist()


# ── the command's arguments: checked before any work ──────────────────────────────────────────────────────────────
def test_demo_refuses_settings_every_estimator_rejects_before_training_anything(tmp_path, capsys):
    # --num-generations 1 used to train the starting policy for minutes, then skip every estimator and exit 0.
    from trl_credit.cli import main

    cache, out = tmp_path / "cache", tmp_path / "out"
    rc = main(["demo", "--num-generations", "1", "--cache-dir", str(cache), "--output-dir", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "rejected by the estimators' configs (nothing was run)" in err
    assert "grpo: ValueError: GRPO requires at least 2 generations" in err and "'num_generations': 1" in err
    assert not cache.exists() and not (out / "report.md").exists()  # no starting policy, no empty report


def test_demo_with_only_unavailable_estimators_exits_non_zero_before_training(tmp_path, capsys, monkeypatch):
    from trl_credit.cli import main
    from trl_credit.demo import rl

    # A preset whose estimator this installation does not have: it fails even with the default settings.
    monkeypatch.setitem(rl.PRESETS, "missing", rl.Preset("Missing", {"advantage_estimator": "no-such-estimator"}))
    cache = tmp_path / "cache"
    rc = main(["demo", "--estimators", "missing", "--cache-dir", str(cache), "--output-dir", str(tmp_path / "out"),
               "--no-progress"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 2 and "skipping missing (not available in this installation)" in captured.out
    assert "none of the requested estimators can run" in captured.err and not cache.exists()


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--learning-rate", "inf"], "argument --learning-rate: expected a learning rate > 0 (a finite number)"),
        (["--learning-rate", "0"], "argument --learning-rate: expected a learning rate > 0"),
        (["--error-rate", "1"], "argument --error-rate: expected a probability in [0, 1)"),
        (["--error-rate", "-0.1"], "argument --error-rate: expected a probability in [0, 1)"),
        (["--seeds", "0"], "argument --seeds: expected an integer >= 1"),
        (["--steps", "two"], "argument --steps: expected an integer >= 1"),
        (["--threads", "0"], "argument --threads: expected an integer >= 1 or 'auto'"),
        (["--threads", "many"], "argument --threads: expected an integer >= 1 or 'auto'"),
        (["--estimators", ","], "argument --estimators: unknown or no estimator(s)"),
        (["--estimators", "grpo,tempoo"], "unknown or no estimator(s) ['tempoo']"),
    ],
)
def test_demo_refuses_bad_flags_with_one_line_naming_the_flag(tmp_path, capsys, flags, expected):
    from trl_credit.cli import main

    with pytest.raises(SystemExit) as info:
        main(["demo", *flags, "--cache-dir", str(tmp_path / "c"), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("trl-credit demo: error: ") and expected in err.splitlines()[0]


def test_demo_refuses_an_output_dir_that_is_a_file(tmp_path, capsys):
    from trl_credit.cli import main

    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit):
        main(["demo", "--output-dir", str(tmp_path / "file"), "--cache-dir", str(tmp_path / "c")])
    assert "argument --output-dir: cannot create" in capsys.readouterr().err


# ── the plots ──────────────────────────────────────────────────────────────────────────────────────────────────────
def _fake_results(seeds: int):
    runs = [
        {"seed": s, "step_times": [1.0] * 40, "credit": {},
         "points": [{"step": k, "train_time_s": float(k), "accuracy": 0.6 + 0.005 * k + 0.01 * s,
                     "step_error_rate": 0.1} for k in range(0, 41, 5)]}
        for s in range(seeds)
    ]  # fmt: skip
    names = ("grpo", "tempo", "gigpo", "vineppo", "ppo", "tempo+rhythm")
    return {
        "settings": {"eval_samples": 1, "eval_problems": 128, "rl": {"temperature": 1.0}},
        "estimators": {n: {"label": n.upper(), "runs": runs} for n in names},
    }


@pytest.mark.parametrize("x_key", ["step", "train_time_s"])
def test_accuracy_plot_legend_sits_outside_the_axes_and_the_title_says_what_the_band_is(x_key):
    import matplotlib.pyplot as plt

    from trl_credit.demo.report import accuracy_figure

    one = accuracy_figure(_fake_results(1), x_key)
    title = one.axes[0].get_title()
    assert "±" not in title and "one seed per estimator" in title  # used to claim "mean ± std over seeds"
    one.canvas.draw()
    [legend] = one.legends
    assert one.axes[0].get_legend() is None
    assert not legend.get_window_extent().overlaps(one.axes[0].get_window_extent())  # hides no data point
    assert len(legend.get_texts()) == 6
    three = accuracy_figure(_fake_results(3), x_key)
    assert "mean ± std over 3 seeds" in three.axes[0].get_title()
    plt.close(one)
    plt.close(three)


# ── the command, end to end ────────────────────────────────────────────────────────────────────────────────────────
def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.mark.slow
def test_quick_demo_writes_report_plots_and_credit_maps_with_a_row_per_estimator(tmp_path):
    from PIL import Image

    from trl_credit.cli import main
    from trl_credit.demo.rl import PRESETS

    out = tmp_path / "out"
    # The --quick --seeds 1 path, shrunk for CI: a 30-step starting policy and 2 RL steps per estimator.
    rc = main(["demo", "--quick", "--seeds", "1", "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"),
               "--steps", "2", "--eval-every", "1", "--eval-problems", "16", "--sft-steps", "30", "--threads", "1",
               "--no-progress"])  # fmt: skip
    assert rc == 0
    for name in ("report.md", "accuracy_vs_step.png", "accuracy_vs_time.png", "credit_map.png", "credit_map.html",
                 "results.json"):  # fmt: skip
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in ("accuracy_vs_step.png", "accuracy_vs_time.png", "credit_map.png"):
        w, h = _png_size(out / name)
        assert w > 200 and h > 200
        with Image.open(out / name) as im:
            im.verify()
    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    html = (out / "credit_map.html").read_text()
    table = report.split("## Results")[1].split("\n\n")[1].splitlines()[2:]
    assert not results["failed"] and not results["unavailable"]
    assert [row.split(" | ")[0].lstrip("| ") for row in table] == [p.label for p in PRESETS.values()]
    for name, preset in PRESETS.items():
        runs = results["estimators"][name]["runs"]
        assert len(runs) == 1 and [p["step"] for p in runs[0]["points"]] == [0, 1, 2]
        assert len(runs[0]["step_times"]) == 2
        assert results["estimators"][name]["probe"], name  # every estimator scored the same probe completions
        assert f"<h2>{preset.label}</h2>" in html
    # every estimator scored the same probe completions, except SPO-tree, which samples its group as a tree: its own
    # samples of the same prompts
    probes = {n: results["estimators"][n]["probe"] for n in PRESETS}
    fixed = [[r["text"] for r in probe] for n, probe in probes.items() if n != "spo_tree"]
    assert all(p == fixed[0] for p in fixed)
    assert [r["prompt"] for r in probes["spo_tree"]] == [r["prompt"] for r in probes["grpo"]]
    assert all(r["own_samples"] for r in probes["spo_tree"]) and not any(r["own_samples"] for r in probes["grpo"])
    # which tokens train is recorded per row, and an untrained token carries no advantage (with this 30-step policy,
    # uncertain everywhere, SPO-chain trains every token and SPO-tree, all rewards 0, none; the 100-step policy test
    # above checks a mask that keeps some tokens)
    untrained = False
    for n in ("spo_chain", "spo_tree"):
        for r in probes[n]:
            assert len(r["trained"]) == len(r["advantages"])
            assert all(a == 0 for a, t in zip(r["advantages"], r["trained"]) if not t)
            untrained |= not all(r["trained"])
        assert 0 <= runs_credit(results, n)["trained_token_frac"] <= 1
    assert "not trained (no advantage)" in html or not untrained


def runs_credit(results, name):
    return results["estimators"][name]["runs"][0]["credit"]


# ── trl-credit demo --real (SmolLM2-135M-Instruct, word problems, LoRA) ────────────────────────────────────────────
def _real_run_file(runs_dir, name, seed, key, accuracy):
    from trl_credit.demo.real import _write_json

    run = {"estimator": name, "seed": seed, "settings_key": key, "step_times": [2.0, 2.0], "probe": None,
           "credit": {"extra_credit_token_frac": 0.0, "mean_abs_advantage": 0.5, "zero_advantage_token_frac": 0.2,
                      "train_reward_mean": 0.3, "neg_share_after_first_error_token": float("nan"),
                      "neg_share_after_first_error_step": float("nan")},
           "points": [{"step": 0, "train_time_s": 0.0, "accuracy": 0.25, "step_error_rate": float("nan")},
                      {"step": 2, "train_time_s": 4.0, "accuracy": accuracy,
                       "step_error_rate": float("nan")}]}  # fmt: skip
    _write_json(runs_dir / f"{name}-seed{seed}.json", run)


def test_real_demo_report_aggregates_every_run_file_of_its_settings_and_counts_seeds_per_row(tmp_path):
    from trl_credit.demo.real import QUICK, RealSettings, aggregate, real_summary_table

    runs = tmp_path / "runs"
    runs.mkdir()
    key = QUICK.key()
    _real_run_file(runs, "grpo", 0, key, 0.5)
    _real_run_file(runs, "grpo", 1, key, 0.75)
    _real_run_file(runs, "tempo", 0, key, 0.5)
    _real_run_file(runs, "tempo", 1, RealSettings().key(), 1.0)  # other settings: never mixed in
    (runs / "vineppo-seed0.json").write_text('{"estimator": "vineppo", "settings_key": "' + key + '", "poi')  # killed
    results = aggregate(tmp_path, QUICK, {"accuracy": 0.25}, {"question": "q"}, tokenizer=None)
    assert {n: len(v["runs"]) for n, v in results["estimators"].items()} == {"grpo": 2, "tempo": 1}
    header, rows = real_summary_table(results)
    by_label = {r[0]: dict(zip(header, r)) for r in rows}
    assert by_label["GRPO"]["seeds"] == "2" and by_label["TEMPO"]["seeds"] == "1"
    assert by_label["GRPO"]["final acc. (%)"] == "62.5 ± 17.7"
    assert by_label["TEMPO"]["Δ final vs GRPO"] == "+0.0 (one seed: no noise estimate)"
    assert QUICK.key() != RealSettings().key()


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--tune"], "argument --tune: not available with --real"),
        (["--estimators", "grpo,gigpoo"], "unknown or no estimator(s) ['gigpoo'] for --real"),
        (["--threads", "none"], "argument --threads: expected an integer >= 1 or 'auto'"),
    ],
)
def test_real_demo_refuses_bad_flags_before_loading_the_model(tmp_path, capsys, flags, expected):
    from trl_credit.cli import main

    with pytest.raises(SystemExit) as info:
        main(["demo", "--real", *flags, "--output-dir", str(tmp_path / "o")])
    assert info.value.code == 2 and expected in capsys.readouterr().err


def test_real_demo_refuses_settings_the_configs_reject_before_loading_the_model(tmp_path, capsys):
    from trl_credit.cli import main

    out = tmp_path / "o"
    assert main(["demo", "--real", "--num-generations", "1", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "rejected by the estimators' configs (nothing was run)" in err
    assert "grpo: ValueError: GRPO requires at least 2 generations" in err and "'num_generations': 1" in err
    assert not (out / "start.json").exists() and not list((out / "runs").glob("*.json"))


@pytest.mark.real_model
def test_real_demo_smallest_size_end_to_end_then_skips_finished_runs_and_accumulates_seeds(smollm2_dir, tmp_path,
                                                                                           capsys):  # fmt: skip
    import re

    from trl_credit.cli import main

    out = tmp_path / "real"
    argv = ["demo", "--real", "--quick", "--steps", "1", "--eval-every", "1", "--eval-problems", "4",
            "--num-generations", "3", "--prompts-per-step", "1", "--max-completion-length", "40",
            "--estimators", "grpo,tempo", "--output-dir", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    files = sorted((out / "runs").glob("*.json"))
    assert [f.name for f in files] == ["grpo-seed0.json", "tempo-seed0.json"]
    results = json.loads((out / "results.json").read_text())
    assert 0.0 <= results["start"]["accuracy"] <= 1.0
    probe_text = []
    for name in ("grpo", "tempo"):
        (run,) = results["estimators"][name]["runs"]
        assert [p["step"] for p in run["points"]] == [0, 1]
        assert all(0.0 <= p["accuracy"] <= 1.0 for p in run["points"])
        assert len(run["step_times"]) == 1 and run["step_times"][0] > 0
        rows = results["estimators"][name]["probe"]
        assert rows and all(len(r["advantages"]) == len(r["ids"]) for r in rows)
        assert all(math.isfinite(a) for r in rows for a in r["advantages"])
        probe_text += [r["text"] for r in rows]
    # the credit map is over the model's real English answers, token by token
    wordy = [t for t in probe_text if len(re.findall(r"[A-Za-z]{2,}", t)) >= 5]
    assert len(wordy) >= 0.8 * len(probe_text), probe_text[:2]
    html = (out / "credit_map.html").read_text()
    words = set(re.findall(r"[A-Za-z]{4,}", probe_text[0]))
    assert words and sum(w in html for w in words) >= 0.8 * len(words)
    assert (out / "credit_map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "| GRPO | 1 |" in report and "| TEMPO | 1 |" in report and "![credit map](credit_map.png)" in report

    # a second invocation reruns nothing: same run files, untouched
    stamps = {f: f.stat().st_mtime_ns for f in files}
    capsys.readouterr()
    assert main(argv) == 0
    assert "2 run(s) already in" in capsys.readouterr().out
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    # more seeds accumulate into the same report
    assert main([*argv[:-5], "--estimators", "grpo", "--seeds", "2", "--output-dir", str(out), "--no-progress"]) == 0
    assert (out / "runs" / "grpo-seed1.json").exists() and {f: f.stat().st_mtime_ns for f in files} == stamps
    report = (out / "report.md").read_text()
    assert "| GRPO | 2 |" in report and "| TEMPO | 1 |" in report


def test_credit_map_figure_wraps_long_real_text_rows_within_the_width_and_keeps_every_token():
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from trl_credit.viz import CreditRow, credit_map_figure

    tokens = [f" word{i % 10}" for i in range(60)]  # 6 characters each: 360 characters of real-looking text
    row = CreditRow(tokens=tokens, advantages=[0.1 * (i % 5 - 2) for i in range(60)], label="✗ wrong", marker=59,
                    prompt="Tom has 7 pencils. He buys 5 more pencils. How many pencils does Tom have now?")  # fmt: skip
    flat, wrapped = credit_map_figure({"GRPO": [row]}), credit_map_figure({"GRPO": [row]}, wrap=60, max_tokens=400)
    try:
        cells = [p for p in wrapped.axes[0].patches if isinstance(p, Rectangle) and p.fill]
        assert len(cells) == 60  # nothing cut
        left = min(p.get_x() for p in cells)
        assert max(p.get_x() + p.get_width() for p in cells) <= left + 60
        assert len({round(p.get_y()) for p in cells}) == 6  # 360 characters on lines of 60
        boxed = [p for p in wrapped.axes[0].patches if isinstance(p, Rectangle) and not p.fill]
        assert len(boxed) == 1 and round(boxed[0].get_y()) == max(round(p.get_y()) for p in cells)  # the last token
        assert wrapped.get_size_inches()[1] > flat.get_size_inches()[1]
        assert wrapped.get_size_inches()[0] < flat.get_size_inches()[0]
    finally:
        plt.close(flat)
        plt.close(wrapped)


def test_reading_does_not_claim_identical_samples_when_two_estimators_only_share_accuracy_counts():
    from trl_credit.demo.report import reading

    def run(seed, credit):
        points = [{"step": s, "accuracy": a, "step_error_rate": math.nan} for s, a in ((0, 0.0625), (4, 0.09375))]
        stats = {"mean_abs_advantage": credit, "neg_share_after_first_error_token": math.nan,
                 "neg_share_after_first_error_step": math.nan, "extra_credit_token_frac": 1.0,
                 "zero_advantage_token_frac": 0.0, "trained_token_frac": 1.0, "train_reward_mean": 0.2}  # fmt: skip
        return {"seed": seed, "points": points, "step_times": [90.0], "credit": stats}

    results = {"settings": {"eval_problems": 32}, "estimators": {
        "ppo": {"label": "PPO", "runs": [run(0, 0.2)]}, "spo_tree": {"label": "SPO-tree", "runs": [run(0, 0.9)]}}}
    text = " ".join(reading(results))
    assert "PPO and SPO-tree gave the same held-out accuracy" in text
    assert "coincidence of counts" in text and "out of 32 evaluation problems" in text
    assert "too little to change any sampled token" not in text
