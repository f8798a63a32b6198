"""The router: admission and deterministic pattern selection for tenant requests."""
