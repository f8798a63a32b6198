"""Dependencies point one way: contracts <- services/runtime <- each service <- corral (the top).

Read from the source with ``ast``, so an import hidden inside a function counts too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Libraries inside services/ that services share (never a deployable service themselves).
SHARED = ("runtime", "llm", "toolkit")
SERVICE_FOLDERS = sorted(
    p.name for p in (ROOT / "services").iterdir() if (p / "manifest.py").exists() and p.name not in SHARED
)


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_the_service_folders_are_the_registry():
    from services.registry import NAMES

    assert sorted(NAMES) == SERVICE_FOLDERS


@pytest.mark.parametrize("path", modules("contracts"), ids=lambda p: p.name)
def test_contracts_import_nothing_of_corral_but_contracts(path):
    assert not {m for m in imports_of(path) if m.split(".")[0] in ("services", "corral")}


@pytest.mark.parametrize("path", modules("services/runtime"), ids=lambda p: p.name)
def test_no_runtime_module_imports_a_service_or_the_operator_tooling(path):
    upward = {
        m
        for m in imports_of(path)
        if m.split(".")[0] == "corral" or (m.startswith("services.") and m.split(".")[1] not in ("runtime",))
    }
    assert not upward, f"{path.relative_to(ROOT)} imports {upward}"


@pytest.mark.parametrize("path", modules("services/llm"), ids=lambda p: p.name)
def test_the_model_clients_depend_on_contracts_and_the_runtime_only(path):
    assert not {
        m
        for m in imports_of(path)
        if m.split(".")[0] == "corral" or (m.startswith("services.") and m.split(".")[1] not in SHARED)
    }


@pytest.mark.parametrize("path", modules("services/toolkit"), ids=lambda p: p.name)
def test_the_tool_runtime_depends_on_contracts_and_the_runtime_only(path):
    assert not {
        m
        for m in imports_of(path)
        if m.split(".")[0] == "corral" or (m.startswith("services.") and m.split(".")[1] not in ("runtime", "toolkit"))
    }


@pytest.mark.parametrize("service", SERVICE_FOLDERS)
def test_a_service_never_imports_another_service_or_the_top_layer(service):
    for path in modules(f"services/{service}"):
        foreign = {
            m
            for m in imports_of(path)
            if m.split(".")[0] == "corral"
            or (m.startswith("services.") and m.split(".")[1] not in (*SHARED, service, "registry"))
        }
        assert not foreign, f"{path.relative_to(ROOT)} imports {foreign}"
        assert "services.registry" not in imports_of(path)


def test_the_python_client_needs_neither_structlog_nor_pydantic_settings_nor_nkeys():
    probe = (
        "import sys, corral.client; "
        "print(sorted(m for m in ('structlog', 'pydantic_settings', 'nkeys', 'yaml', 'services.runtime.service') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout
