"""Where in a definitions file a problem is: pydantic's errors as problems at paths into the
file's data, and the YAML line of a path.

A pydantic error's ``loc`` mixes keys of the data with the tags of the union members it tried
(``graphs, 0, nodes, a, tool, argz``: ``tool`` is the node's kind, not a key); the path is
found by following the models' types alongside. Messages that would leave a newcomer guessing
are rewritten: an unknown key names the keys allowed there and the closest one, a missing
``kind`` the kinds there are. Line numbers come from composing the YAML (which JSON is too)
into nodes, done only when there is a problem to place.
"""

from __future__ import annotations

import re
import types
import typing
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from contracts.definitions_base import Location, Problem, Problems, did_you_mean

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_QUOTED = re.compile(r"'([^']*)'")


@dataclass(frozen=True)
class LocatedProblem:
    """A problem as a person reads it: ``file:line: path.to.key: message``."""

    file: Path
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        line = f":{self.line}" if self.line else ""  # 0: the file's (or folder's) as a whole
        return f"{self.file}{line}: {where}{self.message}"


def dotted(where: Location) -> str:
    """``graphs[0].nodes.answer.template``: keys joined by dots, list indices in brackets."""
    text = ""
    for step in where:
        text += f"[{step}]" if isinstance(step, int) else (f".{step}" if text else str(step))
    return text


class LineMap:
    """The line of each key of a YAML (or JSON) text, found by composing it into nodes."""

    def __init__(self, text: str) -> None:
        try:
            self.root: yaml.Node | None = yaml.compose(text, Loader=_LOADER)
        except yaml.YAMLError:
            self.root = None

    def line(self, where: Location) -> int:
        """The line (1-based) of the deepest key of ``where`` that the text has."""
        node = self.root
        line = node.start_mark.line + 1 if node is not None else 1
        for step in where:
            found = _child(node, step)
            if found is None:
                break
            line, node = found
        return line


def _child(node: yaml.Node | None, step: str | int) -> tuple[int, yaml.Node] | None:
    if isinstance(node, yaml.MappingNode):
        merged = []
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == str(step):
                return key.start_mark.line + 1, value
            if isinstance(key, yaml.ScalarNode) and key.value == "<<":  # a YAML merge key
                merged += value.value if isinstance(value, yaml.SequenceNode) else [value]
        for source in merged:
            found = _child(source, step)
            if found is not None:
                return found
    if isinstance(node, yaml.SequenceNode) and isinstance(step, int) and 0 <= step < len(node.value):
        item = node.value[step]
        return item.start_mark.line + 1, item
    return None


# ---- pydantic's errors as problems at paths ---------------------------------------------


@dataclass
class _Followed:
    """What a ``loc`` leads to: the path into the data, and the types met on the way."""

    where: list[str | int]
    model: type[BaseModel] | None  # the model whose key the last step is
    annotation: Any  # the type at the end (None: not known)
    alternative: bool  # the error is one member's of a union tried in turn


def problems_of(error: ValidationError, root: type[BaseModel]) -> list[Problem]:
    """Each of pydantic's errors as problems at paths into the data validated as ``root``."""
    found: list[Problem] = []
    alternatives: dict[Location, list[str]] = {}
    details = [(detail, _follow(root, detail["loc"])) for detail in error.errors(include_url=False)]
    # A required key missing where an unknown one was given is the likeliest meaning of it
    # (``name:`` for a tenant's ``tenant:``).
    missing: dict[Location, list[str]] = {}
    for detail, followed in details:
        if detail["type"] == "missing":
            missing.setdefault(tuple(followed.where[:-1]), []).append(str(followed.where[-1]))
    for detail, followed in details:
        for problem in _problems(detail, followed, missing):
            if followed.alternative:  # "a string, or a list": one line for the value
                alternatives.setdefault(problem.where, []).append(problem.message)
            else:
                found.append(problem)
    for where, messages in alternatives.items():
        first, *others = dict.fromkeys(messages)
        found.append(Problem(where, " or ".join([first, *(m.removeprefix("Input should be ") for m in others)])))
    return found


def _problems(detail: Any, followed: _Followed, missing: dict[Location, list[str]]) -> list[Problem]:
    where = tuple(followed.where)
    kind, message = detail["type"], detail["msg"]
    ctx = detail.get("ctx") or {}
    if kind == "value_error" and isinstance(ctx.get("error"), Problems):
        return [problem.within(*where) for problem in ctx["error"].problems]
    if kind == "extra_forbidden" and followed.model is not None:
        key = str(where[-1])
        allowed = sorted(_keys(followed.model))
        wanted = missing.get(where[:-1], [])
        hint = did_you_mean(key, allowed) or (f" (did you mean {wanted[0]!r}?)" if len(wanted) == 1 else "")
        return [Problem(where, f"unknown key {key!r}{hint}; allowed here: {', '.join(allowed)}")]
    if kind == "missing":
        return [Problem(where[:-1], f"missing required key {where[-1]!r}")]
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        discriminator = str(ctx.get("discriminator", "kind")).strip("'")
        tags = _QUOTED.findall(str(ctx.get("expected_tags", ""))) or _tags(followed.annotation)
        if kind == "union_tag_not_found":
            return [Problem(where, f"missing {discriminator!r}: one of {', '.join(tags)}")]
        tag = str(ctx.get("tag"))
        hint = did_you_mean(tag, tags)
        return [Problem((*where, discriminator), f"unknown {discriminator} {tag!r}{hint}; one of {', '.join(tags)}")]
    if kind in ("enum", "literal_error"):
        given = detail.get("input")
        return [Problem(where, f"{message}, not {given!r}" + did_you_mean(str(given), _QUOTED.findall(message)))]
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return [Problem(where, message)]


def _follow(root: type[BaseModel], loc: tuple[Any, ...]) -> _Followed:
    followed = _Followed([], None, root, False)
    annotation: Any = root
    discriminator: str | None = None
    for step in loc:
        if step == "[key]":  # the key itself is wrong: the path already names it
            continue
        annotation, inner = _unwrap(annotation)
        discriminator = inner or discriminator
        members = _members(annotation)
        if len(members) > 1:
            if discriminator is not None:
                annotation = next((m for m in members if str(step) in _tags(m)), None)
            else:  # a union of types tried in turn: the step names a member, not a key
                followed.alternative = True
                annotation = None
            discriminator = None
            continue
        followed.where.append(step)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            followed.model = annotation
            field = _field(annotation, str(step))
            annotation = field.annotation if field is not None else None
            discriminator = field.discriminator if field is not None and isinstance(field.discriminator, str) else None
        elif typing.get_origin(annotation) in (list, tuple) and isinstance(step, int):
            annotation = typing.get_args(annotation)[0]
        elif typing.get_origin(annotation) is dict:
            annotation = typing.get_args(annotation)[1]
        else:
            annotation = None
    followed.annotation = annotation
    return followed


def _unwrap(annotation: Any) -> tuple[Any, str | None]:
    """Without ``Annotated`` and ``| None``; the union's discriminator, if it declares one."""
    discriminator = None
    while True:
        if typing.get_origin(annotation) is typing.Annotated:
            base, *metadata = typing.get_args(annotation)
            for meta in metadata:
                if isinstance(meta, FieldInfo) and isinstance(meta.discriminator, str):
                    discriminator = meta.discriminator
            annotation = base
            continue
        members = _members(annotation)
        if len(members) == 1 and members[0] is not annotation:
            annotation = members[0]
            continue
        return annotation, discriminator


def _members(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [member for member in typing.get_args(annotation) if member is not type(None)]
    return [annotation]


def _field(model: type[BaseModel], key: str) -> FieldInfo | None:
    for name, field in model.model_fields.items():
        if key in (name, field.alias):
            return field
    return None


def _keys(model: type[BaseModel]) -> list[str]:
    return [field.alias or name for name, field in model.model_fields.items()]


def _tags(annotation: Any) -> list[str]:
    """The values of the ``kind`` (a Literal field) of a union's members, or of one model."""
    tags = []
    for member in _members(_unwrap(annotation)[0]):
        if isinstance(member, type) and issubclass(member, BaseModel) and "kind" in member.model_fields:
            for value in typing.get_args(member.model_fields["kind"].annotation):
                tags.append(value.value if isinstance(value, Enum) else str(value))
    return tags
