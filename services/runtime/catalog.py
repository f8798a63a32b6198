"""Loading definitions (YAML or JSON files, from one or several paths) into a validated
:class:`~contracts.definitions.Catalog`, with every problem of every file reported at once.

Each problem reads ``file:line: path.to.key: message`` (``services/runtime/definition_locations.py``).
A file with problems does not stop the others from being checked, nor the definitions of that
file that have none: cross-references are checked over everything that could be read, and a
reference to a definition that could not be read is not reported a second time.

YAML is parsed with libyaml where it is installed; line numbers are worked out only for files
that have a problem. ``python_paths`` folders are added to ``sys.path`` here, so that the
services importing ``python`` tools and ``function`` nodes find them.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from contracts.definitions import Catalog, DefinitionError, DefinitionsFile
from contracts.definitions_base import Location, Problem
from contracts.graphs import FunctionNode
from contracts.workflows import FunctionStep
from services.runtime.definition_locations import LineMap, LocatedProblem, dotted, problems_of
from services.runtime.loop import collector_paused

SUFFIXES = (".yaml", ".yml", ".json")
SCHEMA_SUFFIX = ".schema.json"  # a JSON Schema kept next to the definitions, for editors: not read
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_NAME_KEYS = {"tenants": "tenant"}  # the key that names an item of each list (default: name)


def split_paths(value: str) -> list[Path]:
    """``CORRAL_DEFINITIONS``: one path, or several separated by ``os.pathsep`` (``:``), like ``PATH``."""
    return [Path(part) for part in value.split(os.pathsep) if part]


def configured_paths(setting: str | None, state_dir: Path) -> list[Path]:
    """The paths the services read: ``CORRAL_DEFINITIONS`` if set (all of them, merged: the demo is
    not added), else the state directory's ``definitions/``."""
    return split_paths(setting) if setting else [state_dir / "definitions"]


@dataclass
class Checked:
    """The outcome of checking definitions: the catalog (None when there were problems) and the problems."""

    catalog: Catalog | None
    problems: list[LocatedProblem]
    files: list[Path]

    def report(self) -> str:
        return "\n".join(str(problem) for problem in self.problems)


def load_catalog(paths: Path | Sequence[Path]) -> Catalog:
    """Load every definitions file under ``paths`` (files, or folders read in name order);
    raises :class:`DefinitionError` listing every problem, one per line."""
    checked = check_definitions(paths)
    if checked.catalog is None:
        raise DefinitionError(checked.report())
    return checked.catalog


def check_definitions(paths: Path | Sequence[Path], *, imports: bool = False) -> Checked:
    """Check every definitions file under ``paths``; with ``imports``, also import every Python
    callable they name (what the services do when they start). The cycle collector is paused
    meanwhile (``collector_paused``: with 10,000 tenants, 1.0 s against 0.42 s)."""
    with collector_paused():
        return _check_definitions(paths, imports=imports)


def _check_definitions(paths: Path | Sequence[Path], *, imports: bool) -> Checked:
    files, problems = _files([paths] if isinstance(paths, Path) else list(paths))
    loaded = [_File.load(path) for path in files]
    for file in loaded:
        file.add_python_paths()
    readable = [file for file in loaded if file.definitions is not None]
    broken = {name for file in loaded for name in file.broken_names}
    catalog = None
    try:
        catalog = Catalog.merge([file.definitions for file in readable])  # type: ignore[misc]
    except DefinitionError as error:
        for problem in error.problems:
            if problem.unknown is None or problem.unknown not in broken:
                readable[problem.file or 0].add(problem, kept=True)
    if imports:
        with _services_import_path():
            for file in readable:
                file.check_imports()
    for file in loaded:
        problems += file.located()
    if problems:
        catalog = None
    return Checked(catalog, problems, files)


def _files(paths: list[Path]) -> tuple[list[Path], list[LocatedProblem]]:
    files: list[Path] = []
    problems: list[LocatedProblem] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if _is_definitions(p))
            if not found:
                problems.append(LocatedProblem(path, 0, "", "no definitions files (*.yaml, *.yml, *.json) here"))
            files += found
        elif path.is_file():
            files.append(path)
        else:
            problems.append(LocatedProblem(path, 0, "", "no such file or folder"))
    if not paths:
        problems.append(LocatedProblem(Path("."), 0, "", "no definitions paths given"))
    unique = list({file.resolve(): file for file in reversed(files)}.values())[::-1]  # each file once
    return unique, problems


def _is_definitions(path: Path) -> bool:
    return path.is_file() and path.suffix in SUFFIXES and not path.name.endswith(SCHEMA_SUFFIX)


@dataclass
class _File:
    """One file: what could be read of it, and its problems (placed on lines only if there are any)."""

    path: Path
    text: str = ""
    data: Any = None
    definitions: DefinitionsFile | None = None
    # For each list, the index in the file of each item kept in ``definitions`` (items with a
    # problem of their own are left out of the catalog).
    kept: dict[str, list[int]] = field(default_factory=dict)
    broken_names: set[str] = field(default_factory=set)
    problems: list[Problem] = field(default_factory=list)
    fixed: list[LocatedProblem] = field(default_factory=list)  # problems that already have a line

    @classmethod
    def load(cls, path: Path) -> _File:
        file = cls(path)
        try:
            file.text = path.read_text()
            file.data = json.loads(file.text) if path.suffix == ".json" else yaml.load(file.text, Loader=_LOADER)  # noqa: S506 - a safe loader
        except OSError as exc:
            file.fixed.append(LocatedProblem(path, 0, "", f"cannot read: {exc.strerror or exc}"))
            return file
        except json.JSONDecodeError as exc:
            file.fixed.append(LocatedProblem(path, exc.lineno, "", f"not JSON: {exc.msg}"))
            return file
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            reason = " ".join(
                str(part) for part in (getattr(exc, "context", None), getattr(exc, "problem", None)) if part
            )
            line = mark.line + 1 if mark is not None else 1
            file.fixed.append(LocatedProblem(path, line, "", f"not YAML: {reason or exc}"))
            return file
        if file.data is None:
            file.data = {}
        if not isinstance(file.data, dict):
            kinds = ", ".join(DefinitionsFile.model_fields)
            file.fixed.append(LocatedProblem(path, 1, "", f"expected a mapping with any of: {kinds}"))
            return file
        file.validate()
        return file

    def validate(self) -> None:
        try:
            self.definitions = DefinitionsFile.model_validate(self.data)
            self.kept = {key: list(range(len(items))) for key, items in self._lists().items()}
            return
        except ValidationError as error:
            self.problems += problems_of(error, DefinitionsFile)
        # Keep what has no problem of its own, so the rest is still checked against it.
        failed = {problem.where[:2] for problem in self.problems if len(problem.where) >= 2}
        lists = self._lists()
        self.kept = {key: [i for i in range(len(items)) if (key, i) not in failed] for key, items in lists.items()}
        for key, items in lists.items():
            for index in range(len(items)):
                if (key, index) in failed and isinstance(items[index], dict):
                    name = items[index].get(_NAME_KEYS.get(key, "name"))
                    if isinstance(name, str):
                        self.broken_names.add(name)
        reduced = {key: [lists[key][i] for i in indices] for key, indices in self.kept.items()}
        folders = self.data.get("python_paths")
        if isinstance(folders, list) and all(isinstance(folder, str) for folder in folders):
            reduced["python_paths"] = folders
        try:
            self.definitions = DefinitionsFile.model_validate(reduced)
        except ValidationError:  # should not happen: every item left passed on its own
            self.definitions = None

    def _lists(self) -> dict[str, list[Any]]:
        return {
            key: value
            for key, value in self.data.items()
            if key in DefinitionsFile.model_fields and key != "python_paths" and isinstance(value, list)
        }

    def add(self, problem: Problem, *, kept: bool = False) -> None:
        """Record a problem; ``kept``: its index is into the items kept, not the file's."""
        where = problem.where
        if kept and len(where) >= 2 and isinstance(where[1], int) and str(where[0]) in self.kept:
            where = (where[0], self.kept[str(where[0])][where[1]], *where[2:])
        self.problems.append(Problem(where, problem.message))

    def add_python_paths(self) -> None:
        if self.definitions is None:
            return
        for index, entry in enumerate(self.definitions.python_paths):
            folder = (self.path.parent / entry).resolve()
            if not folder.is_dir():
                self.problems.append(Problem(("python_paths", index), f"no such folder: {folder}"))
            elif str(folder) not in sys.path:
                sys.path.append(str(folder))  # after the installed packages: a module here cannot shadow them

    def check_imports(self) -> None:
        """Import each Python callable the file's definitions name, as the services will."""
        assert self.definitions is not None
        found: list[tuple[Location, str]] = []
        for index, tool in enumerate(self.definitions.tools):
            if tool.python is not None:
                found.append((("tools", index, "python", "callable"), tool.python.callable))
        for index, graph in enumerate(self.definitions.graphs):
            for name, node in graph.nodes.items():
                if isinstance(node, FunctionNode):
                    found.append((("graphs", index, "nodes", name, "callable"), node.callable))
        for index, workflow in enumerate(self.definitions.workflows):
            for where, step in workflow.located():
                if isinstance(step, FunctionStep):
                    found.append((("workflows", index, *where, "callable"), step.callable))
        for where, target in found:
            message = _import_problem(target)
            if message is not None:
                self.add(Problem(where, message), kept=True)

    def located(self) -> list[LocatedProblem]:
        """Every problem of the file, on its line, in the order of the lines."""
        if not self.problems:
            return self.fixed
        lines = LineMap(self.text)
        placed = [LocatedProblem(self.path, lines.line(p.where), dotted(p.where), p.message) for p in self.problems]
        unique = list(dict.fromkeys(placed))
        return self.fixed + sorted(unique, key=lambda problem: problem.line)


@contextlib.contextmanager
def _services_import_path() -> Iterator[None]:
    """The import path a service has: ``python -m`` puts the working directory first."""
    here = os.getcwd()
    added = here not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, here)
    try:
        yield
    finally:
        if added:
            sys.path.remove(here)


def _import_problem(target: str) -> str | None:
    module, _, attribute = target.partition(":")
    try:
        found = importlib.import_module(module)
    except Exception as exc:  # whatever the module raises while it loads
        hint = " (is its folder in python_paths?)" if isinstance(exc, ModuleNotFoundError) else ""
        return f"cannot import {target!r}: {type(exc).__name__}: {exc}{hint}"
    if not hasattr(found, attribute):
        return f"cannot import {target!r}: module {module!r} has no {attribute!r}"
    return None
