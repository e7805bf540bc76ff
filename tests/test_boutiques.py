"""boutiques/qsmrim.json is what scripts/make_boutiques.py makes from today's parser, and it is usable.

Why: the descriptor is generated, so the one failure that matters is drift: an option added, renamed or
retyped without regenerating. Beyond equality, a command line substituted from the descriptor (the way
Boutiques fills value-keys) must parse with the real parser to the same values.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from qsmrim_app import __version__
from qsmrim_app.cli.parser import build_parser

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import make_boutiques as mb  # noqa: E402

ID_RE = re.compile(r"^[0-9,_,a-z,A-Z]*$")  # the schema's pattern for input/output/group ids


@pytest.fixture(scope="module")
def descriptor() -> dict[str, Any]:
    return json.loads(mb.DESCRIPTOR.read_text())


def test_committed_descriptor_matches_the_parser() -> None:
    assert mb.DESCRIPTOR.read_text() == mb.current_text(), "stale: run scripts/make_boutiques.py and commit"
    assert mb.main(["--check"]) == 0


def test_check_mode_detects_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "qsmrim.json"
    stale.write_text(mb.current_text().replace('"--nprocs"', '"--n-procs"'))
    assert mb.main(["--check", "--output", str(stale)]) == 1
    assert mb.main(["--output", str(stale)]) == 0 and mb.main(["--check", "--output", str(stale)]) == 0


def test_descriptor_follows_the_schema_rules(descriptor: dict[str, Any]) -> None:
    assert descriptor["schema-version"] == "0.5" and descriptor["tool-version"] == __version__
    assert descriptor["container-image"] == {"type": "docker", "image": f"qsmrim/qsmrim:{__version__}"}
    ids = [e["id"] for e in descriptor["inputs"] + descriptor["output-files"] + descriptor["groups"]]
    assert len(ids) == len(set(ids)), "ids must be unique across inputs, outputs and groups"
    assert all(ID_RE.match(i) for i in ids)
    cmd = descriptor["command-line"]
    input_ids = {e["id"] for e in descriptor["inputs"]}
    for entry in descriptor["inputs"]:
        assert entry["type"] in ("String", "File", "Flag", "Number")
        assert cmd.count(entry["value-key"]) == 1
        if entry["type"] == "Flag":
            assert entry.get("command-line-flag") and not entry.get("list")
        if "value-choices" in entry:
            assert entry["type"] in ("String", "Number")
        if any(k in entry for k in ("integer", "minimum", "maximum")):
            assert entry["type"] == "Number"
        if any(k in entry for k in ("min-list-entries", "max-list-entries")):
            assert entry.get("list") is True
    for group in descriptor["groups"]:
        assert set(group["members"]) <= input_ids
    assert descriptor["output-files"][0]["path-template"] == "[OUTPUT_DIR]"


def test_every_parser_option_is_described_with_its_constraints(descriptor: dict[str, Any]) -> None:
    parser = build_parser()
    by_flag = {e.get("command-line-flag"): e for e in descriptor["inputs"]}
    described = {e["id"] for e in descriptor["inputs"]}
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)) or action.help == argparse.SUPPRESS:
            continue  # hidden options (removed ones that only explain what replaced them) are not described
        assert action.dest in described, f"{action.dest} missing from the descriptor"
        if action.option_strings:
            entry = by_flag[[s for s in action.option_strings if s.startswith("--")][0]]
            assert entry["optional"] is True
            if action.choices:
                assert entry["value-choices"] == list(action.choices)
    positional = [e["id"] for e in descriptor["inputs"] if "command-line-flag" not in e]
    assert positional == ["bids_dir", "output_dir", "analysis_level"]
    assert descriptor["command-line"].startswith("qsmrim [BIDS_DIR] [OUTPUT_DIR] [ANALYSIS_LEVEL] ")
    entries = {e["id"]: e for e in descriptor["inputs"]}
    assert entries["nprocs"]["integer"] is True and entries["nprocs"]["minimum"] == 1
    assert entries["threshold"]["minimum"] == 0 and entries["threshold"]["maximum"] == 1
    assert entries["patch_extent_mm"]["min-list-entries"] == entries["patch_extent_mm"]["max-list-entries"] == 3
    assert entries["analysis_level"]["value-choices"] == ["participant", "group"]


def _substitute(descriptor: dict[str, Any], invocation: dict[str, Any]) -> list[str]:
    """Fill the command line the way Boutiques does: flag + value(s), Flags alone, absent inputs dropped."""
    cmd = descriptor["command-line"]
    for entry in descriptor["inputs"]:
        value = invocation.get(entry["id"])
        if value is None or value is False:
            text = ""
        elif entry["type"] == "Flag":
            text = entry["command-line-flag"]
        else:
            values = value if entry.get("list") else [value]
            text = " ".join([*(entry.get("command-line-flag"),) * ("command-line-flag" in entry), *map(str, values)])
        cmd = cmd.replace(entry["value-key"], text)
    return cmd.split()


def test_substituted_command_line_parses_to_the_invocation(descriptor: dict[str, Any], tmp_path: Path) -> None:
    bids = tmp_path / "bids"
    bids.mkdir()
    invocation = {"bids_dir": str(bids), "output_dir": str(tmp_path / "out"), "analysis_level": "participant",
                  "participant_label": ["01", "02"], "nprocs": 3, "threshold": 0.25, "patch_extent_mm": [20, 20, 20],
                  "device": "cpu", "skip_bids_validation": True, "verbose": True}
    argv = _substitute(descriptor, invocation)
    assert argv[0] == "qsmrim"
    ns = build_parser().parse_args(argv[1:])
    assert Path(ns.bids_dir) == bids and ns.analysis_level == "participant"
    assert ns.participant_label == ["01", "02"] and ns.nprocs == 3 and ns.threshold == 0.25
    assert list(ns.patch_extent_mm) == [20, 20, 20] and ns.device == "cpu"
    assert ns.skip_bids_validation is True and ns.verbose == 1


def test_generator_refuses_options_it_cannot_describe() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--odd", type=lambda v: complex(v))
    with pytest.raises(mb.UnknownOption, match="odd"):
        mb.build_descriptor(parser, "0")
    parser = argparse.ArgumentParser()
    parser.add_argument("--maybe", nargs="?")
    with pytest.raises(mb.UnknownOption, match="nargs"):
        mb.build_descriptor(parser, "0")
