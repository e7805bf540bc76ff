"""What both commands (``qsmrim`` and ``qsmrim-review``) share on the command line: the parser class
(usage errors exit 64), the help formatter, the exit codes and the number and path types."""
from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path
from typing import Callable, NoReturn

from .exitcodes import EXIT_INPUT_MISSING, EXIT_USAGE  # noqa: F401  (the one table of codes)
# Set by the container image (see Dockerfile) so outputs record the exact image they came from.
CONTAINER_ENV = "QSMRIM_CONTAINER"


def container_name() -> str | None:
    """The image this process runs in, as the image's environment names it (None outside one)."""
    return os.environ.get(CONTAINER_ENV) or None


class ArgumentParser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors exit 64 (EX_USAGE), as the BIDS Apps spec asks."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show '(default: X)' only where X tells the user something (not None, False or empty).

    Each option is listed once: the underscore spellings (``--participant_label``, kept because other
    BIDS Apps accept them) still parse but are left out of the help. Epilog lines that start with
    spaces (the exit-code table) are kept as written; other paragraphs are reflowed.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == [] \
                or isinstance(action, argparse._CountAction):  # -v: the help says what 0 means
            return action.help
        return super()._get_help_string(action)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        shown = visible_option_strings(action.option_strings)
        if shown != list(action.option_strings):
            action = copy.copy(action)  # the parser keeps every spelling; only the help drops some
            action.option_strings = shown
        return super()._format_action_invocation(action)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        fill = super()._fill_text
        return "\n".join(indent + line if line.startswith("  ") else fill(line, width, indent) if line else ""
                         for line in text.split("\n"))


def visible_option_strings(option_strings: list[str]) -> list[str]:
    """The spellings ``--help`` shows: all but the ``--snake_case`` aliases (at least one is kept)."""
    shown = [s for s in option_strings if not (s.startswith("--") and "_" in s)]
    return shown or list(option_strings[:1])


def int_in_range(minimum: int, maximum: int | None = None, what: str = "an integer",
                 hint: str = "") -> Callable[[str], int]:
    """An argparse type: an integer within [minimum, maximum] (no upper bound when None)."""
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not {what}") from None
        if maximum is None and number < minimum:
            raise argparse.ArgumentTypeError(f"{value!r} must be >= {minimum}")
        if maximum is not None and not minimum <= number <= maximum:
            raise argparse.ArgumentTypeError(f"{value!r} must be within {minimum}..{maximum}{hint}")
        return number
    parse.__name__ = f"int>={minimum}" if maximum is None else f"int{minimum}..{maximum}"
    return parse


positive_int = int_in_range(1)
non_negative_int = int_in_range(0)
at_least_two = int_in_range(2)  # cross-validation needs two folds


def _number(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None


def positive_float(value: str) -> float:
    number = _number(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be > 0")
    return number


def probability(value: str) -> float:
    number = _number(value)
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"{value!r} must be a probability in [0, 1]")
    return number


def existing_path(value: str) -> Path:
    path = Path(value).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{value} does not exist")
    return path.absolute()
