"""The tools service: adapters for Python callables and HTTP/REST APIs, tenant injected by the runtime."""
