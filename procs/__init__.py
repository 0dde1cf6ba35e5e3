"""The actor processes of the node, one module per role, and the loop they share (actor.py).

Frontends and the announcer need hivemind's P2P and DHT, not the torch that a plain `import hivemind`
brings along: the light import is set up before any role module runs.
"""

from node.hivemind_light import install as _install_light_hivemind

_install_light_hivemind()
