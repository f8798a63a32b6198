"""The graph executor: runs declared graphs of explicit nodes and conditional edges."""
