"""Operator functions used by the executor tests (function nodes import them by path)."""


def add(a: int, b: int) -> int:
    return a + b
