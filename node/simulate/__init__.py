"""A swarm of hundreds of virtual servers over simulated hours, placed by the node's own placement
(node/supervisor/placement_rules.py) or by Petals' rule, or a mix: `python -m node.simulate --help`.

config.py the inputs; events.py the clock; swarm.py the servers, the DHT's records and what is really
served; rules.py the two rules step by step; clients.py the sessions; simulation.py one run;
report.py the figures over seeds; plot.py the chart; __main__.py the command.
"""
