"""Message and wire formats: what crosses a process boundary inside the node, and what crosses the swarm."""

# The Petals release whose protocol the node speaks, with the node's own version as a local label.
SERVER_VERSION = "2.3.0.dev2+node.0.1.0"
