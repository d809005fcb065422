"""One dict of advantage estimators, a decorator to add to it (verl's semantics), and the check of what an estimator
returns."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import numbers
from collections.abc import Callable
from typing import Any

import torch

from .batch import CreditBatch, CreditOutput


ADVANTAGE_ESTIMATORS: dict[str, Callable[..., CreditOutput]] = {}

# What the trainer must put into the `CreditBatch` (or run) before calling an estimator. An estimator declares the
# capabilities it needs when it registers; the trainer never special-cases estimator names.
KNOWN_REQUIREMENTS = frozenset({"mc_values", "critic_values", "segments"})


def register_advantage_estimator(name: str, *, requires: tuple[str, ...] = (), sequence_level: bool = False):
    """
    Register `fn(batch: CreditBatch, *, <hyper-parameters>) -> CreditOutput` under `name`.

    Keyword-only parameters of the estimator are filled from the config fields of the same name (e.g. an estimator
    with a `scale_rewards` parameter receives `args.scale_rewards`), so a new estimator needs no trainer change.
    `requires` lists what the trainer must prepare: `"mc_values"` (Monte-Carlo values of step states, VinePPO),
    `"critic_values"` (a learned critic, PPO), `"segments"` (segment ids from the configured segmentation).
    `sequence_level=True` declares that the estimator returns one advantage per completion `(N,)`, which keeps
    TRL's sequence-level loss paths (Liger, `importance_sampling_level="sequence"`) available.

    Registering the same function twice is allowed; another function under a taken name raises `ValueError`.

    Example:
    ```python
    >>> from trl_credit.credit import CreditOutput, register_advantage_estimator
    >>> @register_advantage_estimator("centered", sequence_level=True)
    ... def centered(batch):
    ...     return CreditOutput(advantages=(batch.rewards - batch.rewards.nanmean()).nan_to_num(0.0))
    ```
    """
    unknown = set(requires) - KNOWN_REQUIREMENTS
    if unknown:
        raise ValueError(f"Unknown requirement(s) {sorted(unknown)}; known: {sorted(KNOWN_REQUIREMENTS)}.")

    def decorator(fn):
        existing = ADVANTAGE_ESTIMATORS.get(name)
        if existing is not None and existing is not fn:
            raise ValueError(
                f"An advantage estimator named {name!r} is already registered ({existing.__module__}."
                f"{existing.__qualname__}); choose another name."
            )
        fn.credit_requires = frozenset(requires)
        fn.credit_sequence_level = sequence_level
        fn.credit_name = name
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return decorator


def get_advantage_estimator(name: str) -> Callable[..., CreditOutput]:
    """
    Look up an estimator by registered name, or import it from a dotted path (`"my_module.my_estimator"`).

    Raises `ValueError` naming the registered estimators when the name is unknown.
    """
    if name in ADVANTAGE_ESTIMATORS:
        return ADVANTAGE_ESTIMATORS[name]
    if "." in name:
        module_name, _, attr = name.rpartition(".")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"Could not import the advantage estimator {name!r}: {e}") from e
        if not callable(fn):
            raise ValueError(f"The advantage estimator {name!r} is not callable.")
        if not hasattr(fn, "credit_requires"):  # a plain function: token-level, needs nothing prepared
            fn.credit_requires = frozenset()
            fn.credit_sequence_level = False
            fn.credit_name = name
        return fn
    raise ValueError(
        f"Unknown advantage_estimator {name!r}. Registered estimators: {sorted(ADVANTAGE_ESTIMATORS)}; or pass the "
        "dotted import path of a function `fn(batch: CreditBatch, **hyper_parameters) -> CreditOutput`."
    )


def estimator_kwargs(fn: Callable, config: Any) -> dict[str, Any]:
    """The keyword-only parameters of `fn` that `config` has a field for, read from `config`."""
    params = inspect.signature(fn).parameters.values()
    return {p.name: getattr(config, p.name) for p in params if p.kind is p.KEYWORD_ONLY and hasattr(config, p.name)}


def call_estimator(fn: Callable, batch: CreditBatch, config: Any = None, **overrides) -> CreditOutput:
    """
    Call `fn(batch, **hyper_parameters)`, taking hyper-parameters from `config` fields, then `overrides`, and check
    what it returned ([`validate_credit_output`]) before anything uses it.
    """
    kwargs = estimator_kwargs(fn, config) if config is not None else {}
    kwargs.update(overrides)
    out = fn(batch, **kwargs)
    name = getattr(fn, "credit_name", getattr(fn, "__qualname__", repr(fn)))
    validate_credit_output(out, batch, name=name, sequence_level=getattr(fn, "credit_sequence_level", False))
    return out


# Tensor fields of `CreditOutput` in which NaN is a documented value ("no value target"); ±inf never is.
_NAN_ALLOWED = frozenset({"returns"})


def validate_credit_output(out: Any, batch: CreditBatch, *, name: str, sequence_level: bool = False) -> None:
    """
    Check an estimator's output against its batch, so that a bad output fails here, naming the estimator, instead of
    failing later with a shape error, being silently cropped, or silently zeroed.

    - `advantages`: a floating tensor of shape `(N,)` for an estimator registered with `sequence_level=True`, `(N, T)`
      otherwise, finite on every loss token (`batch.mask`; for `(N,)`, on every completion with a loss token);
    - every other tensor field (`returns`, `loss_mask`, …): shape `(N, T)`, a floating (or boolean) dtype, no ±inf
      anywhere (`NaN` only where documented: `returns` of completions without a value target); `loss_mask` ≥ 0;
    - `metrics`: a dict from names to numbers.

    Raises:
        `TypeError` or `ValueError` naming the estimator, the field and the expected shape.
    """
    if not isinstance(out, CreditOutput):
        raise TypeError(f"The advantage estimator {name!r} returned {type(out).__name__}, not CreditOutput.")
    N, T = batch.completion_ids.shape
    expected = (N,) if sequence_level else (N, T)
    what = (
        "one advantage per completion (registered with sequence_level=True)"
        if sequence_level
        else "one advantage per token of the batch's completion_ids (for one per completion, register the estimator "
        "with sequence_level=True)"
    )
    adv = out.advantages
    if not isinstance(adv, torch.Tensor):
        raise TypeError(f"The advantage estimator {name!r} returned advantages of type {type(adv).__name__}, "
                        f"expected a torch.Tensor of shape {expected}.")  # fmt: skip
    if tuple(adv.shape) != expected:
        raise ValueError(
            f"The advantage estimator {name!r} returned advantages of shape {tuple(adv.shape)}, expected {expected}: "
            f"{what}, N={N} completions, T={T} tokens."
        )
    if not adv.is_floating_point():
        raise TypeError(f"The advantage estimator {name!r} returned advantages of dtype {adv.dtype}, expected a "
                        "floating dtype (e.g. torch.float32).")  # fmt: skip
    loss = batch.mask.to(adv.device) > 0
    if sequence_level:
        loss = loss.any(dim=1)
    bad = loss & ~torch.isfinite(adv)
    if bad.any():
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"The advantage estimator {name!r} returned {int(bad.sum())} non-finite advantage(s) (NaN or ±inf) on "
            f"loss tokens, the first at {'row' if sequence_level else '(row, token)'} "
            f"{where[0] if sequence_level else where}. Advantages must be finite wherever batch.mask is 1: give 0 "
            "where there is no signal (e.g. unscorable completions, whose reward is NaN)."
        )
    for f in dataclasses.fields(out):
        x = getattr(out, f.name)
        if f.name == "advantages" or not isinstance(x, torch.Tensor):
            continue
        if tuple(x.shape) != (N, T):
            raise ValueError(f"The advantage estimator {name!r} returned {f.name} of shape {tuple(x.shape)}, "
                             f"expected {(N, T)} (N={N} completions, T={T} tokens).")  # fmt: skip
        if not (x.is_floating_point() or x.dtype == torch.bool):
            raise TypeError(f"The advantage estimator {name!r} returned {f.name} of dtype {x.dtype}, expected a "
                            "floating dtype.")  # fmt: skip
        if x.dtype == torch.bool:
            continue
        bad = torch.isinf(x) if f.name in _NAN_ALLOWED else ~torch.isfinite(x)
        if bad.any():
            raise ValueError(
                f"The advantage estimator {name!r} returned {int(bad.sum())} "
                f"{'infinite' if f.name in _NAN_ALLOWED else 'non-finite'} value(s) in {f.name}, the first at (row, "
                f"token) {tuple(int(i) for i in bad.nonzero()[0])}."
                + (" Use NaN for completions without a value target." if f.name in _NAN_ALLOWED else "")
            )
        if f.name == "loss_mask" and (x < 0).any():
            raise ValueError(f"The advantage estimator {name!r} returned a negative loss_mask; it holds loss "
                             "weights >= 0.")  # fmt: skip
    if not isinstance(out.metrics, dict):
        raise TypeError(f"The advantage estimator {name!r} returned metrics of type {type(out.metrics).__name__}, "
                        "expected a dict from names to numbers.")  # fmt: skip
    for key, value in out.metrics.items():
        is_number = isinstance(value, numbers.Real) or (isinstance(value, torch.Tensor) and value.numel() == 1)
        if not isinstance(key, str) or not is_number:
            raise TypeError(f"The advantage estimator {name!r} returned the metric {key!r}: {value!r}; metrics map "
                            "names (str) to numbers.")  # fmt: skip
