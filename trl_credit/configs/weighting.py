"""Config fields of the token weightings: attention rhythm (WAAD/FAI) and high-entropy forking tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


TOKEN_WEIGHTINGS = ("none", "preplan", "anchor", "rhythm", "entropy")


@dataclass
class TokenWeightingArguments:
    r"""
    > Parameters that control token weighting

    token_weighting (`str`, *optional*, defaults to `"none"`):
        Detached per-token weights that multiply the estimator's advantages (any `advantage_estimator`). `"none"`:
        no weighting. `"preplan"`, `"anchor"`, `"rhythm"`: the attention-rhythm weights γ of
        [Attention Illuminates LLM Reasoning](https://huggingface.co/papers/2510.13554) (local-chunk, global-anchor and
        coupled rhythm credit), computed from one extra no-grad forward of the current policy that stops after the
        last sampled layer. `"entropy"`: high-entropy "forking" tokens
        ([Beyond the 80/20 Rule](https://huggingface.co/papers/2506.01939)), from the entropies of the current policy.
    token_weight_sign (`str`, *optional*, defaults to `"both"`):
        `"both"`: weights apply to positive and negative advantages (the attention paper's v2). `"nonneg"`: tokens
        with a negative advantage keep weight 1 (v1).
    token_weight_renormalize (`bool`, *optional*, defaults to `False`):
        Rescale each completion's weights to mean 1 over its tokens, which keeps the loss scale of the unweighted
        estimator. The papers do not (the attention weights have mean ≈ 1 + (γ_amp − 1)·q = 1.2).
    rhythm_window (`int`, *optional*, defaults to `10`):
        `W`, the clipping window of WAAD (paper default 10).
    rhythm_horizon_lo (`int`, *optional*, defaults to `10`):
        `H_lo`, the nearest receiver counted by FAI (paper default 10).
    rhythm_horizon_hi (`int`, *optional*, defaults to `100`):
        `H_hi`, the farthest receiver counted by FAI (paper v2 default 100; v1 used 50).
    rhythm_quantile (`float`, *optional*, defaults to `0.4`):
        `q`, the fraction of each completion's tokens selected as preplan tokens and as anchors.
    rhythm_gamma_amp (`float`, *optional*, defaults to `1.5`):
        `γ_amp`, the weight of a selected token. `1.0` reproduces the unweighted estimator exactly.
    rhythm_alpha (`float`, *optional*, defaults to `0.5`):
        `α`, the share of a locally dominated anchor's bonus moved to its introductory token (coupled strategy; not
        given by the paper).
    rhythm_k (`int`, *optional*, defaults to `2`):
        Look-back window for dominated anchors and their introductory token (the paper sweeps 1-3).
    rhythm_waad_tau_quantile (`float`, *optional*, defaults to `0.5`):
        `τ_waad` as a per-completion quantile of WAAD (0.5 = median; not given by the paper).
    rhythm_head_frac (`float`, *optional*, defaults to `0.3`):
        Fraction of the sampled heads in each of the local and global groups (the paper's bottom/top 30 %).
    rhythm_num_layers (`int`, *optional*, defaults to `5`):
        Number of layers sampled evenly within the middle third of the network.
    rhythm_layers (`list[int]`, *optional*):
        Explicit 0-indexed layers to sample instead of `rhythm_num_layers` middle-third layers.
    rhythm_head_groups (`str`, *optional*, defaults to `"batch"`):
        Scope of the head ranking: `"batch"` (the generation batch, all processes), `"sequence"` (each completion),
        or `"static"` (ranked once on the first batch, then frozen).
    rhythm_waad_row_shift (`int`, *optional*, defaults to `0`):
        Attention row used for the WAAD of completion token `t`: `0` is the token's own position (paper-literal),
        `-1` the position that predicted it.
    rhythm_capture_batch_size (`int`, *optional*):
        Sequences per forward of the attention capture pass. Defaults to `per_device_train_batch_size`.
    entropy_rho (`float`, *optional*, defaults to `0.2`):
        `ρ`, the fraction of tokens selected as high-entropy forking tokens (the 80/20 paper's 0.2).
    entropy_mode (`str`, *optional*, defaults to `"boost"`):
        `"boost"`: selected tokens get weight `entropy_boost`, others 1. `"mask"`: selected tokens 1, others 0 (the
        80/20 paper; zero weights, so it cannot be renormalized or combined with `top_entropy_quantile`).
    entropy_boost (`float`, *optional*, defaults to `1.5`):
        Weight of the selected tokens in `"boost"` mode (the attention paper's high-entropy baseline uses 1.5).
    entropy_scope (`str`, *optional*, defaults to `"batch"`):
        `"batch"`: tokens whose entropy is at least the `(1 − ρ)` quantile over the generation batch (all processes;
        the 80/20 paper). `"sequence"`: the top `ceil(ρ·T)` tokens of each completion.
    """

    token_weighting: str = field(
        default="none",
        metadata={
            "help": "Per-token weights multiplying any estimator's advantages: 'none', 'preplan', 'anchor', 'rhythm' "
            "(attention rhythm, https://huggingface.co/papers/2510.13554) or 'entropy' (high-entropy forking tokens, "
            "https://huggingface.co/papers/2506.01939).",
            "choices": list(TOKEN_WEIGHTINGS),
        },
    )
    token_weight_sign: str = field(
        default="both",
        metadata={
            "help": "'both': weights apply to every advantage (attention paper v2); 'nonneg': tokens with a negative "
            "advantage keep weight 1 (v1).",
            "choices": ["both", "nonneg"],
        },
    )
    token_weight_renormalize: bool = field(
        default=False,
        metadata={"help": "Rescale each completion's token weights to mean 1 (the papers do not)."},
    )
    rhythm_window: int = field(default=10, metadata={"help": "W, the clipping window of WAAD (paper: 10)."})
    rhythm_horizon_lo: int = field(default=10, metadata={"help": "H_lo, the nearest receiver counted by FAI (10)."})
    rhythm_horizon_hi: int = field(
        default=100, metadata={"help": "H_hi, the farthest receiver counted by FAI (paper v2: 100; v1: 50)."}
    )
    rhythm_quantile: float = field(
        default=0.4, metadata={"help": "q, fraction of each completion's tokens selected as preplans / anchors."}
    )
    rhythm_gamma_amp: float = field(
        default=1.5, metadata={"help": "gamma_amp, the weight of a selected token (1.0 = no weighting)."}
    )
    rhythm_alpha: float = field(
        default=0.5, metadata={"help": "alpha, share of a dominated anchor's bonus moved to its intro token."}
    )
    rhythm_k: int = field(default=2, metadata={"help": "Look-back window for dominated anchors (paper: 1-3)."})
    rhythm_waad_tau_quantile: float = field(
        default=0.5, metadata={"help": "tau_waad as a per-completion quantile of WAAD (0.5 = median)."}
    )
    rhythm_head_frac: float = field(
        default=0.3, metadata={"help": "Fraction of sampled heads in each of the local/global groups (0.3)."}
    )
    rhythm_num_layers: int = field(
        default=5, metadata={"help": "Layers sampled evenly within the middle third of the network (5)."}
    )
    rhythm_layers: list[int] | None = field(
        default=None, metadata={"help": "Explicit 0-indexed layers to sample (overrides rhythm_num_layers)."}
    )
    rhythm_head_groups: str = field(
        default="batch",
        metadata={
            "help": "Scope of the head ranking: 'batch', 'sequence', or 'static' (frozen after the first batch).",
            "choices": ["batch", "sequence", "static"],
        },
    )
    rhythm_waad_row_shift: int = field(
        default=0,
        metadata={"help": "WAAD row of token t: 0 = its own position (paper-literal), -1 = the predicting position."},
    )
    rhythm_capture_batch_size: int | None = field(
        default=None,
        metadata={"help": "Sequences per forward of the attention capture (default: per_device_train_batch_size)."},
    )
    entropy_rho: float = field(default=0.2, metadata={"help": "rho, fraction of high-entropy tokens selected (0.2)."})
    entropy_mode: str = field(
        default="boost",
        metadata={
            "help": "'boost': selected tokens get entropy_boost, others 1; 'mask': others get 0 (80/20 paper).",
            "choices": ["boost", "mask"],
        },
    )
    entropy_boost: float = field(default=1.5, metadata={"help": "Weight of selected tokens in 'boost' mode (1.5)."})
    entropy_scope: str = field(
        default="batch",
        metadata={
            "help": "'batch': entropy >= the (1 - rho) quantile of the generation batch; 'sequence': top ceil(rho*T) "
            "tokens per completion.",
            "choices": ["batch", "sequence"],
        },
    )

    @property
    def uses_attention_weighting(self) -> bool:
        """Whether the token weighting needs the attention capture pass."""
        return self.token_weighting in ("preplan", "anchor", "rhythm")

    def _validate_token_weighting(self) -> None:
        def choice(name, allowed):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}.")

        choice("token_weighting", TOKEN_WEIGHTINGS)
        choice("token_weight_sign", ("both", "nonneg"))
        choice("rhythm_head_groups", ("batch", "sequence", "static"))
        choice("rhythm_waad_row_shift", (0, -1))
        choice("entropy_mode", ("boost", "mask"))
        choice("entropy_scope", ("batch", "sequence"))
        for name in ("rhythm_window", "rhythm_horizon_hi", "rhythm_k", "rhythm_num_layers"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        if int(self.rhythm_horizon_lo) != self.rhythm_horizon_lo or self.rhythm_horizon_lo < 0:
            raise ValueError(f"rhythm_horizon_lo must be a non-negative integer, got {self.rhythm_horizon_lo!r}.")
        if self.rhythm_horizon_lo > self.rhythm_horizon_hi:
            raise ValueError(
                f"rhythm_horizon_lo={self.rhythm_horizon_lo} exceeds rhythm_horizon_hi={self.rhythm_horizon_hi}: FAI "
                "would average over an empty horizon. Use H_lo <= H_hi (the paper: 10 and 100)."
            )
        for name in ("rhythm_quantile", "entropy_rho"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
                raise ValueError(f"{name} must be in (0, 1], got {value!r}.")
        for name in ("rhythm_alpha", "rhythm_waad_tau_quantile"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be in [0, 1], got {value!r}.")
        if not (0.0 < self.rhythm_head_frac <= 0.5):
            raise ValueError(
                f"rhythm_head_frac must be in (0, 0.5] so that the local and global head groups do not overlap, got "
                f"{self.rhythm_head_frac!r}."
            )
        if self.rhythm_layers is not None:
            if not self.rhythm_layers or any(int(l) != l or l < 0 for l in self.rhythm_layers):
                raise ValueError(f"rhythm_layers must be a non-empty list of 0-indexed layers: {self.rhythm_layers}")
        if self.rhythm_capture_batch_size is not None and self.rhythm_capture_batch_size < 1:
            raise ValueError(f"rhythm_capture_batch_size must be >= 1, got {self.rhythm_capture_batch_size}.")

        # Weights must stay strictly positive so that A·w keeps the sign of A (TRL's off-policy mask, SAPO and VESPO
        # branch on it per token). The smallest coupled weight is 1 + (1 + α)(γ_amp − 1) when γ_amp < 1.
        if not math.isfinite(self.rhythm_gamma_amp) or 1 + (1 + self.rhythm_alpha) * min(
            0.0, self.rhythm_gamma_amp - 1
        ) <= 0:
            raise ValueError(
                f"rhythm_gamma_amp={self.rhythm_gamma_amp} can produce non-positive token weights, which would flip or "
                "erase advantage signs. Use rhythm_gamma_amp >= 1 (the paper: 1.5)."
            )
        if not (math.isfinite(self.entropy_boost) and self.entropy_boost > 0):
            raise ValueError(f"entropy_boost must be a positive finite number, got {self.entropy_boost!r}.")

        if self.token_weighting == "entropy" and self.entropy_mode == "mask":
            if self.top_entropy_quantile < 1.0:
                raise ValueError(
                    f"token_weighting='entropy' with entropy_mode='mask' and top_entropy_quantile="
                    f"{self.top_entropy_quantile} would apply two high-entropy masks. Use one: TRL's "
                    "top_entropy_quantile (mask from the current policy in every loss forward, also removing KL and "
                    "the entropy bonus on masked tokens), or entropy_mode='mask' (mask from the generation-time "
                    "policy, on the advantages only), or entropy_mode='boost'."
                )
            if self.token_weight_renormalize:
                raise ValueError(
                    "entropy_mode='mask' gives weight 0 to most tokens, so renormalizing to mean 1 is undefined for a "
                    "completion without a selected token. Set token_weight_renormalize=False or use "
                    "entropy_mode='boost'."
                )
