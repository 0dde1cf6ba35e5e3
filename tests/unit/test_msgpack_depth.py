"""hivemind's msgpack decoding with a depth limit (node/msgpack_depth.py), in a child process: without it,
about 200 levels of nested tuples (1.5 KB that any peer may store in the DHT) kill the process with SIGSEGV."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers.paths import ROOT

SCRIPT = """
import sys, msgpack
from hivemind.utils.serializer import MSGPackSerializer
if sys.argv[1] == "limited":
    from node import msgpack_depth
    msgpack_depth.install()
data = msgpack.packb([])
for _ in range(int(sys.argv[2])):
    data = msgpack.packb(msgpack.ExtType(0x40, data))
decoded = MSGPackSerializer.loads(data)
record = (2, 1.5, {"start_block": 0, "end_block": 4, "next_pings": {"Qm": 0.1}})
assert MSGPackSerializer.loads(MSGPackSerializer.dumps(record)) == record
print("decoded", decoded if int(sys.argv[2]) < 5 else "deep")
"""


def decode(mode: str, levels: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, mode, str(levels)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_deep_tuples_decode_as_nothing_instead_of_crashing_the_process():
    unlimited = decode("unlimited", 5000)
    assert unlimited.returncode < 0  # killed by a signal (SIGSEGV): what a peer's value did to the announcer
    limited = decode("limited", 5000)
    assert limited.returncode == 0 and "decoded deep" in limited.stdout, limited.stderr[-2000:]
    shallow = decode("limited", 3)
    assert shallow.returncode == 0 and "decoded ()" in shallow.stdout, shallow.stderr[-2000:]  # and records decode
