"""Write the definitions format's generated files after a model in ``contracts/`` changed:
``contracts/definitions.schema.json`` and the reference part of ``docs/definitions.md``.

    .venv/bin/python scripts/definitions_reference.py

``tests/unit/test_definitions_reference.py`` fails until they are current.
"""

from __future__ import annotations

from corral.definitions_reference import REFERENCE_FILE, SCHEMA_FILE, render_schema, updated_reference


def main() -> None:
    SCHEMA_FILE.write_text(render_schema())
    REFERENCE_FILE.write_text(updated_reference(REFERENCE_FILE.read_text()))
    print(f"wrote {SCHEMA_FILE} and the reference in {REFERENCE_FILE}")


if __name__ == "__main__":
    main()
