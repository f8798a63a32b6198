"""Python imports ``sitecustomize`` at start-up: this folder on ``PYTHONPATH`` traces the process."""

import hop_trace_site  # noqa: F401
