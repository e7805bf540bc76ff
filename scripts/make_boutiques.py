#!/usr/bin/env python3
"""Write boutiques/qsmrim.json, the Boutiques (schema 0.5) descriptor of the qsmrim command line.

Why generated: the descriptor must say exactly what the parser accepts (options, types, choices, defaults,
bounds); written by hand it drifts the first time an option changes. The parser is the single source;
tests/test_boutiques.py regenerates the descriptor and fails when the committed file differs.

Option value types are read from the parser: numbers by probing the option's type function (integer or
not, smallest/largest accepted value), files by the type function's name; an option of a kind not known
here stops the generator so that nobody ships a descriptor that guesses.

Usage: make_boutiques.py [--output FILE] [--check]   (--check: exit 1 when FILE is not up to date)
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
DESCRIPTOR = REPO / "boutiques" / "qsmrim.json"
# What one participant needs (measured on the CI cluster: scripts/qsmrim_slurm_array.sh --cpus-per-task=2 --mem=4G).
SUGGESTED_RESOURCES = {"cpu-cores": 2, "ram": 4, "walltime-estimate": 3600}
IMAGE = "qsmrim/qsmrim"
# Inputs that name files or folders that must exist (Boutiques "File"); by the parser's type function name.
FILE_TYPES = {"Path", "existing_path", "_bids_filter_file", "_plugin_file"}
# Folders the app creates: plain strings (a Boutiques "File" input must exist before the run).
CREATED_DIRS = {"output_dir", "work_dir"}


class UnknownOption(RuntimeError):
    """An option whose kind this generator does not know how to describe."""


def _accepts(func: Callable[[str], Any], text: str) -> bool:
    try:
        func(text)
    except (argparse.ArgumentTypeError, ValueError, TypeError):
        return False
    return True


def _number_spec(func: Callable[[str], Any]) -> dict[str, Any] | None:
    """Integer/bounds of a numeric type function, by probing it; None when it is not numeric."""
    sample = next((text for text in ("2", "1", "0.5") if _accepts(func, text)), None)
    if sample is None:
        return None
    value = func(sample)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    spec: dict[str, Any] = {"type": "Number", "integer": isinstance(value, int) and not _accepts(func, "2.5")}
    if not _accepts(func, "-1"):
        if _accepts(func, "0"):
            spec["minimum"] = 0
        elif spec["integer"]:
            spec["minimum"] = 1
        else:
            spec.update({"minimum": 0, "exclusive-minimum": True})
    if not spec["integer"] and _accepts(func, "1") and not _accepts(func, "1.0001"):
        spec["maximum"] = 1
    return spec


def _identifier(dest: str) -> str:
    return re.sub(r"_+", "_", re.sub(r"[^0-9A-Za-z_]", "_", dest)).strip("_")


def _flag(action: argparse.Action) -> str:
    """The option's canonical spelling: the first long form (hyphenated in this parser)."""
    longs = [s for s in action.option_strings if s.startswith("--")]
    return (longs or action.option_strings)[0]


def _description(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = parser._get_formatter()  # expands %(default)s and the formatter's "(default: X)"
    text = formatter._expand_help(action) if action.help else ""
    return " ".join(text.split())


def describe_action(parser: argparse.ArgumentParser, action: argparse.Action) -> dict[str, Any]:
    """One Boutiques input for one argparse action."""
    ident = _identifier(action.dest)
    entry: dict[str, Any] = {
        "id": ident,
        "name": ident.replace("_", " ").capitalize(),
        "description": _description(parser, action),
        "value-key": f"[{ident.upper()}]",
        "optional": not (action.required or not action.option_strings),
    }
    if isinstance(action, (argparse._StoreTrueAction, argparse._CountAction)):
        entry.update({"type": "Flag", "command-line-flag": _flag(action)})
        return entry
    if not isinstance(action, argparse._StoreAction):
        raise UnknownOption(f"{action.dest}: argparse action {type(action).__name__} is not described")

    type_name = getattr(action.type, "__name__", None)
    if action.choices is not None:
        choices = list(action.choices)
        kind = "Number" if all(isinstance(c, (int, float)) for c in choices) else "String"
        entry.update({"type": kind, "value-choices": choices})
    elif action.dest in CREATED_DIRS:
        entry["type"] = "String"
    elif type_name in FILE_TYPES:
        entry["type"] = "File"
    elif action.type is None or action.type is str:
        entry["type"] = "String"
    else:
        spec = _number_spec(action.type)
        if spec is not None:
            entry.update(spec)
        elif _accepts(action.type, "abc") and isinstance(action.type("abc"), str):
            entry["type"] = "String"
        else:
            raise UnknownOption(f"{action.dest}: type {type_name!r} is neither a number, a string nor a file")

    if action.option_strings:
        entry["command-line-flag"] = _flag(action)
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        entry["list"] = True
        if action.nargs == "+":
            entry["min-list-entries"] = 1
        elif isinstance(action.nargs, int):
            entry.update({"min-list-entries": action.nargs, "max-list-entries": action.nargs})
    elif action.nargs is not None:
        raise UnknownOption(f"{action.dest}: nargs={action.nargs!r} is not described")
    # No "default-value": Boutiques would then always put the option on the command line, and some options
    # only make sense together (--epochs with --train). The parser's defaults are in the description.
    return entry


def build_descriptor(parser: argparse.ArgumentParser, version: str) -> dict[str, Any]:
    """The whole descriptor; the command line lists the positionals first, then every option."""
    inputs: list[dict[str, Any]] = []
    groups: list[dict[str, Any]] = []
    skip = (argparse._HelpAction, argparse._VersionAction)
    for action in parser._actions:
        if isinstance(action, skip) or action.help == argparse.SUPPRESS:
            continue
        inputs.append(describe_action(parser, action))
    ids = {entry["id"] for entry in inputs}
    for group in parser._action_groups:
        members = [_identifier(a.dest) for a in group._group_actions if _identifier(a.dest) in ids]
        if members and group.title not in ("positional arguments", "options", "optional arguments"):
            groups.append({"id": _identifier(group.title.lower()), "name": group.title, "members": members})
    positional = [e for e in inputs if "command-line-flag" not in e]
    optional = [e for e in inputs if "command-line-flag" in e]
    command = " ".join(["qsmrim", *(e["value-key"] for e in positional + optional)])
    return {
        "name": "qsmrim",
        "tool-version": version,
        "description": " ".join((parser.description or "").split()),
        "author": "The qsmrim developers",
        "url": "https://github.com/qsmrim/qsmrim",
        "command-line": command,
        "schema-version": "0.5",
        "container-image": {"type": "docker", "image": f"{IMAGE}:{version}"},
        "inputs": positional + optional,
        "groups": groups,
        "output-files": [{
            "id": "qsmrim_outputs",
            "name": "qsmrim derivatives",
            "description": "BIDS derivatives dataset: per-lesion tables, lesion maps, reports, group tables",
            "path-template": "[OUTPUT_DIR]",
            "optional": False,
        }],
        "suggested-resources": SUGGESTED_RESOURCES,
        "tags": {"domain": ["neuroinformatics", "mri", "qsm", "multiple-sclerosis"], "bids-app": True},
    }


def render(descriptor: dict[str, Any]) -> str:
    return json.dumps(descriptor, indent=2) + "\n"


def current_text() -> str:
    """The descriptor the current parser gives, as it is committed."""
    sys.path.insert(0, str(REPO))
    from qsmrim_app import __version__
    from qsmrim_app.cli.parser import build_parser

    return render(build_descriptor(build_parser(), __version__))


def main(argv: list[str] | None = None) -> int:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--output", type=Path, default=DESCRIPTOR)
    cli.add_argument("--check", action="store_true", help="only compare; exit 1 when the file is stale")
    args = cli.parse_args(argv)
    text = current_text()
    if args.check:
        if not args.output.is_file() or args.output.read_text() != text:
            print(f"{args.output} is out of date: run scripts/make_boutiques.py", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
