"""The wire contract of Corral: envelope, subjects, tenant ids, error codes, definition schemas.

Pure pydantic and standard library, no I/O: clients and every service import it.
"""
