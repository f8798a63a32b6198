"""Operator functions used by the executor tests (function nodes import them by path)."""


def add(a: int, b: int) -> int:
    return a + b


async def wait(seconds: float) -> float:
    import asyncio

    await asyncio.sleep(seconds)  # a slow operator function, not synchronisation
    return seconds
