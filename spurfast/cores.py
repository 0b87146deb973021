"""How many CPU cores this process may use.

``os.cpu_count()`` counts the machine's cores, not the ones this process is allowed to run
on: under ``taskset``, a cgroup cpuset (``docker --cpuset-cpus``) or a batch scheduler's
binding it overstates them, and a decoder pool sized by it oversubscribes the allowed
cores.  The affinity mask is what the process can actually use (what Python 3.13's
``os.process_cpu_count()`` returns).
"""
from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores in this process's CPU affinity mask (all the machine's where the platform has
    no affinity call), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):   # macOS, Windows
        return max(1, os.cpu_count() or 1)
