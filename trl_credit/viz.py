r"""
Credit maps: where an estimator put the credit, token by token.

A credit map shows completions as rows of tokens coloured by their advantage (red negative, blue positive, white
zero), optionally grouped in panels (one per estimator) and with a marked token per row (e.g. the first wrong step).
It works on any batch: token strings and per-token advantages are all it needs.

    from trl_credit.viz import CreditRow, credit_rows, save_credit_map

    rows = credit_rows(tokenizer, out["completion_ids"], out["advantages"], out["completion_mask"])
    save_credit_map({"tempo": rows}, "credit_map.html")        # or .png

During training, [`CreditMapCallback`] keeps the last training batch of a trl_credit trainer and logs its credit map
every `every_n_steps` steps to the loggers in `report_to`: trackio (`trackio.Html`), Weights & Biases (`wandb.Html`)
or TensorBoard (an image). Without any of them it writes HTML files under `<output_dir>/credit_maps/`.
"""

from __future__ import annotations

import html as _html
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback


logger = logging.getLogger(__name__)

_NEG = (214, 39, 40)  # red: negative credit
_POS = (31, 119, 180)  # blue: positive credit
_VISIBLE = {"\n": "↵", "\t": "⇥", " ": "␣"}


@dataclass
class CreditRow:
    """
    One completion of a credit map.

    Args:
        tokens (`list[str]`):
            The completion's tokens as text (padding removed).
        advantages (`list[float]`):
            One advantage per token; `NaN` for a token without one (e.g. outside the loss mask: not trained), drawn
            grey.
        label (`str`, *optional*, defaults to `""`):
            Shown left of the row (e.g. `"r=0"`).
        marker (`int` or `None`, *optional*):
            Index of a token to outline (e.g. the first wrong token).
        prompt (`str` or `None`, *optional*):
            Shown before the completion, uncoloured.
    """

    tokens: list[str]
    advantages: list[float]
    label: str = ""
    marker: int | None = None
    prompt: str | None = None

    def __post_init__(self):
        if len(self.tokens) != len(self.advantages):
            raise ValueError(f"{len(self.tokens)} tokens but {len(self.advantages)} advantages in row {self.label!r}.")
        if self.marker is not None and not 0 <= self.marker < max(len(self.tokens), 1):
            raise ValueError(f"marker {self.marker} is outside the {len(self.tokens)} tokens of row {self.label!r}.")
        self.advantages = [float(a) for a in self.advantages]


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([int(token_id)], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def credit_rows(
    tokenizer,
    completion_ids: torch.Tensor | Sequence[Sequence[int]],
    advantages: torch.Tensor | Sequence[Sequence[float]] | Sequence[float],
    completion_mask: torch.Tensor | Sequence[Sequence[int]] | None = None,
    *,
    loss_mask: torch.Tensor | Sequence[Sequence[int]] | None = None,
    labels: Sequence[str] | None = None,
    markers: Sequence[int | None] | None = None,
    prompts: Sequence[str] | None = None,
) -> list[CreditRow]:
    r"""
    Build [`CreditRow`]s from a batch as TRL holds it.

    Args:
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Decodes each token id on its own.
        completion_ids (`torch.Tensor` of shape `(B, T)` or a list of lists):
            Completion token ids.
        advantages (`torch.Tensor` of shape `(B, T)` or `(B,)`):
            Per-token advantages, or one per completion (broadcast over its tokens).
        completion_mask (`torch.Tensor` of shape `(B, T)`, *optional*):
            1 on real tokens; padding is dropped. Defaults to all ones.
        loss_mask (`torch.Tensor` of shape `(B, T)`, *optional*):
            1 on the tokens the loss trains (TRL's `tool_mask`, which holds an estimator's `CreditOutput.loss_mask`,
            e.g. SPO's probability mask, and masks tool outputs). Real tokens outside it keep their place in the row
            with a `NaN` advantage, drawn grey as "not trained". Defaults to every real token.
        labels, markers, prompts (`list`, *optional*):
            Per row, as in [`CreditRow`].

    Returns:
        `list[CreditRow]`
    """
    ids = [list(map(int, r)) for r in (completion_ids.tolist() if torch.is_tensor(completion_ids) else completion_ids)]
    adv = advantages.tolist() if torch.is_tensor(advantages) else list(advantages)
    if completion_mask is None:
        mask = [[1] * len(r) for r in ids]
    else:
        mask = completion_mask.tolist() if torch.is_tensor(completion_mask) else [list(m) for m in completion_mask]
    if loss_mask is None:
        trained = mask
    else:
        trained = loss_mask.tolist() if torch.is_tensor(loss_mask) else [list(m) for m in loss_mask]
    if not (len(ids) == len(adv) == len(mask) == len(trained)):
        raise ValueError(
            f"Got {len(ids)} completions, {len(adv)} advantage rows, {len(mask)} completion_mask rows and "
            f"{len(trained)} loss_mask rows; each must have one row per completion."
        )
    rows = []
    for i, (row_ids, row_adv, row_mask, row_trained) in enumerate(zip(ids, adv, mask, trained)):
        if len(row_trained) != len(row_mask):
            raise ValueError(f"Row {i}: loss_mask has {len(row_trained)} columns, completion_mask {len(row_mask)}.")
        keep = [t for t, m in enumerate(row_mask) if m]
        values = [float(row_adv)] * len(keep) if not isinstance(row_adv, (list, tuple)) else [row_adv[t] for t in keep]
        values = [v if row_trained[t] else math.nan for v, t in zip(values, keep)]
        rows.append(
            CreditRow(
                tokens=[_token_text(tokenizer, row_ids[t]) for t in keep],
                advantages=values,
                label=labels[i] if labels is not None else f"#{i}",
                marker=markers[i] if markers is not None else None,
                prompt=prompts[i] if prompts is not None else None,
            )
        )
    return rows


def _as_panels(panels: Mapping[str, Sequence[CreditRow]] | Sequence[CreditRow]) -> dict[str, list[CreditRow]]:
    if isinstance(panels, Mapping):
        out = {str(k): list(v) for k, v in panels.items()}
    else:
        out = {"": list(panels)}
    for name, rows in out.items():
        if not all(isinstance(r, CreditRow) for r in rows):
            raise TypeError(f"Panel {name!r} must hold CreditRow objects (see trl_credit.viz.credit_rows).")
    return out


def _scales(panels: dict[str, list[CreditRow]], scale: str | float) -> dict[str, float]:
    def max_abs(rows):
        values = [abs(a) for r in rows for a in r.advantages if math.isfinite(a)]
        return max(values, default=0.0) or 1.0

    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}.")
        return {name: float(scale) for name in panels}
    if scale == "panel":
        return {name: max_abs(rows) for name, rows in panels.items()}
    if scale == "global":
        value = max_abs([r for rows in panels.values() for r in rows])
        return {name: value for name in panels}
    raise ValueError(f"scale must be 'panel', 'global' or a positive number, got {scale!r}.")


def _rgb(value: float, scale: float) -> tuple[float, float, float]:
    """White at 0, saturating to red (negative) or blue (positive) at |value| = scale; channels in [0, 1]."""
    if not math.isfinite(value):
        return (0.85, 0.85, 0.85)
    x = max(-1.0, min(1.0, value / scale))
    base = _NEG if x < 0 else _POS
    a = abs(x)
    return tuple((255 * (1 - a) + c * a) / 255 for c in base)  # type: ignore[return-value]


def _visible(token: str) -> str:
    return "".join(_VISIBLE.get(ch, ch) for ch in token) or "∅"


def credit_map_html(
    panels: Mapping[str, Sequence[CreditRow]] | Sequence[CreditRow],
    *,
    title: str | None = None,
    scale: str | float = "panel",
    notes: Mapping[str, str] | None = None,
) -> str:
    """
    A self-contained HTML page of the credit map (inline styles, no scripts). Hover a token for its advantage.

    Args:
        panels (`dict[str, list[CreditRow]]` or `list[CreditRow]`):
            Rows, optionally grouped in titled panels (e.g. one per estimator).
        title (`str`, *optional*):
            Page heading.
        scale (`str` or `float`, *optional*, defaults to `"panel"`):
            Advantage at which colours saturate: `"panel"` (each panel's largest |A|, so the pattern within an
            estimator shows whatever its scale), `"global"` (one for all panels) or a number.
        notes (`dict[str, str]`, *optional*):
            A line of text under each panel title.

    Returns:
        `str`: the HTML document.
    """
    panels = _as_panels(panels)
    scales = _scales(panels, scale)
    esc = _html.escape
    out = [
        '<!doctype html><html><head><meta charset="utf-8"><title>credit map</title><style>',
        "body{font-family:system-ui,sans-serif;margin:16px;color:#222}",
        "table{border-collapse:collapse;margin-bottom:18px}",
        "td{padding:2px 6px;vertical-align:middle;white-space:nowrap}",
        "td.l{color:#555;font-size:12px;text-align:right}",
        "td.p{color:#999;font-family:monospace}",
        "td.c{white-space:normal;max-width:1100px}",
        "span.t{font-family:monospace;font-size:15px;padding:1px 0;border:1px solid transparent;"
        "display:inline-block;white-space:pre}",
        "span.m{border:2px solid #000;border-radius:2px}",
        "h2{font-size:16px;margin:14px 0 2px}",
        "p.n{font-size:12px;color:#555;margin:0 0 4px}",
        ".key span{display:inline-block;width:28px;text-align:center;font-size:11px;font-family:monospace}",
        "</style></head><body>",
    ]
    if title:
        out.append(f"<h1 style='font-size:20px'>{esc(title)}</h1>")
    out.append(
        "<p class='n'>Token colour = advantage that token receives (red: pushed down, blue: pushed up, white: 0; "
        "grey: no value, e.g. a token outside the loss mask, which is not trained). "
        "A black box marks the row's marked token (e.g. the first wrong token). Hover a token for its value.</p>"
    )
    for name, rows in panels.items():
        s = scales[name]
        if name:
            out.append(f"<h2>{esc(name)}</h2>")
        key = "".join(
            f"<span style='background:rgb({','.join(str(round(255 * c)) for c in _rgb(v * s, s))})'>{v:+.1f}</span>"
            for v in (-1.0, -0.5, 0.0, 0.5, 1.0)
        )
        note = (notes or {}).get(name, "")
        out.append(f"<p class='n'>{esc(note)} colour scale: ±{s:.3g} <span class='key'>{key}</span> × scale</p>")
        out.append("<table>")
        for row in rows:
            cells = []
            for j, (tok, a) in enumerate(zip(row.tokens, row.advantages)):
                r, g, b = (round(255 * c) for c in _rgb(a, s))
                cls = "t m" if j == row.marker else "t"
                value = f"A={a:+.4f}" if math.isfinite(a) else "not trained (no advantage)"
                cells.append(
                    f"<span class='{cls}' style='background:rgb({r},{g},{b})' title='{esc(repr(tok))}: "
                    f"{value}'>{esc(_visible(tok))}</span>"
                )
            prompt = f"<td class='p'>{esc(_visible(row.prompt))}</td>" if row.prompt is not None else ""
            out.append(f"<tr><td class='l'>{esc(row.label)}</td>{prompt}<td class='c'>{''.join(cells)}</td></tr>")
        out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out)


def _heading(name: str, scale: float, note: str) -> str:
    return f"{name}   (colour scale ±{scale:.3g}{'; ' + note if note else ''})"


def credit_map_figure(
    panels: Mapping[str, Sequence[CreditRow]] | Sequence[CreditRow],
    *,
    title: str | None = None,
    scale: str | float = "panel",
    notes: Mapping[str, str] | None = None,
    max_tokens: int = 120,
    wrap: int | None = None,
):
    """
    The credit map as a matplotlib `Figure` (one text cell per token, coloured; the marked token boxed). Same
    arguments as [`credit_map_html`]; rows are cut after `max_tokens` tokens. With `wrap` (characters per line), a
    row continues on further lines and its prompt gets a line of its own above it: the layout for real text, whose
    completions are hundreds of characters long.

    Returns:
        `matplotlib.figure.Figure`
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    panels = _as_panels(panels)
    scales = _scales(panels, scale)
    cell = 0.11  # inches per character
    label_chars = max([len(r.label) for rows in panels.values() for r in rows] + [4])
    prompt_chars = 0 if wrap else max([len(_visible(r.prompt or "")) for rows in panels.values() for r in rows] + [0])

    def layout(row) -> list[tuple[int, int, str]]:
        """(line, offset, text) per token: one line, or lines of at most `wrap` characters."""
        cells, line, x = [], 0, 0
        for tok in row.tokens[:max_tokens]:
            text = _visible(tok)
            if wrap and x > 0 and x + len(text) > wrap:
                line, x = line + 1, 0
            cells.append((line, x, text))
            x += len(text)
        return cells

    layouts = {id(r): layout(r) for rows in panels.values() for r in rows}
    width_chars = max([off + len(t) for cells in layouts.values() for _, off, t in cells] + [10])
    if wrap:
        width_chars = max([width_chars] + [len(_visible(r.prompt)) for rows in panels.values() for r in rows
                                           if r.prompt is not None])  # fmt: skip

    def row_lines(row) -> int:
        cells = layouts[id(row)]
        return (cells[-1][0] + 1 if cells else 1) + (1 if wrap and row.prompt is not None else 0)

    left = label_chars + 1 + (prompt_chars + 1 if prompt_chars else 0)
    total_chars = left + width_chars + 1
    # Mirrors the layout below: a title line, then per panel a heading line, its rows and half a line of space.
    n_rows = (1 if title else 0) + sum(
        sum(row_lines(r) for r in rows) + (1.5 if name else 0) for name, rows in panels.items()
    )
    headings = {name: _heading(name, scales[name], (notes or {}).get(name, "")) for name in panels}
    longest_heading = max([len(title or "")] + [len(h) for h in headings.values()])
    fig_w, row_h = max(6.0, total_chars * cell, 0.09 * longest_heading), 0.3
    fig = plt.figure(figsize=(fig_w, max(1.5, n_rows * row_h)))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, fig_w / cell)  # one unit per character, whatever widened the figure
    ax.set_ylim(n_rows, 0)
    ax.axis("off")
    y = 0.0
    if title:
        ax.text(0.2, y + 0.65, title, fontsize=12, fontweight="bold", va="center")
        y += 1
    for name, rows in panels.items():
        s = scales[name]
        if name:
            ax.text(0.2, y + 0.75, headings[name], fontsize=10, fontweight="bold", va="center")
            y += 1
        for row in rows:
            if wrap and row.prompt is not None:
                ax.text(label_chars + 1, y + 0.5, row.prompt, fontsize=9, va="center", color="#777")
                y += 1
            ax.text(label_chars, y + 0.5, row.label, fontsize=8, ha="right", va="center", color="#555")
            if prompt_chars:
                ax.text(label_chars + 1, y + 0.5, _visible(row.prompt or ""), fontsize=9, va="center",
                        family="monospace", color="#999")  # fmt: skip
            cells = layouts[id(row)]
            for j, ((line, off, text), a) in enumerate(zip(cells, row.advantages)):
                x, w, yy = float(left + off), len(text), y + line
                ax.add_patch(Rectangle((x, yy + 0.08), w, 0.84, facecolor=_rgb(a, s), edgecolor="none"))
                if j == row.marker:
                    ax.add_patch(Rectangle((x, yy + 0.04), w, 0.92, fill=False, edgecolor="black", linewidth=1.6))
                ax.text(x + w / 2, yy + 0.52, text, fontsize=9, ha="center", va="center", family="monospace")
            y += cells[-1][0] + 1 if cells else 1
        y += 0.5 if name else 0
    return fig


def save_credit_map(
    panels: Mapping[str, Sequence[CreditRow]] | Sequence[CreditRow], path: str | Path, **kwargs: Any
) -> Path:
    """Write the credit map to `path`: HTML for `.html`/`.htm`, otherwise an image by matplotlib (`.png`, `.svg`, …)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".html", ".htm"):
        path.write_text(credit_map_html(panels, **kwargs), encoding="utf-8")
        return path
    import matplotlib.pyplot as plt

    fig = credit_map_figure(panels, **kwargs)
    try:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


# ── periodic logging during training ───────────────────────────────────────────────────────────────────────────────
class CreditMapCallback(TrainerCallback):
    """
    Logs the credit map of the latest training batch every `every_n_steps` optimizer steps.

    Attach it to a trl_credit trainer (it keeps the advantages that reached the loss, whatever the estimator):

    ```python
    from trl_credit.viz import CreditMapCallback

    trainer = GRPOTrainer(...)
    trainer.add_callback(CreditMapCallback(trainer, every_n_steps=50))
    ```

    Destinations, from `args.report_to`: `"trackio"` (`trackio.Html`), `"wandb"` (`wandb.Html`), `"tensorboard"`
    (the PNG, through the writer of transformers' `TensorBoardCallback`). A listed logger that is not installed or
    not running is skipped with one warning. When none of them takes the map, it is written to
    `<output_dir>/credit_maps/step_<N>.html` instead (or always, with `save_dir`).

    Args:
        trainer ([`trl_credit.GRPOTrainer`] or a subclass):
            The trainer whose batches are shown.
        every_n_steps (`int`, *optional*, defaults to `100`):
            Logging period in optimizer steps.
        max_rows (`int`, *optional*, defaults to `8`):
            Completions shown (the first ones of the batch: whole groups when `num_generations ≤ max_rows`).
        save_dir (`str` or `None`, *optional*):
            Also write every map there as HTML.
        key (`str`, *optional*, defaults to `"credit_map"`):
            Name under which the loggers store the map.
    """

    def __init__(
        self,
        trainer,
        every_n_steps: int = 100,
        max_rows: int = 8,
        save_dir: str | Path | None = None,
        key: str = "credit_map",
    ):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}.")
        self.trainer = trainer
        self.every_n_steps = every_n_steps
        self.max_rows = max_rows
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.key = key
        self.last_batch: dict[str, Any] | None = None
        self.logged: list[tuple[int, str]] = []  # (step, destination) of every map logged
        self._warned: set[str] = set()
        inner = trainer._generate_and_score_completions

        def keep_last_batch(inputs):
            out = inner(inputs)
            if trainer.model.training:
                n = self.max_rows
                self.last_batch = {
                    "completion_ids": out["completion_ids"][:n].detach().cpu(),
                    "completion_mask": out["completion_mask"][:n].detach().cpu(),
                    # TRL's tool_mask holds the estimator's loss mask (SPO's probability mask) and tool outputs
                    "loss_mask": out["tool_mask"][:n].detach().cpu() if "tool_mask" in out else None,
                    "advantages": out["advantages"][:n].detach().cpu().float(),
                    "prompts": trainer.processing_class.batch_decode(
                        out["prompt_ids"][:n].cpu(), skip_special_tokens=True
                    ),
                }
            return out

        # An instance attribute: the trainer's own method (and any subclass override) still runs inside.
        trainer._generate_and_score_completions = keep_last_batch

    def rows(self) -> list[CreditRow]:
        """The rows of the latest kept batch (empty before the first training batch)."""
        b = self.last_batch
        if b is None:
            return []
        return credit_rows(
            self.trainer.processing_class, b["completion_ids"], b["advantages"], b["completion_mask"],
            loss_mask=b.get("loss_mask"), labels=[f"#{i}" for i in range(len(b["completion_ids"]))], prompts=b["prompts"],
        )  # fmt: skip

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every_n_steps or self.last_batch is None or not state.is_world_process_zero:
            return
        self.log_map(args, state.global_step)

    def log_map(self, args, step: int) -> list[str]:
        """Render the kept batch and send it to every configured destination; returns the destinations used."""
        rows = self.rows()
        estimator = getattr(args, "advantage_estimator", "")
        title = f"credit map, step {step} ({estimator})"
        page = credit_map_html({estimator: rows}, title=title)
        used = []
        report_to = args.report_to if isinstance(args.report_to, (list, tuple)) else [args.report_to]
        for name in report_to:
            try:
                if name == "trackio" and self._log_trackio(page, rows, title, step):
                    used.append(name)
                elif name == "wandb" and self._log_wandb(page):
                    used.append(name)
                elif name == "tensorboard" and self._log_tensorboard(rows, title, step):
                    used.append(name)
            except ImportError as e:
                self._warn_once(name, f"CreditMapCallback: report_to lists {name!r} but it cannot be imported ({e}).")
        if self.save_dir is not None or not used:
            directory = self.save_dir or Path(args.output_dir) / "credit_maps"
            directory.mkdir(parents=True, exist_ok=True)
            (directory / f"step_{step}.html").write_text(page, encoding="utf-8")
            used.append(f"file:{directory}")
        self.logged += [(step, u) for u in used]
        return used

    def _warn_once(self, name: str, message: str) -> None:
        if name not in self._warned:
            self._warned.add(name)
            logger.warning(message)

    def _log_trackio(self, page: str, rows, title: str, step: int) -> bool:
        import trackio

        if hasattr(trackio, "Html"):
            trackio.log({self.key: trackio.Html(page)}, step=step)
            return True
        # Older trackio releases have images but no HTML media.
        trackio.log({self.key: trackio.Image(self._figure_array(rows, title))}, step=step)
        return True

    def _log_wandb(self, page: str) -> bool:
        import wandb

        if wandb.run is None:
            self._warn_once("wandb", "CreditMapCallback: report_to lists 'wandb' but no wandb run is active.")
            return False
        # commit=False: attach to the step transformers' WandbCallback commits next.
        wandb.log({self.key: wandb.Html(page)}, commit=False)
        return True

    def _log_tensorboard(self, rows, title: str, step: int) -> bool:
        from transformers.integrations import TensorBoardCallback

        for callback in self.trainer.callback_handler.callbacks:
            writer = getattr(callback, "tb_writer", None)
            if isinstance(callback, TensorBoardCallback) and writer is not None:
                import matplotlib.pyplot as plt

                fig = credit_map_figure(rows, title=title)
                try:
                    writer.add_figure(self.key, fig, global_step=step)
                finally:
                    plt.close(fig)
                return True
        self._warn_once("tensorboard", "CreditMapCallback: report_to lists 'tensorboard' but no writer is open.")
        return False

    @staticmethod
    def _figure_array(rows, title: str):
        import numpy as np
        import matplotlib.pyplot as plt

        fig = credit_map_figure(rows, title=title)
        try:
            fig.canvas.draw()
            return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
        finally:
            plt.close(fig)
