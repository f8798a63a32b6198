"""The demo shipped with Corral: definitions (copied into the state directory by ``corral init``),
the tenants' data, and the data tools the definitions name (``corral.demo.tools``)."""

from pathlib import Path

DEFINITIONS = Path(__file__).resolve().parent / "definitions"
DATA = Path(__file__).resolve().parent / "data"
