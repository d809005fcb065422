"""`trl-credit <command> [args]`: each command is a module with a `main(argv: list[str]) -> int | None`."""

from __future__ import annotations

import importlib
import sys


# command -> (module, one-line description). A module parses its own arguments.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("trl_credit.demo", "every estimator on an embedded task, on CPU: learning curves, credit maps, report"),
    "eval": ("trl_credit.evaluation", "sample a model on GSM8K/MATH/MATH-500 and report pass@1, maj@k, pass@k"),
    "train": ("trl_credit.train", "train on GSM8K/MATH from a YAML recipe (TRL-style, with CLI overrides)"),
}


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
    module = importlib.import_module(SUBCOMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
