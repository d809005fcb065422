"""Checks on what reward functions return, before TRL turns it into a tensor.

TRL's `GRPOTrainer._calculate_rewards` passes a reward function's output straight to `torch.tensor`, so a function that
returns strings fails with `too many dimensions 'str'` (or `could not convert`), naming neither the function nor the
value. `trl_credit.GRPOTrainer` wraps every reward function with [`checked_reward_funcs`] for that call: a wrong output
is an error that names the function, the completion's index and the value.

    with validated_reward_funcs(trainer):   # trainer.reward_funcs are checked wrappers inside the block
        rewards_per_func = trl_calculate_rewards(...)
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import numbers
from collections.abc import Callable, Iterator, Sequence
from typing import Any


def _is_async_callable(func: Callable) -> bool:
    # The same test as TRL's `is_async_callable`: functions, partials of them, and objects with an async `__call__`.
    while isinstance(func, functools.partial):
        func = func.func
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(getattr(func, "__call__", None))


def _as_float(value: Any) -> float | None:
    """`float(value)` for a real number (Python, NumPy or a one-element torch tensor), `None` for anything else."""
    if isinstance(value, numbers.Real):  # int, float, bool, NumPy's real scalars
        return float(value)
    shape = getattr(value, "shape", None)
    if shape is not None and tuple(shape) in ((), (1,)) and hasattr(value, "item") and hasattr(value, "dtype"):
        dtype = str(value.dtype)
        if not any(kind in dtype for kind in ("complex", "str", "object", "<U", "|S")):
            item = value.item()
            if isinstance(item, numbers.Real):
                return float(item)
    return None


def check_reward_output(output: Any, name: str, num_completions: int | None = None) -> list[float | None]:
    """
    The rewards `output` as a list of `float` or `None` (one per completion), or an error naming the reward function
    `name`, the completion's index and the offending value.

    Accepted: a list, tuple, 1-D NumPy array or 1-D torch tensor (or any other finite iterable) of real numbers
    (`int`, `float`, `bool`, NumPy and 0-d torch scalars) and `None` (no reward: TRL skips the completion). Non-finite
    numbers are passed through unchanged (the trainer's own rule handles them).

    Raises:
        `TypeError`: the output is not a sequence (`None`, a number, a string, a dict), or an element is not a real
            number or `None` (a string, a list, a complex number).
        `ValueError`: `num_completions` is given and the output has another length.
    """
    fix = "a reward function must return one number (float, int or bool) or None per completion"
    if output is None or isinstance(output, (str, bytes, dict, numbers.Number)):
        raise TypeError(f"The reward function {name!r} returned {_describe(output)} instead of a list; {fix}.")
    shape = getattr(output, "shape", None)
    if shape is not None and len(shape) != 1:
        raise TypeError(
            f"The reward function {name!r} returned an array of shape {tuple(shape)}; {fix}, i.e. a 1-D sequence."
        )
    try:
        values = list(output)
    except TypeError:
        raise TypeError(
            f"The reward function {name!r} returned {_describe(output)}, which is not a sequence; {fix}."
        ) from None
    if num_completions is not None and len(values) != num_completions:
        raise ValueError(
            f"The reward function {name!r} returned {len(values)} rewards for {num_completions} completions; it must "
            "return exactly one reward per completion."
        )
    rewards: list[float | None] = []
    for index, value in enumerate(values):
        if value is None:
            rewards.append(None)
            continue
        number = _as_float(value)
        if number is None:
            hint = " (a number written as a string: convert it with float())" if _numeric_string(value) else ""
            raise TypeError(
                f"The reward function {name!r} returned {_describe(value)} for completion {index}{hint}; {fix}."
            )
        rewards.append(number)
    return rewards


def _numeric_string(value: Any) -> bool:
    if not isinstance(value, (str, bytes)):
        return False
    try:
        float(value)
    except ValueError:
        return False
    return True


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__name__} {text}"


class CheckedRewardFunc:
    """A synchronous reward function whose output goes through [`check_reward_output`]."""

    def __init__(self, func: Callable, name: str):
        self.func = func
        self.__name__ = name
        functools.update_wrapper(self, func, assigned=("__doc__", "__module__", "__qualname__"), updated=())

    def __call__(self, *args, **kwargs) -> list[float | None]:
        output = self.func(*args, **kwargs)
        return check_reward_output(output, self.__name__, _num_completions(kwargs))


class CheckedAsyncRewardFunc(CheckedRewardFunc):
    """An `async` reward function whose awaited output goes through [`check_reward_output`]."""

    async def __call__(self, *args, **kwargs) -> list[float | None]:
        output = await self.func(*args, **kwargs)
        return check_reward_output(output, self.__name__, _num_completions(kwargs))


def _num_completions(kwargs: dict) -> int | None:
    completions = kwargs.get("completions")
    return len(completions) if isinstance(completions, Sequence) else None


def checked_reward_funcs(funcs: Sequence[Callable], names: Sequence[str]) -> list[Callable]:
    """`funcs` with every plain or `async` function wrapped by its checker; reward models (`torch.nn.Module`, whose
    logits TRL reads itself) are returned as they are."""
    import torch

    out: list[Callable] = []
    for func, name in zip(funcs, names, strict=True):
        if isinstance(func, torch.nn.Module) or isinstance(func, CheckedRewardFunc):
            out.append(func)
        elif _is_async_callable(func):
            out.append(CheckedAsyncRewardFunc(func, name))
        else:
            out.append(CheckedRewardFunc(func, name))
    return out


@contextlib.contextmanager
def validated_reward_funcs(trainer) -> Iterator[None]:
    """Within the block, `trainer.reward_funcs` (a TRL `GRPOTrainer`'s) are checked wrappers named after
    `trainer.reward_func_names`; the original list is put back afterwards, whatever happens."""
    funcs = trainer.reward_funcs
    trainer.reward_funcs = checked_reward_funcs(funcs, trainer.reward_func_names)
    try:
        yield
    finally:
        trainer.reward_funcs = funcs
