"""``smt.infer.malloc.keep_freed_memory``: after it, a 30 MiB tensor comes from the heap rather than a fresh
mapping (glibc's ``mallinfo2``), tensors allocated again and again stop page-faulting (the process's minor
page faults), and ``SMT_DEFAULT_MALLOC`` keeps malloc's defaults. The setting is process-wide, so each case
runs in its own interpreter."""
import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# eight 6 MiB tensors at once, ten times (under glibc's defaults the freed heap top may be handed back to the
# kernel and faulted in again every round; whether it is depends on the dynamic thresholds' history)
CHURN = """
import json, resource, torch
from smt.infer.malloc import keep_freed_memory
status = keep_freed_memory()
faults = []
for _ in range(10):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ts = [torch.empty(6 * 2**18).fill_(1.0) for _ in range(8)]
    del ts
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps({"status": status, "faults": faults}))
"""

# how many bytes a live 30 MiB tensor adds to malloc's mmapped blocks (glibc's mallinfo2)
MAPPED = """
import ctypes, json, torch
from smt.infer.malloc import keep_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
status = keep_freed_memory()
before = libc.mallinfo2().hblkhd
t = torch.empty(30 * 2**18)
print(json.dumps({"status": status, "mapped": libc.mallinfo2().hblkhd - before}))
"""


def _glibc_mallinfo2() -> bool:
    try:
        ctypes.CDLL(None).mallinfo2  # noqa: B018 - glibc 2.33 and later
    except (OSError, AttributeError):
        return False
    return True


def _run(code: str, default_malloc: bool) -> dict:
    env = {**os.environ, "SMT_DEFAULT_MALLOC": "1" if default_malloc else "0"}
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not _glibc_mallinfo2(), reason="the setting applies to glibc's malloc only")
def test_keep_freed_memory_serves_large_tensors_from_the_heap():
    tuned, default = _run(MAPPED, False), _run(MAPPED, True)
    assert tuned["status"].startswith("glibc ") and "keeps freed memory" in tuned["status"]
    assert default["status"] == "malloc defaults (SMT_DEFAULT_MALLOC is set)"
    assert default["mapped"] >= 30 * 2**20  # glibc's default: a fresh mapping for the block
    assert tuned["mapped"] == 0  # the reused heap


@pytest.mark.skipif(not _glibc_mallinfo2(), reason="the setting applies to glibc's malloc only")
def test_keep_freed_memory_leaves_no_page_faults_once_the_heap_has_grown():
    faults = _run(CHURN, False)["faults"]
    assert faults[0] >= 8 * 6 * 2**20 // 4096  # the first round faults its 48 MiB in (the measure works)
    assert sum(faults[5:]) < 0.01 * faults[0]  # later rounds reuse the same pages


def test_malloc_status_before_and_after_keep_freed_memory():
    code = ("from smt.infer.malloc import keep_freed_memory, malloc_status\n"
            "print(malloc_status()); print(keep_freed_memory() == malloc_status() == keep_freed_memory())")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "SMT_DEFAULT_MALLOC": "1"})
    assert res.stdout.split("\n")[:2] == ["malloc defaults (keep_freed_memory not called)", "True"], res.stderr
