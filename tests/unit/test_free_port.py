"""Ports for listeners a test (or ``corral up``) starts: free, and out of the way of connections."""

from __future__ import annotations

import socket

from corral.nats_server import _ephemeral_range, free_port


def test_ports_are_free_distinct_and_below_the_ephemeral_range() -> None:
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert 4222 not in ports
    ephemeral = _ephemeral_range()
    for port in ports:
        if ephemeral is not None:
            # an outgoing connection's local port comes from this range, so it cannot take ours
            assert not ephemeral[0] <= port <= ephemeral[1]
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))
