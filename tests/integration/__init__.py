"""Whole-node tests: nodes started as a user starts them (`python -m node.supervisor ...`) on loopback,
driven by the project's client, real Petals clients and servers, hostile peers and fault injection."""
