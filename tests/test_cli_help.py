"""``qsmrim --help``: each option listed once, the aliases still accepted, what -v does, and an epilog
with the exit codes and the companion commands.

Why: the help listed every option twice (with its underscore alias), said -v meant "info" although
INFO is the default, and named neither the exit codes nor ``qsmrim-review``.
"""
from __future__ import annotations

import argparse
import configparser
import re
from pathlib import Path

import pytest

from qsmrim_app.cli.exitcodes import EXIT_CODES
from qsmrim_app.cli.parser import build_parser, visible_option_strings
from qsmrim_app.cli.run import main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def help_text() -> str:
    return build_parser().format_help()


def _options_part(text: str) -> str:
    return text.split("\nexit codes:", 1)[0]


def test_each_option_is_listed_once_without_underscore_aliases(help_text: str) -> None:
    options = _options_part(help_text)
    assert not re.search(r"--[a-z0-9-]*_[a-z0-9_]*", options), re.findall(r"--[a-z0-9-]*_[a-z0-9_]*", options)
    parser = build_parser()
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        shown = visible_option_strings(action.option_strings)
        assert shown, action.option_strings
        # the entry's first line starts with its spellings; each spelling heads exactly one entry
        entries = re.findall(rf"^  {re.escape(shown[0])}[ ,\n]", options, re.M)
        assert len(entries) == 1, (shown[0], entries)


@pytest.mark.parametrize("alias, canonical", [
    (["--participant_label", "01"], ["--participant-label", "01"]),
    (["--session_label", "1"], ["--session-label", "1"]),
    (["--work_dir", "/tmp/w"], ["--work-dir", "/tmp/w"]),
    (["--n_cpus", "2"], ["--nprocs", "2"]),
    (["--mem_gb", "3"], ["--mem-gb", "3"]),
    (["--skip_bids_validation"], ["--skip-bids-validation"]),
    (["--no_classify"], ["--no-classify"]),
    (["--lesion_split", "none"], ["--lesion-split", "none"]),
    (["--min_lesion_voxels", "5"], ["--min-lesion-voxels", "5"]),
])
def test_hidden_aliases_still_parse(alias: list[str], canonical: list[str]) -> None:
    parser = build_parser()
    positional = ["bids", "out", "participant"]
    assert parser.parse_args(positional + alias) == parser.parse_args(positional + canonical)


def test_verbose_help_says_info_is_the_default(help_text: str) -> None:
    entry = help_text.split("-v, --verbose", 1)[1].split("\n\n", 1)[0]
    entry = " ".join(entry.split())
    assert "the default is INFO" in entry and "-vv everything at DEBUG" in entry
    assert "(default: 0)" not in entry


def test_epilog_gives_exit_codes_and_companion_commands(capsys: pytest.CaptureFixture) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    epilog = text.split("\nexit codes:", 1)[1]
    for code, meaning in EXIT_CODES.items():
        line = next(line for line in epilog.splitlines() if line.startswith(f"  {code:>3}  "))
        assert line.split(None, 1)[1] in " ".join(meaning.split()), (code, line)
    assert max(map(len, epilog.splitlines())) <= 80
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    scripts = setup["options.entry_points"]["console_scripts"]
    for command in ("qsmrim-review", "qsmrim-synth"):
        assert f"\n  {command} " in epilog and f"{command} =" in scripts
    assert "logs/" in epilog
