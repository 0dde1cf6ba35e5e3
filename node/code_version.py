"""Which version of the project's code a process runs: a digest of its source files as they were on disk
when the process started.

A reload (SIGHUP) replaces the actors with processes that import the code now on disk; each reports this
digest in its Ready, so an operator (status.json, `actor ready` events) sees which processes run what.
The supervisor itself is not replaced by a reload: its digest says what it still runs.
"""

from __future__ import annotations

import hashlib
import os

PACKAGES = ("node", "procs", "protocol")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def code_version(root: str = ROOT) -> str:
    """The first 12 hex digits of a SHA-256 over the paths and contents of the packages' .py files."""
    digest = hashlib.sha256()
    for package in PACKAGES:
        for folder, dirs, files in os.walk(os.path.join(root, package)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(folder, name)
                digest.update(os.path.relpath(path, root).encode())
                try:
                    with open(path, "rb") as f:
                        digest.update(f.read())
                except OSError:
                    digest.update(b"<unreadable>")
    return digest.hexdigest()[:12]
