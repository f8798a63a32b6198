"""The workflow engine: durable, audited runs of declared steps on JetStream (docs/workflows.md)."""
