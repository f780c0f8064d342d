"""Every flag of every training script still parses, with the same default, type, choices and nargs.

The snapshot (``fixtures/cli_flags.json``) was written from the trainer before its redesign (issue 20); the parser
is rebuilt here through the scripts themselves (``--help``), so the test does not depend on how the trainer builds
it. Regenerate after a deliberate flag change with ``python tests/training/test_cli_flags.py --write``."""

import argparse
import contextlib
import io
import json
import runpy
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest

REPO = Path(__file__).resolve().parents[2]
SNAPSHOT = Path(__file__).parent / "fixtures" / "cli_flags.json"
SCRIPTS = ["train_examples/train_maskdit.py", "train_examples/train_mdt.py",
           "train_examples/train_deferred_maskdit.py", "train_examples/train_dit.py"]


def _parser_of(script: str) -> argparse.ArgumentParser:
    """The parser that ``script --help`` builds (captured where it parses; --help then exits)."""
    parsers: List[argparse.ArgumentParser] = []
    real = argparse.ArgumentParser.parse_known_args

    def spy(self, *args, **kwargs):
        parsers.append(self)
        return real(self, *args, **kwargs)

    argv = sys.argv
    argparse.ArgumentParser.parse_known_args = spy
    sys.argv = [script, "--help"]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                runpy.run_path(str(REPO / script), run_name="__main__")
            except SystemExit:
                pass
    finally:
        argparse.ArgumentParser.parse_known_args = real
        sys.argv = argv
    assert parsers, f"{script} --help built no parser"
    return parsers[0]


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def describe(parser: argparse.ArgumentParser) -> Dict[str, Dict[str, Any]]:
    """``{first option string: {options, dest, default, type, choices, nargs, action}}`` of every flag."""
    flags = {}
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        flags[action.option_strings[0]] = {
            "options": list(action.option_strings),
            "dest": action.dest,
            "default": _plain(parser.get_default(action.dest)),
            "type": getattr(action.type, "__name__", None) if action.type is not None else None,
            "choices": _plain(list(action.choices)) if action.choices is not None else None,
            "nargs": _plain(action.nargs),
            "action": type(action).__name__,
        }
    return flags


def snapshot() -> Dict[str, Dict[str, Dict[str, Any]]]:
    return {script: describe(_parser_of(script)) for script in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_still_parses_with_its_default(script):
    expected = json.loads(SNAPSHOT.read_text())[script]
    got = describe(_parser_of(script))
    assert sorted(got) == sorted(expected), (
        f"flags added: {sorted(set(got) - set(expected))}, removed: {sorted(set(expected) - set(got))}")
    changed = {flag: (expected[flag], got[flag]) for flag in expected if got[flag] != expected[flag]}
    assert not changed, json.dumps(changed, indent=1)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_accepts_its_default_on_the_command_line(script):
    """Passing each flag explicitly (its default value, or the switch) parses: no flag lost its action."""
    parser = _parser_of(script)
    for flag, spec in describe(parser).items():
        if spec["action"] in ("_StoreTrueAction", "BooleanOptionalAction"):
            argv = [flag]
        elif spec["default"] is None:
            continue  # no value to pass that is valid without context
        elif isinstance(spec["default"], list):
            argv = [flag, *map(str, spec["default"])]
        else:
            argv = [flag, str(spec["default"])]
        parser.parse_known_args(argv)


if __name__ == "__main__" and "--write" in sys.argv:
    SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
    SNAPSHOT.write_text(json.dumps(snapshot(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {SNAPSHOT}")
