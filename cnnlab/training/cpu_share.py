"""How many cores other processes are using now, so that a run on a busy machine does not ask
for more threads than it can get.

Why: torch's intra-op parallel regions end in a barrier, so a step goes at the pace of its
slowest thread. With 2 threads on 2 cores and one other CPU-bound process, one of the two
threads shares its core with that process and every barrier waits for the scheduler to give it
its time slice back: 300 batches of the chapter's baseline took 11.2-24.6 s with 2 threads
against 3.3-4.2 s with 1 on the same busy machine (issue #14). benchmarks/contention.py
measures it.

The measure costs nothing extra: the machine-wide busy time in /proc/stat, minus this process's
own CPU time, over the seconds the run spends starting (imports, data loading) anyway.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

PROC_STAT = "/proc/stat"
MIN_WINDOW_S = 0.25  # shorter than a few scheduler ticks (4-10 ms) times the cores says little


@dataclass(frozen=True)
class CpuSample:
    wall: float  # time.monotonic()
    own: float  # this process's CPU seconds, all threads
    busy: float | None  # machine-wide busy CPU seconds since boot; None where /proc/stat is not there


def _busy_seconds() -> float | None:
    try:
        with open(PROC_STAT) as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    # cpu  user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
    ticks = [int(value) for value in fields[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


def sample() -> CpuSample:
    return CpuSample(time.monotonic(), time.process_time(), _busy_seconds())


def others_busy_cores(since: CpuSample, now: CpuSample | None = None) -> float | None:
    """Cores' worth of CPU that other processes used between two samples (None: not measurable)."""
    now = now or sample()
    window = now.wall - since.wall
    if since.busy is None or now.busy is None or window < MIN_WINDOW_S:
        return None
    return max(0.0, (now.busy - since.busy - (now.own - since.own)) / window)


def threads_for_share(cores: int, others: float) -> int:
    """Threads that fit in the cores other processes leave free: at least 1, at most `cores`.
    A core counts as taken when others use more than half of it."""
    return max(1, min(cores, int(cores - others + 0.5)))
