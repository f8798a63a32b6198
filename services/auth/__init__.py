"""The auth service: the NATS auth-callout responder that turns a tenant's JWT into permissions."""
