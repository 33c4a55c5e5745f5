"""Where GPU work runs, checked without a GPU: each process's device and current device (one GPU per rank), the
Triton scan launched under its input's device, and the CUDA selective-scan backend choice and its fallbacks."""
import contextlib
import importlib
import json
import os
import subprocess
import sys
import types

import pytest
import torch

import smt.distributed as sd
from conftest import REPO

ss = importlib.import_module("smt.kernels.selective_scan")  # the module; smt.kernels exports a function of that name


# --- device per process ---------------------------------------------------------------------------------------

def test_select_device_is_one_gpu_per_local_rank():
    assert sd.select_device("cpu", 3, 8) == torch.device("cpu")
    assert sd.select_device("auto", 0, 0) == torch.device("cpu")
    for rank in range(8):
        assert sd.select_device("auto", rank, 8) == torch.device("cuda", rank)
        assert sd.select_device("cuda", rank, 8) == torch.device("cuda", rank)
    with pytest.raises(RuntimeError, match="LOCAL_RANK=2 but this process sees only 2 CUDA device"):
        sd.select_device("cuda", 2, 2)
    with pytest.raises(RuntimeError, match="no CUDA device is available"):
        sd.select_device("cuda", 0, 0)
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        sd.select_device("gpu", 0, 1)


def _fake_gpus(monkeypatch, count: int) -> list:
    """Pretend this process sees ``count`` GPUs; returns the list of set_device calls."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(torch.device(d)))
    return calls


@pytest.mark.parametrize("rank", [0, 5])
def test_device_for_makes_the_rank_gpu_current(monkeypatch, rank):
    calls = _fake_gpus(monkeypatch, 8)
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    assert sd.device_for("auto") == torch.device("cuda", rank)
    assert calls == [torch.device("cuda", rank)]
    assert sd.device_for("cpu") == torch.device("cpu") and len(calls) == 1


def test_device_for_refuses_more_ranks_than_gpus(monkeypatch):
    calls = _fake_gpus(monkeypatch, 2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(RuntimeError, match="LOCAL_RANK=3 but this process sees only 2"):
        sd.device_for("cuda")
    assert calls == []


def test_nccl_group_is_bound_to_the_rank_device(monkeypatch):
    calls = _fake_gpus(monkeypatch, 8)
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setattr(sd.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(sd.dist, "init_process_group", lambda backend, device_id=None, timeout=None: seen.update(
        backend=backend, device_id=device_id, timeout=timeout))
    sd.init_process_group(torch.device("cuda", 6))
    assert seen == {"backend": "nccl", "device_id": torch.device("cuda", 6), "timeout": sd.process_group_timeout()}
    assert calls == [torch.device("cuda", 6)]


_RANK_SCRIPT = """
import json, os, sys
import torch
import torch.distributed as dist
import smt.distributed as sd

calls = []
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: int(sys.argv[2])
torch.cuda.set_device = lambda d: calls.append(str(torch.device(d)))
try:
    device = str(sd.device_for("cuda"))
except RuntimeError as exc:
    device = "error: " + str(exc)
sd.init_process_group(torch.device("cpu"))  # gloo: the ranks meet as a real torchrun job would
got = [None] * dist.get_world_size()
dist.all_gather_object(got, {"rank": dist.get_rank(), "local_rank": sd.local_rank(), "device": device,
                             "set_device": calls})
if dist.get_rank() == 0:
    with open(sys.argv[1], "w") as fh:
        json.dump(got, fh)
dist.destroy_process_group()
"""


@pytest.mark.parametrize("gpus", [2, 1])
def test_two_process_job_gives_each_rank_its_gpu(tmp_path, gpus):
    script, out = tmp_path / "rank.py", tmp_path / "ranks.json"
    script.write_text(_RANK_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(out), str(gpus)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = json.loads(out.read_text())
    assert [r["local_rank"] for r in ranks] == [0, 1]
    if gpus == 2:
        assert [r["device"] for r in ranks] == ["cuda:0", "cuda:1"]
        assert [r["set_device"] for r in ranks] == [["cuda:0"], ["cuda:1"]]
    else:  # rank 1 has no GPU of its own: a clear error, and nothing made current
        assert ranks[0]["device"] == "cuda:0"
        assert ranks[1]["device"].startswith("error: LOCAL_RANK=1 but this process sees only 1 CUDA device")
        assert ranks[1]["set_device"] == []


# --- Triton scan launches under its input's device -------------------------------------------------------------

def _record_launches(monkeypatch, ts, kernels: dict[str, str]) -> list:
    """Replace the Triton kernels ``kernels`` (attribute -> label) of module ``ts`` by fakes that record
    ``(label, devices entered by _on_device at launch)``; returns that record."""
    active, launched = [], []

    class Guard:
        def __init__(self, x):
            self.device = x.device

        def __enter__(self):
            active.append(self.device)

        def __exit__(self, *exc):
            active.pop()

    class FakeKernel:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append((self.name, list(active)))
            return launch

    monkeypatch.setattr(ts, "_on_device", Guard)
    for attr, label in kernels.items():
        monkeypatch.setattr(ts, attr, FakeKernel(label))
    return launched


def test_triton_launches_run_under_the_input_device(monkeypatch):
    ts = pytest.importorskip("smt.kernels.triton_scan", reason="Triton is not installed")
    assert isinstance(ts._on_device(torch.zeros(1)), contextlib.nullcontext)
    launched = _record_launches(monkeypatch, ts, {"_scan_fwd": "fwd", "_scan_bwd": "bwd"})
    u = torch.randn(1, 4, 8, requires_grad=True)
    out = ts.selective_scan_triton(u, torch.rand(1, 4, 8), -torch.rand(4, 2), torch.randn(1, 2, 8),
                                   torch.randn(1, 2, 8), kernel="serial")
    out.sum().backward()
    assert launched == [("fwd", [u.device]), ("bwd", [u.device])]


@pytest.mark.cuda
def test_triton_scan_on_a_gpu_other_than_the_current_one():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    ins = [torch.randn(2, 8, 16), 0.5 * torch.rand(2, 8, 16), -torch.rand(8, 4), torch.randn(2, 4, 16),
           torch.randn(2, 4, 16)]
    want = ss.selective_scan_ref(*ins)
    with torch.cuda.device(0):
        got = ss.selective_scan(*[t.to("cuda:1") for t in ins], impl="triton")
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


# --- CUDA backend choice ---------------------------------------------------------------------------------------

@pytest.fixture
def fresh_backends(monkeypatch):
    """Resolve the CUDA backend anew in the test, and leave the process's cached choice as it was."""
    monkeypatch.setattr(ss, "_CUDA_BACKENDS", None)


def _mamba_stand_in(monkeypatch, extension: bool) -> list:
    """A mamba_ssm that imports; its kernel fails like current mamba_ssm does when built without CUDA."""
    calls = []

    def selective_scan_fn(*args):
        calls.append(args)
        if not extension:
            raise RuntimeError("selective_scan_cuda is not installed")
        return ss.selective_scan_ref(*args)

    iface = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    iface.selective_scan_fn = selective_scan_fn
    ops = types.ModuleType("mamba_ssm.ops")
    ops.selective_scan_interface = iface
    pkg = types.ModuleType("mamba_ssm")
    pkg.ops = ops
    for name, mod in (("mamba_ssm", pkg), ("mamba_ssm.ops", ops), ("mamba_ssm.ops.selective_scan_interface", iface)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setitem(sys.modules, "selective_scan_cuda", types.ModuleType("selective_scan_cuda")
                        if extension else None)  # None in sys.modules: the import fails
    return calls


def _scan_args():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 4, 6, generator=g), torch.rand(1, 4, 6, generator=g), -torch.rand(4, 3, generator=g),
            torch.randn(1, 3, 6, generator=g), torch.randn(1, 3, 6, generator=g), None, None, None, False, False)


def test_mamba_ssm_without_its_cuda_extension_falls_back_and_says_so(monkeypatch, fresh_backends):
    calls = _mamba_stand_in(monkeypatch, extension=False)
    monkeypatch.setattr(ss, "_triton_fn", lambda: ss.selective_scan_ref)
    name, reason = ss.cuda_scan_backend()
    assert name == "triton"
    assert "selective_scan_cuda does not load" in reason and "our Triton kernel" in reason
    torch.testing.assert_close(ss._scan_cuda(*_scan_args()), ss.selective_scan_ref(*_scan_args()))
    assert calls == []  # mamba_ssm's kernel is never called
    monkeypatch.setattr(ss, "_triton_fn", lambda: None)
    name, reason = ss.cuda_scan_backend(refresh=True)
    assert name == "reference" and "Triton is not installed" in reason


def test_mamba_ssm_with_its_extension_is_chosen_once(monkeypatch, fresh_backends):
    calls = _mamba_stand_in(monkeypatch, extension=True)
    assert ss.cuda_scan_backend()[0] == "mamba_ssm"
    monkeypatch.delitem(sys.modules, "selective_scan_cuda")  # cached: not looked up again
    ss._scan_cuda(*_scan_args())
    assert ss.cuda_scan_backend()[0] == "mamba_ssm" and len(calls) == 1


def test_backend_failing_on_first_call_is_dropped_with_a_warning(monkeypatch, fresh_backends):
    calls = _mamba_stand_in(monkeypatch, extension=True)

    def broken(*args):
        calls.append(args)
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(sys.modules["mamba_ssm.ops.selective_scan_interface"], "selective_scan_fn", broken)
    monkeypatch.setattr(ss, "_triton_fn", lambda: ss.selective_scan_ref)
    with pytest.warns(RuntimeWarning, match="mamba_ssm failed .*no kernel image.*using triton instead"):
        out = ss._scan_cuda(*_scan_args())
    torch.testing.assert_close(out, ss.selective_scan_ref(*_scan_args()))
    name, reason = ss.cuda_scan_backend()
    assert name == "triton" and "mamba_ssm failed on its first call" in reason
    ss._scan_cuda(*_scan_args())
    assert len(calls) == 1


def test_backend_errors_after_a_first_success_are_raised(monkeypatch, fresh_backends):
    state = {"fail": False}

    def flaky(*args):
        if state["fail"]:
            raise RuntimeError("shape mismatch")
        return ss.selective_scan_ref(*args)

    monkeypatch.setattr(ss, "_mamba_ssm_fn", lambda: (None, "absent"))
    monkeypatch.setattr(ss, "_triton_fn", lambda: flaky)
    ss._scan_cuda(*_scan_args())
    state["fail"] = True
    with pytest.raises(RuntimeError, match="shape mismatch"):
        ss._scan_cuda(*_scan_args())
    assert ss.cuda_scan_backend()[0] == "triton"


def test_an_error_of_every_backend_is_the_caller_s_and_changes_nothing(monkeypatch, fresh_backends):
    def bad_input(*args):
        raise ValueError("B has the wrong shape")

    monkeypatch.setattr(ss, "_mamba_ssm_fn", lambda: (bad_input, "stand-in"))
    monkeypatch.setattr(ss, "_triton_fn", lambda: lambda *args: 1 / 0)
    monkeypatch.setattr(ss, "selective_scan_ref", bad_input)
    with pytest.raises(ValueError, match="B has the wrong shape"):  # the preferred backend's error
        ss._scan_cuda(*_scan_args())
    assert [b.name for b in ss._cuda_backends()] == ["mamba_ssm", "triton", "reference"]


def test_cpu_impl_refuses_tensors_elsewhere():
    u = torch.empty(1, 4, 6, device="meta")
    with pytest.raises(ValueError, match="impl 'cpu' runs a C kernel on CPU memory, but got tensors on meta"):
        ss.selective_scan(u, u, torch.empty(4, 3, device="meta"), torch.empty(1, 3, 6, device="meta"),
                          torch.empty(1, 3, 6, device="meta"), impl="cpu")


def test_check_reports_the_cuda_scan_backend(monkeypatch, fresh_backends):
    from smt.profile import check_params

    _mamba_stand_in(monkeypatch, extension=False)
    items = check_params(REPO / "profiles" / "ntire2025.yaml", gpus=8)
    scan = [i for i in items if i.what.startswith("selective scan on CUDA:")]
    assert len(scan) == 1 and scan[0].status == "todo"
    assert "selective_scan_cuda does not load" in scan[0].what and ss.cuda_scan_backend()[0] in scan[0].what


def test_chunked_triton_launches_run_under_the_input_device(monkeypatch):
    ts = pytest.importorskip("smt.kernels.triton_scan", reason="Triton is not installed")
    names = ("_chunk_sums", "_chunk_pass", "_chunk_scan_fwd", "_chunk_scan_bwd")
    launched = _record_launches(monkeypatch, ts, {n: n for n in names})
    u = torch.randn(1, 4, 8, requires_grad=True)
    out = ts.selective_scan_triton(u, torch.rand(1, 4, 8), -torch.rand(4, 2), torch.randn(1, 2, 8),
                                   torch.randn(1, 2, 8), kernel="chunked")
    out.sum().backward()
    assert {n for n, _ in launched} == set(names)
    assert all(devices == [u.device] for _, devices in launched)
