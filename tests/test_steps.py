"""Step segmentation for VinePPO: text splitters, the token mapping ("first character decides"), caps and strides."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_credit.credit import steps
from trl_credit.credit.steps import (
    char_to_token_boundaries,
    completion_boundaries,
    estimated_state_mask,
    find_math_spans,
    segment_completions,
    split_math,
    split_newline,
    token_char_starts,
)
from trl_credit.testing import build_tokenizer


def parts(text, bounds):
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def assert_valid(text, bounds):
    assert bounds[0] == 0 and bounds[-1] == len(text)
    assert all(a < b for a, b in zip(bounds, bounds[1:])), bounds
    assert "".join(parts(text, bounds)) == text


_TOKENIZER = build_tokenizer()


def _decode(seqs):
    return _TOKENIZER.batch_decode(seqs, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def tokenizer():
    return _TOKENIZER


@pytest.fixture(scope="module")
def batch_decode(tokenizer):
    return lambda seqs: tokenizer.batch_decode(seqs, skip_special_tokens=True, clean_up_tokenization_spaces=False)


# ── "newline" (GSM8K) ──────────────────────────────────────────────────────────────────────────────────────────────
def test_newline_split_attaches_newlines_forward_and_merges_answer_line():
    text = "\n\nNatalia sold 48 clips.\nThen 24 more.\n\nSo 72 in total.\n#### 72"
    assert parts(text, split_newline(text)) == [
        "\n\nNatalia sold 48 clips.",
        "\nThen 24 more.",
        "\n\nSo 72 in total.\n#### 72",
    ]


def test_newline_split_single_line_and_trailing_newlines():
    assert parts("42", split_newline("42")) == ["42"]
    text = "a is 1.\nb is 2.\n\n"
    assert parts(text, split_newline(text)) == ["a is 1.", "\nb is 2.\n\n"]


# ── "math" (the LaTeX-aware MATH splitter) ─────────────────────────────────────────────────────────────────────────
def test_math_split_sentence_ends_and_abbreviation_guard():
    text = "The area is large, e.g. Twelve units of it. Therefore the side is four units long."
    assert parts(text, split_math(text)) == [
        "The area is large, e.g. Twelve units of it.",
        " Therefore the side is four units long.",
    ]


def test_math_split_never_cuts_inline_math_nor_escaped_dollars():
    text = "It costs \\$5. Then $x = \\frac{1}{2}. Y$ is what we need. So the answer is $\\boxed{7}$."
    bounds = split_math(text)
    assert_valid(text, bounds)
    inline = [s for s in find_math_spans(text) if s.kind == "inline"]
    assert [text[s.start : s.end] for s in inline] == ["$x = \\frac{1}{2}. Y$", "$\\boxed{7}$"]
    assert not any(s.start < b < s.end for s in inline for b in bounds)
    assert parts(text, bounds)[0] == "It costs \\$5."  # an escaped dollar is text: the sentence ends after it


def test_math_split_after_math_that_ends_a_sentence_and_inside_display_math():
    text = "We know that $a + b = 10.$ We also have\n\\[\na - b = 2\n\\]\nso $a = 6$ and the answer is $\\boxed{6}$."
    assert parts(text, split_math(text)) == [
        "We know that $a + b = 10.$",  # the sentence ends inside the math
        " We also have\n\\[",
        "\na - b = 2\n\\]",  # display math split at its newlines; a lone closing delimiter joins the part before
        "\nso $a = 6$ and the answer is $\\boxed{6}$.",
    ]


def test_math_split_breaks_long_parts_near_the_middle_with_halves_of_40_characters():
    text = "x" * 45 + ", and then we continue with a clause that is long enough to be broken in two parts"
    bounds = split_math(text)
    assert len(text) > steps.MAX_PART_LENGTH
    assert_valid(text, bounds)
    assert len(bounds) > 2 and all(b - a >= 40 for a, b in zip(bounds, bounds[1:]))


def test_math_split_on_real_math_solutions(data_dir):
    """Every MATH test solution: the steps concatenate back to the text and no cut falls inside $…$ or \\(…\\)."""
    rows = [json.loads(line) for line in (data_dir / "math" / "test.jsonl").read_text().splitlines()]
    assert len(rows) == 500
    num_steps = []
    for row in rows:
        text = row["solution"]
        bounds = split_math(text)
        assert_valid(text, bounds)
        for span in find_math_spans(text):
            if span.kind != "display":
                assert not any(span.start < b < span.end for b in bounds), (text[span.start : span.end], bounds)
        num_steps.append(len(bounds) - 1)
    # real solutions have several steps, and parts over the 100-character limit are the exception
    assert sum(num_steps) / len(num_steps) > 3
    all_bounds = [split_math(row["solution"]) for row in rows]
    long_parts = sum(b - a > steps.MAX_PART_LENGTH for bounds in all_bounds for a, b in zip(bounds, bounds[1:]))
    assert long_parts / sum(num_steps) < 0.15


_ALPHABET = st.sampled_from(list("ab AB.,:$\\\n=+{}()[]") + ["\\[", "\\]", "$$", " and ", "\\(", "\\)"])


@settings(max_examples=300, deadline=None)
@given(st.lists(_ALPHABET, max_size=120).map("".join))
def test_math_split_is_a_partition_for_any_text(text):
    bounds = split_math(text)
    if not text:
        assert bounds == [0]
        return
    assert_valid(text, bounds)
    for span in find_math_spans(text):
        if span.kind == "inline":
            assert not any(span.start < b < span.end for b in bounds)


# ── character → token boundaries ───────────────────────────────────────────────────────────────────────────────────
def test_first_character_decides_and_eos_joins_the_last_step():
    # tokens "a", "b\n", "cd", EOS over the text "ab\ncd"; character steps "ab" | "\ncd": "b\n" starts in step 0
    assert char_to_token_boundaries([0, 2, 5], [0, 1, 3, 5], 5) == [0, 2, 4]
    # a step with no token of its own vanishes
    assert char_to_token_boundaries([0, 1, 2, 5], [0, 3, 5], 5) == [0, 1, 3]


def test_token_states_are_prefixes_of_the_sampled_completion(tokenizer, batch_decode):
    text = "First, 3 + 4 = 7.\nThen 7 * 2 = 14.\n#### 14"
    ids = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    bounds, failed = completion_boundaries(ids, step_split="newline", batch_decode=batch_decode)
    assert not failed and bounds[0] == 0 and bounds[-1] == len(ids)
    pieces = [ids[a:b] for a, b in zip(bounds, bounds[1:])]
    assert sum(pieces, []) == ids  # token coverage, EOS included
    assert pieces[-1][-1] == tokenizer.eos_token_id
    assert [batch_decode([p])[0] for p in pieces] == ["First, 3 + 4 = 7.", "\nThen 7 * 2 = 14.\n#### 14"]


def test_non_canonical_and_multibyte_tokenizations_map_to_valid_boundaries(tokenizer, batch_decode):
    # byte-level pieces of "é" and "🙂" decode to replacement characters one by one (slow path)
    ids = tokenizer("é 🙂.\nNext step.\n", add_special_tokens=False).input_ids
    text, starts = token_char_starts(ids, batch_decode)
    assert text == "é 🙂.\nNext step.\n"
    assert starts == sorted(starts) and starts[-1] <= len(text)
    bounds, _ = completion_boundaries(ids, step_split="newline", batch_decode=batch_decode)
    assert bounds[0] == 0 and bounds[-1] == len(ids) and len(bounds) == 3
    # a non-canonical tokenization of the same text (one character at a time): states are prefixes of *these* ids
    char_ids = [i for ch in text for i in tokenizer(ch, add_special_tokens=False).input_ids]
    assert char_ids != ids and batch_decode([char_ids])[0] == text
    b2, _ = completion_boundaries(char_ids, step_split="newline", batch_decode=batch_decode)
    assert [batch_decode([char_ids[a:b]])[0] for a, b in zip(b2, b2[1:])] == ["é 🙂.", "\nNext step.\n"]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sampled_from(list("ab .$\n=1")), min_size=1, max_size=60).map("".join),
    st.sampled_from(["math", "newline"]),
)
def test_segment_ids_cover_every_token_once_in_order(text, split):
    tok = _TOKENIZER
    ids = tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
    seg, bounds, failed = segment_completions(
        [ids, []], len(ids) + 3, step_split=split, batch_decode=_decode
    )
    assert failed == 0
    row = seg[0, : len(ids)]
    assert (row >= 0).all() and (seg[0, len(ids) :] == -1).all() and (seg[1] == -1).all()
    assert (row.diff() >= 0).all() and (row.diff() <= 1).all() and row[0] == 0  # steps 0..S-1, contiguous
    assert row[-1] == row.max()  # EOS in the last step


def test_token_chunks_keep_trailing_eos_in_the_last_chunk():
    ids = list(range(10, 20)) + [2]
    bounds, _ = completion_boundaries(ids, step_split="token_chunks", chunk_tokens=5, special_token_ids={2})
    assert bounds == [0, 5, 11]
    bounds, _ = completion_boundaries(ids[:7], step_split="token_chunks", chunk_tokens=3)
    assert bounds == [0, 3, 6, 7]


def test_a_failing_splitter_falls_back_to_newline_and_is_counted(monkeypatch, tokenizer, batch_decode):
    def broken(text):
        raise RuntimeError("unbalanced")

    monkeypatch.setattr(steps, "split_math", broken)
    ids = tokenizer("a is 1.\nb is 2.", add_special_tokens=False).input_ids
    seg, bounds, failed = segment_completions([ids], len(ids), step_split="math", batch_decode=batch_decode)
    assert failed == 1 and len(bounds[0]) == 3  # the newline split


def test_cap_and_stride_choose_the_estimated_states():
    est, interp = estimated_state_mask(torch.tensor([5, 2, 0]), 5, max_steps=2)
    assert est.int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]]
    assert not interp.any()
    est, interp = estimated_state_mask(torch.tensor([7]), 7, stride=3)
    assert est.int().tolist() == [[1, 0, 0, 1, 0, 0, 1]] and interp.int().tolist() == [[0, 1, 1, 0, 1, 1, 0]]
    est, _ = estimated_state_mask(torch.tensor([4]), 4, max_steps=0)
    assert est.int().tolist() == [[1, 0, 0, 0]]  # root only: REINFORCE with an MC baseline
