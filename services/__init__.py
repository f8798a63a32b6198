"""Corral's deployable services, their shared runtime and the ``corral`` command."""
