"""The memory of a node's processes, as the reliability tests judge it."""

from __future__ import annotations

import threading

import psutil


def processes_memory(pids) -> tuple[int, int]:
    """(PSS, USS) of these processes. Growth is judged on USS, the pages only they hold: their PSS also
    moves when other processes on the host that map the same libraries (torch's) start or exit."""
    pss = uss = 0
    for pid in pids:
        try:
            info = psutil.Process(pid).memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        pss, uss = pss + info.pss, uss + info.uss
    return pss, uss


def node_memory(node) -> tuple[int, int]:
    """(PSS, USS) of all of a NodeProcess's processes, p2pd included."""
    return processes_memory(node.all_pids())


class PeakMemory:
    """The largest USS of a set of processes, sampled on a thread while a `with` block runs."""

    def __init__(self, pids_of, every: float = 0.2):
        self.pids_of = pids_of  # () -> the pids to measure now (actors may be replaced meanwhile)
        self.every = every
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, processes_memory(self.pids_of())[1])
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)
        self.peak = max(self.peak, processes_memory(self.pids_of())[1])
