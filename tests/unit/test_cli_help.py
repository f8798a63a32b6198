"""The corral command explains itself: a version, help for every option, no reST in the help."""

from __future__ import annotations

import argparse
from importlib.metadata import version

import pytest

from corral.cli import _parser, main


def _parsers(parser: argparse.ArgumentParser, path: str = "corral") -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _parsers(sub, f"{path} {name}")
    return found


def test_every_option_and_argument_of_every_command_has_help():
    missing = [
        f"{path} {action.option_strings or action.dest}"
        for path, parser in _parsers(_parser())
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction) and not action.help
    ]
    assert missing == []


def test_no_help_text_carries_rest_markup():
    for path, parser in _parsers(_parser()):
        text = parser.format_help()
        assert "``" not in text and ":class:" not in text and ":func:" not in text, path


def test_version_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"corral {version('corral')}"
