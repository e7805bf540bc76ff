"""The exit codes of ``qsmrim``, each with the sentence the help's epilog and the README show.

One table, so the code that returns a status, the ``--help`` text and its test cannot drift apart.
The numbers follow the BIDS Apps execution spec and sysexits.h (64 EX_USAGE, 66 EX_NOINPUT).
"""
from __future__ import annotations

import textwrap

EXIT_OK = 0
EXIT_PARTICIPANT_FAILED = 1
EXIT_BIDS_INVALID = 16
EXIT_NO_DATA = 18
EXIT_USAGE = 64
EXIT_INPUT_MISSING = 66
EXIT_INTERRUPTED = 130

#: code -> what it means to the user (the order of --help's epilog).
EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success: every selected participant/session completed",
    EXIT_PARTICIPANT_FAILED: "a participant/session failed (an unreadable input or a failed step); "
                             "the others complete",
    EXIT_BIDS_INVALID: "BIDS validation failed (see --skip-bids-validation)",
    EXIT_NO_DATA: "the selection (--participant-label, --session-label, --bids-filter-file) matched no data",
    EXIT_USAGE: "usage error (an option or its value)",
    EXIT_INPUT_MISSING: "input missing: a path given does not exist, or a selected participant/session "
                        "lacks a required input (QSM, FLAIR, lesion mask); the others complete",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}


def exit_code_lines(width: int = 79) -> list[str]:
    """``'    0  success: ...'``: each code with its meaning wrapped under it, for the help's epilog."""
    lines: list[str] = []
    for code, meaning in EXIT_CODES.items():
        lines += textwrap.wrap(meaning, width, initial_indent=f"  {code:>3}  ", subsequent_indent=" " * 7)
    return lines
