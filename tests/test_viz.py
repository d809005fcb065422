"""`trl_credit.viz`: credit maps of any batch (HTML and PNG) and the callback that logs them during training."""

import logging
import re
from types import SimpleNamespace

import pytest
import torch

from trl_credit.viz import CreditMapCallback, CreditRow, credit_map_html, credit_rows, save_credit_map


class CharTokenizer:
    """Decodes id i as the i-th character of a fixed alphabet (a hand-made batch needs no trained tokenizer)."""

    alphabet = "abc<>\n"

    def decode(self, ids, **kwargs):
        return "".join(self.alphabet[i] for i in ids)


def _spans(html):
    """(class, rgb, text) of every token span."""
    return re.findall(r"<span class='(t(?: m)?)' style='background:rgb\((\d+),(\d+),(\d+)\)'[^>]*>([^<]*)</span>", html)


def test_credit_rows_drop_padding_broadcast_sequence_advantages_and_keep_markers():
    ids = torch.tensor([[0, 1, 2, 0], [2, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    rows = credit_rows(CharTokenizer(), ids, torch.tensor([0.5, -1.0]), mask, markers=[None, 1], labels=["x", "y"])
    assert rows[0].tokens == ["a", "b", "c", "a"] and rows[0].advantages == [0.5] * 4
    assert rows[1].tokens == ["c", "b"] and rows[1].advantages == [-1.0, -1.0] and rows[1].marker == 1
    per_token = torch.tensor([[0.1, 0.2, 0.3, 0.4], [-0.5, 0.0, 9.0, 9.0]])
    assert credit_rows(CharTokenizer(), ids, per_token, mask)[1].advantages == [-0.5, 0.0]  # padding values dropped


def test_credit_rows_keep_untrained_tokens_in_place_with_no_advantage():
    ids = torch.tensor([[0, 1, 2, 0], [2, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    loss_mask = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 1]])  # e.g. SPO's probability mask; padding is dropped anyway
    per_token = torch.tensor([[0.1, 0.2, 0.3, 0.4], [-0.5, 0.7, 9.0, 9.0]])
    rows = credit_rows(CharTokenizer(), ids, per_token, mask, loss_mask=loss_mask)
    assert rows[0].tokens == ["a", "b", "c", "a"] and rows[1].tokens == ["c", "b"]
    assert rows[0].advantages[0] == pytest.approx(0.1) and rows[0].advantages[3] == pytest.approx(0.4)
    assert all(a != a for a in rows[0].advantages[1:3]) and rows[1].advantages[0] != rows[1].advantages[0]  # NaN
    page = credit_map_html(rows)
    assert page.count("not trained (no advantage)") == 3
    sequence_level = credit_rows(CharTokenizer(), ids, torch.tensor([1.0, -1.0]), mask, loss_mask=loss_mask)
    assert [a == a for a in sequence_level[1].advantages] == [False, True]
    with pytest.raises(ValueError, match="loss_mask rows"):
        credit_rows(CharTokenizer(), ids, per_token, mask, loss_mask=loss_mask[:1])
    with pytest.raises(ValueError, match="Row 0: loss_mask has 3 columns"):
        credit_rows(CharTokenizer(), ids, per_token, mask, loss_mask=loss_mask[:, :3])


def test_html_colours_follow_the_sign_and_size_of_the_advantage_and_box_the_marker():
    rows = [CreditRow(tokens=["a", "<", "b", "\n"], advantages=[-2.0, -1.0, 0.0, 2.0], label="r=0", marker=1)]
    html = credit_map_html({"TEMPO": rows}, title="t", scale=2.0)
    spans = _spans(html)
    assert [s[4] for s in spans] == ["a", "&lt;", "b", "↵"]  # escaped, newline made visible
    colours = [tuple(map(int, s[1:4])) for s in spans]
    assert colours[0] == (214, 39, 40)  # saturated red at −scale
    assert colours[1] == (234, 147, 148)  # half-way to red
    assert colours[2] == (255, 255, 255)  # zero is white
    assert colours[3] == (31, 119, 180)  # saturated blue at +scale
    assert [s[0] for s in spans] == ["t", "t m", "t", "t"]  # only the marker is boxed
    assert "A=-1.0000" in html and "<h2>TEMPO</h2>" in html


def test_panel_scale_saturates_each_panel_at_its_own_largest_advantage():
    small = [CreditRow(tokens=["a"], advantages=[-0.1])]
    large = [CreditRow(tokens=["a"], advantages=[-10.0])]
    spans = _spans(credit_map_html({"small": small, "large": large}))
    assert [tuple(map(int, s[1:4])) for s in spans] == [(214, 39, 40), (214, 39, 40)]
    spans = _spans(credit_map_html({"small": small, "large": large}, scale="global"))
    assert tuple(map(int, spans[0][1:4])) == (255, 253, 253)  # 1 % of the global scale: almost white


def test_png_credit_map_is_a_valid_image_that_grows_with_the_rows(tmp_path):
    from PIL import Image

    row = CreditRow(tokens=list("3+5=8\n8+9=16"), advantages=[0.1] * 9 + [-1.0, -1.0, -1.0], marker=10, prompt="3+5")
    one = save_credit_map({"GRPO": [row]}, tmp_path / "one.png")
    three = save_credit_map({"GRPO": [row] * 3, "TEMPO": [row] * 3}, tmp_path / "three.png", title="map")
    with Image.open(one) as a, Image.open(three) as b:
        a.verify()
        assert b.size[1] > a.size[1] and b.size[0] >= 200
    assert save_credit_map([row], tmp_path / "m.html").read_text().startswith("<!doctype html>")


def test_bad_inputs_fail_with_clear_errors():
    with pytest.raises(ValueError, match="2 tokens but 1 advantages"):
        CreditRow(tokens=["a", "b"], advantages=[1.0])
    with pytest.raises(ValueError, match="marker 5 is outside"):
        CreditRow(tokens=["a"], advantages=[1.0], marker=5)
    with pytest.raises(ValueError, match="scale must be"):
        credit_map_html([CreditRow(tokens=["a"], advantages=[1.0])], scale="row")
    with pytest.raises(TypeError, match="CreditRow"):
        credit_map_html({"x": [("a", 1.0)]})


@pytest.mark.slow
def test_callback_logs_the_trained_batch_every_n_steps_and_falls_back_to_files(tiny_model_dir, tmp_path, caplog):
    from trl_credit import GRPOConfig, GRPOTrainer
    from trl_credit.testing import shaped_math_reward, tiny_math_dataset

    args = GRPOConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, num_generations=4,
        max_completion_length=8, report_to="none", use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True,
        advantage_estimator="tempo", seed=0,
    )  # fmt: skip
    trainer = GRPOTrainer(model=tiny_model_dir, reward_funcs=shaped_math_reward, args=args,
                          train_dataset=tiny_math_dataset(8))  # fmt: skip
    callback = CreditMapCallback(trainer, every_n_steps=1, max_rows=4)
    trainer.add_callback(callback)
    trainer.train()
    assert [step for step, _ in callback.logged] == [1, 2]
    page = (tmp_path / "credit_maps" / "step_2.html").read_text()
    assert page.count("<tr>") == 4 and "credit map, step 2 (tempo)" in page
    kept = callback.last_batch
    assert kept["advantages"].dim() == 2  # TEMPO's per-token advantages, as the loss received them
    # A logger that is listed but unavailable (not installed, or no active run) is skipped with one warning.
    with caplog.at_level(logging.WARNING, logger="trl_credit.viz"):
        used = callback.log_map(SimpleNamespace(report_to=["wandb"], output_dir=str(tmp_path / "w")), step=7)
        callback.log_map(SimpleNamespace(report_to=["wandb"], output_dir=str(tmp_path / "w")), step=8)
    assert used == [f"file:{tmp_path / 'w' / 'credit_maps'}"]
    assert (tmp_path / "w" / "credit_maps" / "step_7.html").is_file()
    assert sum("wandb" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.slow
def test_callback_draws_tokens_outside_spos_probability_mask_as_not_trained(tiny_model_dir, tmp_path):
    from trl_credit import GRPOConfig, GRPOTrainer
    from trl_credit.testing import CPU_TEST_ARGS, shaped_math_reward, tiny_math_dataset

    args = GRPOConfig(output_dir=str(tmp_path), advantage_estimator="spo_chain", max_steps=1, per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=12, **CPU_TEST_ARGS, seed=5, vine_num_rollouts=2,
                      spo_cutpoint_threshold=0.004, spo_cutpoints_per_segment=2)  # fmt: skip
    trainer = GRPOTrainer(model=tiny_model_dir, reward_funcs=shaped_math_reward, args=args,
                          train_dataset=tiny_math_dataset(8))  # fmt: skip
    callback = CreditMapCallback(trainer, every_n_steps=1, max_rows=4)
    trainer.add_callback(callback)
    trainer.train()
    kept = callback.last_batch
    untrained = (kept["completion_mask"].bool() & ~kept["loss_mask"].bool()).sum().item()
    assert untrained > 0, "the probability mask left every token in the loss: nothing to show"
    rows = callback.rows()
    assert sum(a != a for r in rows for a in r.advantages) == untrained  # NaN exactly where the loss does not train
    page = (tmp_path / "credit_maps" / "step_1.html").read_text()
    assert page.count("not trained (no advantage)") == untrained
