"""The comparison sides of ``corral bench workflow`` measure, in quick mode, and leave nothing
behind: each side starts its own servers and worker processes and stops them all."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

from corral.bench.workflow_others import run_others

FIGURES = ("p50_ms", "p99_ms", "rps", "recovery_s")


def _children() -> set[int]:
    """Live processes whose parent is this one (Linux's /proc; empty elsewhere)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # it ended while being read
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


def _scratch_folders() -> set[str]:
    return {path.name for path in Path(tempfile.gettempdir()).glob("corral-bench-*")}


@pytest.mark.parametrize(
    ("side", "package"),
    [("floor", None), ("temporal", "temporalio"), ("dbos", "dbos")],
)
def test_a_side_reports_positive_figures_and_leaves_nothing_behind(side: str, package: str | None) -> None:
    if package is not None:
        pytest.importorskip(package)
    children, folders = _children(), _scratch_folders()

    figures = run_others(sides=(side,), quick=True)[side]

    assert "error" not in figures, figures["error"]
    for name in FIGURES:
        assert isinstance(figures[name], float), (name, figures[name])
        assert figures[name] > 0, (name, figures[name])
    assert figures["p99_ms"] >= figures["p50_ms"]
    assert _children() <= children
    assert _scratch_folders() <= folders


def test_a_side_without_its_package_reports_an_error_instead_of_failing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "dbos", None)  # what an import of an absent package does

    results = run_others(sides=("dbos",), quick=True)

    assert "bench extra" in results["dbos"]["error"]
