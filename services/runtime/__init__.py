"""What every service stands on: settings, logging, connecting, the tenant guard, the service
entry helper and the embedded NATS launcher."""
