"""Threads on a busy machine (cnnlab.training.cpu_share, trainer.torch_threads): the measure of
other processes' CPU use, checked against psutil's own reading of the kernel's counters."""

from __future__ import annotations

import logging
import time

import psutil
import pytest
import torch

from cnnlab.training import cpu_share
from cnnlab.training.trainer import torch_threads


def _psutil_busy() -> float:
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + t.steal


def test_busy_seconds_agree_with_psutil():
    """Two readings 0.5 s apart: the machine-wide busy seconds cnnlab parses from /proc/stat move
    by what psutil's reading moves by (to a tick per core, the counters' resolution)."""
    ours, theirs = cpu_share.sample().busy, _psutil_busy()
    busy_loop_until = time.monotonic() + 0.5
    while time.monotonic() < busy_loop_until:  # some busy time of our own to count
        pass
    ours_delta, theirs_delta = cpu_share.sample().busy - ours, _psutil_busy() - theirs
    tick = 0.02 * psutil.cpu_count()  # USER_HZ is 100: one tick per core per reading, twice
    assert ours_delta >= 0.4  # at least our own loop
    assert ours_delta == pytest.approx(theirs_delta, abs=tick)


def test_this_process_is_not_counted_as_another():
    """Our own busy loop is subtracted: what is left is the others', which psutil shows as the
    machine's busy time minus ours over the same window."""
    before, psutil_before, own_before = cpu_share.sample(), _psutil_busy(), time.process_time()
    until = time.monotonic() + 0.6
    while time.monotonic() < until:
        pass
    after, psutil_after, own_after = cpu_share.sample(), _psutil_busy(), time.process_time()
    expected = max(0.0, (psutil_after - psutil_before - (own_after - own_before)) / (after.wall - before.wall))
    assert cpu_share.others_busy_cores(before, after) == pytest.approx(expected, abs=0.15)


def test_too_short_a_window_says_nothing():
    start = cpu_share.sample()
    assert cpu_share.others_busy_cores(start, cpu_share.CpuSample(start.wall + 0.1, start.own, start.busy)) is None


@pytest.mark.parametrize(("cores", "others", "threads"), [
    (2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 1.0, 1), (2, 3.5, 1), (8, 2.0, 6), (8, 2.6, 5), (1, 0.0, 1)])
def test_threads_fit_in_the_free_cores(cores, others, threads):
    assert cpu_share.threads_for_share(cores, others) == threads


def test_torch_threads_on_a_busy_machine(monkeypatch, caplog):
    """Busy machine: fewer threads and one line; deterministic runs and explicit settings keep theirs."""
    from cnnlab.training import launchers

    monkeypatch.setattr(launchers, "available_cores", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(cpu_share, "others_busy_cores", lambda since: 1.0)
    start = cpu_share.sample()
    with caplog.at_level(logging.INFO, logger="cnnlab"):
        assert torch_threads(None, start) == 1
    assert "other processes used 1.0 of 2 cores while this run started; training with 1 torch thread instead of 2" \
        in caplog.text
    assert torch_threads(None, start, deterministic=True) is None
    assert torch_threads(3, start) == 3
    monkeypatch.setattr(cpu_share, "others_busy_cores", lambda since: 0.2)
    assert torch_threads(None, start) is None  # quiet: torch's default
