"""The supervisor: `python -m node.supervisor --model X [flags]` (boot.py, then supervisor.py).

boot.py starts everything; supervisor.py watches the actors and drives the node's state; moves.py
carries out rebalancing moves; reload.py replaces every actor in turn on SIGHUP; placement.py,
block_selection.py and resources.py decide where the node sits and how many blocks fit; config.py and
resolve.py turn flags and the model into the plan that every actor reads; processes.py, daemon.py,
metrics.py and sd_notify.py are its process table, its p2pd, its Prometheus metrics and its systemd
protocol; status_server.py, status_view.py, status_page.html and timeline.py serve the metrics and the
status page. Nothing here imports torch.
"""
