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


def cpu_model() -> str:
    """The processor's make and generation, e.g. "AMD EPYC (family 25 model 17 stepping 1)":
    from /proc/cpuinfo on Linux, else what the platform module says.  Trained weights
    repeat bit for bit on one processor model, not across them (the evaluation's models
    differ between an AMD EPYC and the earlier machine, both "AVX512" to torch), so cached
    models are keyed by it."""
    import platform
    import re

    fields = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if not line.strip():
                    break   # the first processor's block is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    # POWER names its generation in "cpu" ("POWER9 (raw), altivec supported"); s390x gives its
    # machine type inside "processor 0" ("version = FF, identification = ..., machine = 8561")
    s390 = re.search(r"machine\s*=\s*(\w+)", fields.get("processor 0", ""))
    name = (fields.get("model name") or fields.get("cpu") or (s390 and f"s390x machine {s390.group(1)}")
            or platform.processor() or platform.machine() or "unknown")
    # x86 names its generation by family / model / stepping; ARM has no "model name" and says it
    # by implementer / part (every aarch64 processor was one "aarch64": Graviton2 and 3 alike)
    keys = ("cpu family", "model", "stepping", "CPU implementer", "CPU architecture", "CPU variant", "CPU part",
            "CPU revision")
    gen = " ".join(f"{k.split()[-1]} {fields[k]}" for k in keys if fields.get(k))
    return f"{name} ({gen})" if gen else name
