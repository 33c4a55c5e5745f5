"""``smt.infer.malloc.keep_freed_memory``: after it, tensors allocated again and again reuse the heap instead of
page-faulting fresh memory (measured by the process's minor page faults), and ``SMT_DEFAULT_MALLOC`` keeps
malloc's defaults. The setting is process-wide, so each case runs in its own interpreter."""
import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# eight 6 MiB tensors at once, ten times: with glibc's defaults the mmap threshold rises to 6 MiB and the trim
# threshold to 12 MiB, so the 48 MiB heap top is handed back to the kernel and faulted in again every round
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


def _glibc() -> bool:
    try:
        ctypes.CDLL(None).gnu_get_libc_version  # noqa: B018
    except (OSError, AttributeError):
        return False
    return True


def _churn(default_malloc: bool) -> dict:
    env = {**os.environ, "SMT_DEFAULT_MALLOC": "1" if default_malloc else "0"}
    res = subprocess.run([sys.executable, "-c", CHURN], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not _glibc(), reason="the setting applies to glibc's malloc only")
def test_keep_freed_memory_stops_page_faults_on_reallocated_tensors():
    tuned, default = _churn(False), _churn(True)
    assert tuned["status"].startswith("glibc ") and "keeps freed memory" in tuned["status"]
    assert default["status"] == "malloc defaults (SMT_DEFAULT_MALLOC is set)"
    steady_default, steady_tuned = sum(default["faults"][5:]), sum(tuned["faults"][5:])
    assert steady_default > 5 * 6 * 2**20 // 4096  # the defaults re-fault at least one 6 MiB tensor per round
    assert steady_tuned < 0.05 * steady_default


def test_malloc_status_before_and_after_keep_freed_memory():
    code = ("from smt.infer.malloc import keep_freed_memory, malloc_status\n"
            "print(malloc_status()); print(keep_freed_memory() == malloc_status() == keep_freed_memory())")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "SMT_DEFAULT_MALLOC": "1"})
    assert res.stdout.split("\n")[:2] == ["malloc defaults (keep_freed_memory not called)", "True"], res.stderr
