"""The announcer's helpers (procs/announcer.py): reachability.py (Petals' rpc_check and the public
swarm's health check), next_pings.py (round trips to the servers after ours)."""
