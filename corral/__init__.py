"""Corral's top layer: the Python client and the operator's tooling (the ``corral`` command, the
local system launcher, the broker launcher, the state directory, the AsyncAPI generator, the audit
reader, the benchmark) and the demo. Nothing in ``services/runtime`` imports from here."""
