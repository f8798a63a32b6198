"""Loading definitions (YAML or JSON files) into a validated :class:`~contracts.definitions.Catalog`."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from pydantic import ValidationError

from contracts.definitions import Catalog, DefinitionError, DefinitionsFile

SUFFIXES = (".yaml", ".yml", ".json")


def load_catalog(path: Path) -> Catalog:
    """Load every definitions file under ``path`` (a file or a directory, read in name order)."""
    files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise DefinitionError(f"no definitions found at {path}")
    return Catalog.merge([_load_file(file) for file in files])


def _load_file(path: Path) -> DefinitionsFile:
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        return DefinitionsFile.model_validate(data or {})
    except (OSError, yaml.YAMLError, json.JSONDecodeError) as exc:
        raise DefinitionError(f"{path}: cannot read: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False)[:5]
        )
        raise DefinitionError(f"{path}: {problems}") from None
