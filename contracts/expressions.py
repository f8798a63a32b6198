"""A small, safe expression form over the run state, for edge and route conditions.

``lookup.found == true and input.priority in ['high', 'urgent']`` — comparisons, ``and``/``or``/
``not``, membership, path lookup (``a.b[0].c``) and literals. Expressions are parsed with
:mod:`ast` and compiled into closures over a whitelist of node types; nothing is ever ``eval``ed,
and a name can only read the state, never call or import anything.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable, Mapping
from typing import Any

from contracts.errors import InvalidRequest

State = Mapping[str, Any]
Compiled = Callable[[State], Any]

MAX_EXPRESSION_LENGTH = 500
_MISSING = object()
_LITERAL_NAMES = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}
_COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], bool]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}


class ExpressionError(InvalidRequest):
    """An expression is not in the allowed form."""


def lookup(state: State, path: str) -> Any:
    """Value at a dotted path (``a.b.0.c``), or ``None`` when any step is missing."""
    return compile_path(path)(state)


def _step(value: Any, key: str | int) -> Any:
    if type(value) is dict or isinstance(value, Mapping):  # the exact check first: ABC checks are slow
        return value.get(key, _MISSING) if isinstance(key, str) else _MISSING
    if isinstance(value, list | tuple):
        try:
            return value[int(key)]
        except (ValueError, IndexError):
            return _MISSING
    return _MISSING


def compile_expression(source: str) -> Compiled:
    """Parse ``source`` once; the result evaluates it against a state mapping."""
    if len(source) > MAX_EXPRESSION_LENGTH:
        raise ExpressionError("expression too long")
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except SyntaxError as exc:
        raise ExpressionError(f"cannot parse expression {source!r}: {exc.msg}") from None
    return _compile(tree.body, source)


def evaluate(compiled: Compiled, state: State) -> bool:
    """Evaluate a condition; comparing unlike types is false rather than an error."""
    try:
        return bool(compiled(state))
    except TypeError:
        return False


def _compile(node: ast.AST, source: str) -> Compiled:
    if isinstance(node, ast.Constant) and isinstance(node.value, str | int | float | bool | type(None)):
        value = node.value
        return lambda _state: value
    if isinstance(node, ast.Name):
        if node.id in _LITERAL_NAMES:
            literal = _LITERAL_NAMES[node.id]
            return lambda _state: literal
        return _path_reader([node.id])
    if isinstance(node, ast.Attribute | ast.Subscript):
        return _path_reader(_path_of(node, source))
    if isinstance(node, ast.List | ast.Tuple):
        items = [_compile(element, source) for element in node.elts]
        return lambda state: [item(state) for item in items]
    if isinstance(node, ast.BoolOp):
        parts = [_compile(value, source) for value in node.values]
        if isinstance(node.op, ast.And):
            return lambda state: all(part(state) for part in parts)
        return lambda state: any(part(state) for part in parts)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        inner = _compile(node.operand, source)
        return lambda state: not inner(state)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
        negative = -node.operand.value  # type: ignore[operator]
        return lambda _state: negative
    if isinstance(node, ast.Compare):
        return _compile_compare(node, source)
    raise ExpressionError(f"not allowed in an expression: {ast.dump(node)[:60]} in {source!r}")


def _compile_compare(node: ast.Compare, source: str) -> Compiled:
    left = _compile(node.left, source)
    steps = []
    for op, comparator in zip(node.ops, node.comparators, strict=True):
        if type(op) not in _COMPARE:
            raise ExpressionError(f"operator not allowed in {source!r}")
        steps.append((_COMPARE[type(op)], _compile(comparator, source)))

    def compare(state: State) -> bool:
        current = left(state)
        for function, right in steps:
            other = right(state)
            if not function(current, other):
                return False
            current = other
        return True

    return compare


def _path_of(node: ast.AST, source: str) -> list[str]:
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Attribute):
        return [*_path_of(node.value, source), node.attr]
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        key = node.slice.value
        if isinstance(key, str | int) and not isinstance(key, bool):
            return [*_path_of(node.value, source), str(key)]
    raise ExpressionError(f"only plain paths like a.b[0] are allowed in {source!r}")


def _path_reader(path: list[str]) -> Compiled:
    if any(step.startswith("_") for step in path):
        raise ExpressionError("paths may not use names starting with '_'")
    return compile_path(".".join(path))


def compile_path(path: str) -> Compiled:
    """A reader of one dotted path (``a.b.0.c``; ``None`` when a step is missing), split once."""
    steps = tuple(path.split("."))

    def read(state: State) -> Any:
        value: Any = state
        for step in steps:
            value = value.get(step, _MISSING) if type(value) is dict else _step(value, step)
            if value is _MISSING:
                return None
        return value

    return read


_PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_.\-]+)\}")


def render(template: str, state: State) -> str:
    """Fill ``{path}`` placeholders from the state; a missing value renders as empty."""
    return compile_template(template)(state)


def compile_template(template: str) -> Callable[[State], str]:
    """A template (``{path}`` placeholders) parsed once into literal text and compiled paths."""
    parts: list[str | Compiled] = []
    position = 0
    for match in _PLACEHOLDER.finditer(template):
        if match.start() > position:
            parts.append(template[position : match.start()])
        parts.append(compile_path(match.group(1)))
        position = match.end()
    if position < len(template):
        parts.append(template[position:])
    if all(isinstance(part, str) for part in parts):
        return lambda state: template

    def fill(state: State) -> str:
        pieces = []
        for part in parts:
            if type(part) is str:
                pieces.append(part)
            else:
                value = part(state)  # type: ignore[operator]
                if value is not None:
                    pieces.append(str(value))
        return "".join(pieces)

    return fill


def compile_arguments(value: Any) -> Callable[[State], Any]:
    """An argument template parsed once: ``"$path"`` reads the state, containers recurse."""
    if isinstance(value, str) and value.startswith("$") and len(value) > 1:
        return compile_path(value[1:])
    if isinstance(value, Mapping):
        items = [(key, compile_arguments(item)) for key, item in value.items()]
        return lambda state: {key: read(state) for key, read in items}
    if isinstance(value, list):
        readers = [compile_arguments(item) for item in value]
        return lambda state: [read(state) for read in readers]
    return lambda state: value


def resolve(value: Any, state: State) -> Any:
    """Resolve an argument template: ``"$path"`` reads the state, containers recurse."""
    return compile_arguments(value)(state)


def placeholders(template: str) -> list[str]:
    """The paths a template's ``{path}`` placeholders read, in order."""
    return _PLACEHOLDER.findall(template)


def argument_paths(value: Any, where: tuple[str | int, ...] = ()) -> list[tuple[tuple[str | int, ...], str]]:
    """Every ``$path`` of an argument template, with where it is inside ``value`` (for load-time checks)."""
    if isinstance(value, str) and value.startswith("$") and len(value) > 1:
        return [(where, value[1:])]
    if isinstance(value, Mapping):
        return [found for key, item in value.items() for found in argument_paths(item, (*where, key))]
    if isinstance(value, list):
        return [found for index, item in enumerate(value) for found in argument_paths(item, (*where, index))]
    return []


def paths_in(source: str) -> list[str]:
    """Every state path an expression reads, in full (``lookup.order.id``), in order of appearance."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Name | ast.Attribute | ast.Subscript):
            try:
                path = _path_of(node, source)
            except ExpressionError:
                path = None
            if path is not None:
                if path[0] not in _LITERAL_NAMES:
                    found.append(".".join(path))
                return
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source.strip(), mode="eval"))
    return found


def names_in(source: str) -> set[str]:
    """The first token of every state path an expression reads (for load-time reference checks)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source, mode="eval")):
        if isinstance(node, ast.Name) and node.id not in _LITERAL_NAMES:
            names.add(node.id)
    return names
