"""The runtime gives the host memory a request freed back to the system once idle, never mid-session."""

from __future__ import annotations

import platform

import pytest

from node.runtime.host_memory import IDLE_SECONDS, Trimmer, _malloc_trim


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
