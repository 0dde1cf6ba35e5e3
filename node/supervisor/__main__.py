"""`python -m node.supervisor --model X [flags]`: run a node (node/supervisor/boot.py)."""

from node.supervisor.boot import main

main()
