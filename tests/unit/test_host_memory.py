"""The runtime gives the host memory a request freed back to the system once idle, never mid-session."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from node import host_memory
from node.host_memory import IDLE_SECONDS, Trimmer, _malloc_trim


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_trims_once_after_work_and_an_idle_moment_only():
    clock, calls = Clock(), []
    trimmer = Trimmer(clock, trim=lambda pad: calls.append(pad) or 1)
    assert not trimmer.tick(busy=False, done=0)  # nothing ran yet: nothing to give back
    clock.now += 10
    assert not trimmer.tick(busy=False, done=0) and calls == []

    assert not trimmer.tick(busy=True, done=0)  # a request under way
    assert not trimmer.tick(busy=False, done=1)  # it finished: the idle moment starts now
    clock.now += IDLE_SECONDS / 2
    assert not trimmer.tick(busy=False, done=1)
    assert not trimmer.tick(busy=False, done=2)  # a session's next step came in time: no trim between steps
    clock.now += IDLE_SECONDS / 2
    assert not trimmer.tick(busy=False, done=2) and calls == []
    clock.now += IDLE_SECONDS
    assert trimmer.tick(busy=False, done=2) and calls == [0]
    clock.now += 10
    assert not trimmer.tick(busy=False, done=2) and trimmer.trims == 1  # once per idle period


def test_on_glibc_the_runtime_calls_malloc_trim_for_real():
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc: the runtime does without malloc_trim")
    assert Trimmer().trim is not None and _malloc_trim()(0) in (0, 1)


HOLD_PROBE = """
import ctypes, sys
import psutil
from node import host_memory
held = host_memory.hold_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
rss = lambda: psutil.Process().memory_info().rss >> 20
before = rss()
block = libc.malloc(40 << 20)
ctypes.memset(block, 1, 40 << 20)
libc.free(block)
freed = rss()
host_memory._malloc_trim()(0)
print(held, freed - before, rss() - before)
"""


@pytest.mark.parametrize("operator_setting", [None, "MALLOC_MMAP_THRESHOLD_"])
def test_what_a_request_frees_stays_until_the_idle_trim_unless_the_operator_tuned_malloc(operator_setting):
    """A 40 MiB activation freed mid-work stays in the runtime (the next round does not fault it in again)
    and goes back at the idle trim; an operator's own malloc settings are left alone."""
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    env = {k: v for k, v in os.environ.items() if k not in host_memory.OPERATOR_SETTINGS}
    if operator_setting:
        env[operator_setting] = str(1 << 20)
    out = subprocess.run([sys.executable, "-c", HOLD_PROBE], env=env, capture_output=True, text=True, timeout=60)
    held, after_free, after_trim = out.stdout.split()
    if operator_setting:
        assert held == "False" and int(after_free) < 20  # glibc as the operator set it: given back at once
    else:
        assert held == "True" and int(after_free) >= 38 and int(after_trim) < 20
