"""usable_cores counts the cores a process may run on, not the machine's."""
import os
import subprocess
import sys

import pytest

from spurfast.cores import usable_cores

pinned = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")


@pinned
def test_follows_the_affinity_mask():
    assert usable_cores() == len(os.sched_getaffinity(0))


@pinned
def test_one_core_under_taskset_like_pinning():
    # a child pinned to one core (what taskset or a cgroup cpuset does) sees one core
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from spurfast.cores import usable_cores; print(usable_cores(), os.cpu_count())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    pinned_cores, machine = map(int, out.stdout.split())
    assert pinned_cores == 1
    assert machine >= 1


@pinned
def test_cpu_kmeans_threads_follow_the_affinity_mask():
    # torch may be told to use more threads than the process has cores; the CPU k-means
    # splits its work over the cores it may use
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "import torch; torch.set_num_threads(4); "
            "from spurfast.kernels.kmeans_cpu import _threads; print(_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) == 1


def test_cpu_model_names_the_processor_and_its_generation():
    """The evaluation keys cached models by it: the make alone ("AMD EPYC") would not tell two
    generations apart, whose oneDNN kernels round differently."""
    from pathlib import Path

    from spurfast.cores import cpu_model
    name = cpu_model()
    assert name and name != "unknown"
    info = Path("/proc/cpuinfo").read_text(errors="replace") if Path("/proc/cpuinfo").is_file() else ""
    first = dict(ln.split(":", 1) for ln in info.split("\n\n")[0].splitlines() if ":" in ln)
    first = {k.strip(): v.strip() for k, v in first.items()}
    if first.get("model name"):
        assert name.startswith(first["model name"]), name
    if first.get("cpu family") and first.get("model"):
        assert f"family {first['cpu family']} model {first['model']}" in name, name


def test_cpu_model_tells_arm_processors_apart(monkeypatch):
    """aarch64's /proc/cpuinfo has no model name, family or model: every ARM processor was
    "aarch64", so models trained on one were taken for another's."""
    import builtins
    import io

    from spurfast import cores

    def cpuinfo(part):
        return ("processor\t: 0\nBogoMIPS\t: 243.75\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
                f"CPU variant\t: 0x1\nCPU part\t: {part}\nCPU revision\t: 1\n\nprocessor\t: 1\n")

    real_open = builtins.open
    names = []
    for part in ("0xd0c", "0xd40"):   # Neoverse-N1 (Graviton2), Neoverse-V1 (Graviton3)
        monkeypatch.setattr(builtins, "open", lambda f, *a, part=part, **k: io.StringIO(cpuinfo(part))
                            if f == "/proc/cpuinfo" else real_open(f, *a, **k))
        names.append(cores.cpu_model())
    assert names[0] != names[1] and "part 0xd0c" in names[0] and "implementer 0x41" in names[0]


def test_cpu_model_tells_power_and_s390x_processors_apart(monkeypatch):
    """POWER names its generation in the "cpu" field and s390x its machine type inside
    "processor 0": neither has a model name, and every POWER host was one "ppc64le"."""
    import builtins
    import io
    import platform

    from spurfast import cores

    real_open = builtins.open
    monkeypatch.setattr(platform, "processor", lambda: "ppc64le")
    texts = {"POWER8": "processor\t: 0\ncpu\t\t: POWER8E (raw), altivec supported\nrevision\t: 2.1\n\n",
             "POWER9": "processor\t: 0\ncpu\t\t: POWER9 (raw), altivec supported\nrevision\t: 2.2\n\n",
             "z15": "vendor_id       : IBM/S390\n# processors    : 4\nprocessor 0: version = 00,  identification = "
                    "1A2B3C,  machine = 8561\n\n",
             "z16": "vendor_id       : IBM/S390\n# processors    : 4\nprocessor 0: version = 00,  identification = "
                    "1A2B3C,  machine = 3931\n\n"}
    names = {}
    for gen, text in texts.items():
        monkeypatch.setattr(builtins, "open", lambda f, *a, text=text, **k: io.StringIO(text)
                            if f == "/proc/cpuinfo" else real_open(f, *a, **k))
        names[gen] = cores.cpu_model()
    assert names["POWER8"].startswith("POWER8E") and names["POWER9"].startswith("POWER9"), names
    assert names["z15"] == "s390x machine 8561" and names["z16"] == "s390x machine 3931", names
