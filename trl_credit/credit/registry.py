"""One dict of advantage estimators and a decorator to add to it (verl's semantics, nothing more)."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

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
    >>> @register_advantage_estimator("centered")
    ... def centered(batch):
    ...     return CreditOutput(advantages=batch.rewards - batch.rewards.nanmean())
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
    """Call `fn(batch, **hyper_parameters)`, taking hyper-parameters from `config` fields, then `overrides`."""
    kwargs = estimator_kwargs(fn, config) if config is not None else {}
    kwargs.update(overrides)
    out = fn(batch, **kwargs)
    if not isinstance(out, CreditOutput):
        raise TypeError(f"The advantage estimator {fn.__qualname__} returned {type(out).__name__}, not CreditOutput.")
    return out
