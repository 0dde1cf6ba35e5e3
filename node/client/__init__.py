"""A small client that speaks the Petals protocol (swarm.py) and client-side generation (generate.py),
for the tests, the benchmarks and the demo. Not a replacement for the Petals client."""
