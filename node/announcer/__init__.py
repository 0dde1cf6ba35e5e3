"""What the announcer (procs/announcer.py) decides and does in the swarm: presence.py (the node's DHT
records and its view of the swarm's), reachability.py (Petals' rpc_check and the public swarm's health
check), next_pings.py (round trips to the servers after ours)."""
