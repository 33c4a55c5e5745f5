"""Our Triton selective scan against the reference: on CUDA directly, on CPU under ``TRITON_INTERPRET=1``
(``tests/test_kernels.py`` runs this file that way in a subprocess, so the default ``pytest -q`` runs it; every
test here must also run on CPU under the interpreter, or that test fails)."""
import importlib
import inspect
import math
import os
import warnings

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed")

import triton.language as tl  # noqa: E402

from smt.kernels import selective_scan, selective_scan_ref  # noqa: E402
from smt.kernels import triton_scan as ts  # noqa: E402
from conftest import FIXTURES  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="Triton on CPU tensors needs TRITON_INTERPRET=1")


def _inputs(batch, dim, nstate, length, bc, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    shapes = {"dn": (dim, nstate), "bnl": (batch, nstate, length), "bgnl2": (batch, 2, nstate, length)}
    return dict(u=r(batch, dim, length), delta=0.5 * r(batch, dim, length), A=-torch.exp(r(dim, nstate)),
                B=r(*shapes[bc]), C=r(*shapes[bc]), D=r(dim), z=r(batch, dim, length), delta_bias=0.5 * r(dim))


def _run(fn_impl, ins, weight):
    xs = {k: v.to(DEVICE).clone().requires_grad_(True) for k, v in ins.items()}
    out, last = selective_scan(**xs, delta_softplus=True, return_last_state=True, impl=fn_impl)
    (out * weight.to(DEVICE)).sum().backward()
    return [out, last] + [xs[k].grad for k in ins]


def _run_triton(ins, weight, kernel):
    xs = {k: v.to(DEVICE).clone().requires_grad_(True) for k, v in ins.items()}
    out, last = ts.selective_scan_triton(**xs, delta_softplus=True, return_last_state=True, kernel=kernel)
    (out * weight.to(DEVICE)).sum().backward()
    return [out, last] + [xs[k].grad for k in ins]


SS = importlib.import_module("smt.kernels.selective_scan")  # the module (smt.kernels.selective_scan is the function)


# The serial kernel (kernel="serial"): L = 1, one chunk exactly (64), a partial last chunk (70, 129); a non
# power-of-two channel count; groups.
# Tiles (BLOCK_D x BLOCK_N) of 8, 64, 32 and 256 elements: fewer than a 4-warp block's 128 threads, where the
# backward's scratch is replicated across threads. dB/dC reduced over the tile before the atomic (one group per
# program: 1 group, or 2 groups of 32 channels in tiles of 32) and element-wise (tiles straddling groups).
@pytest.mark.parametrize("batch,dim,nstate,length,bc,one_group", [
    (1, 3, 2, 1, "bnl", True), (2, 6, 3, 64, "bgnl2", False), (1, 5, 4, 70, "dn", False),
    (2, 12, 16, 129, "bnl", True), (1, 64, 2, 67, "bgnl2", True)])
def test_serial_triton_scan_matches_reference_values_and_grads(batch, dim, nstate, length, bc, one_group):
    groups = {"bnl": 1, "bgnl2": 2, "dn": dim}[bc]
    block_d, block_n, _ = ts._launch_dims(batch, dim, nstate)
    assert ts._one_group_per_program(dim, groups, block_d) == one_group  # the case covers the path it names
    ins = _inputs(batch, dim, nstate, length, bc)
    w = torch.randn(batch, dim, length, generator=torch.Generator().manual_seed(1))
    got = _run_triton(ins, w, "serial")
    ref = _run("reference", {k: v.double() for k, v in ins.items()}, w.double())
    names = ["out", "last"] + [f"grad {k}" for k in ins]
    for name, a, b in zip(names, got, ref):
        torch.testing.assert_close(a.double().cpu(), b.cpu(), rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


# The chunked kernels (the default) at several chunk lengths: one step in one chunk; 2 to 65 chunks with a partial
# last one; 65 chunks: more than one 64-chunk block of the chunk pass (its carry between blocks, both directions);
# dB/dC summed over a block (one group; 2 groups of 32 channels) and per channel (blocks straddling 2 groups of 3
# channels; time-invariant B/C, a group per channel).
@pytest.mark.parametrize("batch,dim,nstate,length,bc,chunk,nchunk,one_group", [
    (1, 3, 2, 1, "bnl", 4, 1, True), (2, 6, 3, 37, "bgnl2", 8, 5, False), (1, 5, 4, 70, "dn", 16, 5, False),
    (1, 6, 3, 129, "bnl", 2, 65, True), (1, 64, 2, 67, "bgnl2", 32, 3, True), (1, 4, 16, 20, "bnl", 8, 3, True)])
def test_chunked_scan_matches_reference_values_and_grads(monkeypatch, batch, dim, nstate, length, bc, chunk,
                                                         nchunk, one_group):
    monkeypatch.setattr(ts, "_SCAN_CHUNK", chunk)
    groups = {"bnl": 1, "bgnl2": 2, "dn": dim}[bc]
    grids = ts.chunked_grids(batch, length, dim, nstate)
    assert grids["chunk_scan_bwd"][2] == nchunk  # the case has the chunk count it names
    assert ts._one_group_per_program(dim, groups, ts._chunked_dims(torch.zeros(batch, length, dim),
                                                                   torch.zeros(1, groups, length, nstate), None)[6]
                                     ) == one_group
    ins = _inputs(batch, dim, nstate, length, bc, seed=2)
    w = torch.randn(batch, dim, length, generator=torch.Generator().manual_seed(3))
    got = _run_triton(ins, w, "chunked")
    ref = _run("reference", {k: v.double() for k, v in ins.items()}, w.double())
    names = ["out", "last"] + [f"grad {k}" for k in ins]
    for name, a, b in zip(names, got, ref):
        torch.testing.assert_close(a.double().cpu(), b.cpu(), rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_chunked_and_serial_kernels_agree():
    """The two Triton implementations, same inputs, float32: values and every gradient within float rounding."""
    ins = _inputs(1, 40, 4, 70, "bnl", seed=4)  # 2 channel blocks of the chunked kernel, the second partial
    w = torch.randn(1, 40, 70, generator=torch.Generator().manual_seed(5))
    chunked, serial = _run_triton(ins, w, "chunked"), _run_triton(ins, w, "serial")
    for name, a, b in zip(["out", "last"] + [f"grad {k}" for k in ins], chunked, serial):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5, msg=lambda m: f"{name}: {m}")


def test_chunked_grids_fill_an_h100_at_the_profiles_shapes():
    """At MambaIRv2-L's scans in the ntire2025 profile (stage 1: 8 images of 64 x 64 per GPU; stage 2: 2 of
    128 x 128; 348 channels, 16 states) every chunked kernel launches at least 2 programs per SM of an H100
    (132 SMs), where the serial kernel launched 88 and 22."""
    from smt.smoke import scan_profile_shapes

    shapes = scan_profile_shapes()
    assert shapes == {"s1": (8, 4096, 348, 16), "s2": (2, 16384, 348, 16)}
    for stage, (batch, length, dim, nstate) in shapes.items():
        for kernel, grid in ts.chunked_grids(batch, length, dim, nstate).items():
            assert math.prod(grid) >= 2 * 132, (stage, kernel, grid)
        assert math.prod(ts._launch_dims(batch, dim, nstate)[2:]) * batch < 132  # the serial grid, for contrast


def test_chunked_backward_uses_no_atomics():
    """Static check: the chunked kernels write partial sums that PyTorch reduces in a fixed order, so their
    gradients are the same from run to run; an atomic add would make dA/dB/dC depend on the order programs run."""
    for kernel in (ts._chunk_sums, ts._chunk_pass, ts._chunk_scan_fwd, ts._chunk_scan_bwd):
        assert "atomic" not in inspect.getsource(kernel.fn), kernel.fn.__name__
    assert ts._KERNELS["chunked"] == (ts._forward_chunked, ts._backward_chunked)


@pytest.mark.parametrize("layout", ["grouped", "plain"])
def test_triton_scan_matches_official_fixture(layout):
    ref = torch.load(FIXTURES / "selective_scan_ref.pt", weights_only=True)
    names = ["u", "delta", "A", "B", "C", "D", "delta_bias"] + (["z"] if layout == "plain" else [])
    ins = {n: ref[f"{layout}_{n}"].float() for n in names}
    got = _run("triton", ins, ref[f"{layout}_w"].float())
    torch.testing.assert_close(got[0].cpu(), ref[f"{layout}_out_fp32"].float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1].cpu(), ref[f"{layout}_last_state_fp32"].float(), rtol=1e-5, atol=1e-5)
    for n, g in zip(names, got[2:]):
        torch.testing.assert_close(g.cpu(), ref[f"{layout}_grad_{n}_fp32"].float(), rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"grad {n}: {m}")


def test_auto_dispatch_runs_a_gpu_kernel_not_the_reference(monkeypatch):
    """The CUDA dispatch (``impl="auto"``) resolves to a GPU kernel (mamba_ssm or ours) and runs it: the
    reference backend is replaced by one that fails, and a fallback warning is an error, so a silent fallback
    fails this test. On CPU the CUDA dispatch path is driven directly with CPU tensors (Triton interpreter)."""
    monkeypatch.setattr(SS, "_CUDA_BACKENDS", None)  # resolved afresh here; the process's choice restored after
    name, why = SS.cuda_scan_backend(refresh=True)
    assert name in ("mamba_ssm", "triton"), why
    if DEVICE == "cpu" and name != "triton":
        pytest.skip("mamba_ssm's kernel needs CUDA")

    def reference_must_not_run(*args):
        raise AssertionError("the CUDA dispatch fell back to the PyTorch reference")

    for backend in SS._cuda_backends():
        if backend.name == "reference":
            backend.fn = reference_must_not_run
    ins = _inputs(1, 8, 4, 300, "bnl")
    ref = selective_scan_ref(**ins, delta_softplus=True)
    args = [ins[k].to(DEVICE) for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")] + [True, False]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out = selective_scan(*args[:8], delta_softplus=True) if DEVICE == "cuda" else SS._scan_cuda(*args)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)
    assert SS.cuda_scan_backend()[0] == name


@pytest.mark.parametrize("kernel", ["chunked", "serial"])
def test_inference_forward_skips_chunk_states_and_equals_the_training_forward(kernel):
    ins = _inputs(2, 12, 4, 70, "bnl")
    xs = {k: v.to(DEVICE) for k, v in ins.items()}
    with torch.no_grad():
        fast, fast_last = ts.selective_scan_triton(**xs, delta_softplus=True, return_last_state=True, kernel=kernel)
    xs["u"] = xs["u"].clone().requires_grad_(True)
    full, full_last = ts.selective_scan_triton(**xs, delta_softplus=True, return_last_state=True, kernel=kernel)
    assert full.requires_grad and not fast.requires_grad
    torch.testing.assert_close(fast, full.detach(), rtol=0, atol=0)
    torch.testing.assert_close(fast_last, full_last, rtol=0, atol=0)
    dims = [t.to(DEVICE) for t in (torch.zeros(1, 70, 3), torch.zeros(1, 70, 3), -torch.ones(3, 2),
                                   torch.zeros(1, 1, 70, 2), torch.zeros(1, 1, 70, 2))]
    if kernel == "serial":
        assert ts._forward(*dims, store_states=False)[2] == ()  # nothing kept for a backward
        (hs,) = ts._forward(*dims, store_states=True)[2]
        assert hs.shape == (1, 2, 3, 2)  # two chunks of 64 steps
    else:
        assert ts._forward_chunked(*dims, store_states=False)[2] == ()
        (hs,) = ts._forward_chunked(*dims, store_states=True, chunk=64)[2]
        assert hs.shape == (1, 3, 3, 2)  # the state entering each of two chunks of 64 steps, and the last


@triton.jit
def _offsets_probe(out_ptr, b, t, L, D, G, N, NCHUNK, c):
    tl.store(out_ptr + 0, ts._seq_offset(b, t, L, D))
    tl.store(out_ptr + 1, ts._bc_offset(b, 1, t, G, L, N))
    tl.store(out_ptr + 2, ts._state_offset(b, c, NCHUNK, D, N))


def test_kernel_offsets_are_int64_beyond_2_pow_31():
    """The kernels' offset helpers with int32 arguments whose offsets pass 2**31 (B*L*D of one large image):
    exact, not wrapped; and both kernels take their batch index as int64."""
    b, t, L, D, G, N, NCHUNK, c = 5, 7, 2 ** 21, 2 ** 11, 2, 2 ** 10, 2 ** 15, 3
    out = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    _offsets_probe[(1,)](out, b, t, L, D, G, N, NCHUNK, c)
    want = [(b * L + t) * D, ((b * G + 1) * L + t) * N, (b * NCHUNK + c) * D * N]
    assert min(want) >= 2 ** 31
    assert out.tolist() == want
    assert "pid_b = tl.program_id(0).to(tl.int64)" in inspect.getsource(ts._program_block.fn)
    for kernel in (ts._scan_fwd, ts._scan_bwd):
        assert "pid_b, pid_d, d, n, md, m2, grp, a = _program_block(" in inspect.getsource(kernel.fn)
    assert "pid_b = tl.program_id(0).to(tl.int64)" in inspect.getsource(ts._chunk_tile.fn)
    for kernel in (ts._chunk_sums, ts._chunk_scan_fwd, ts._chunk_scan_bwd):
        assert "pid_b, t, d, md, m, off, bc = _chunk_tile(" in inspect.getsource(kernel.fn)
    assert "pid_b = tl.program_id(0).to(tl.int64)" in inspect.getsource(ts._chunk_pass.fn)


def test_backward_separates_scratch_writes_and_reads_with_barriers():
    """Static check (the interpreter runs one thread, so no run can show the race): in the backward, a barrier
    follows the chunk's scratch writes before its reads, and another follows the reads before the next chunk's
    writes."""
    src = inspect.getsource(ts._scan_bwd.fn)
    last_write = src.rindex("tl.store(work")
    first_read, last_read = src.index("tl.load(work"), src.rindex("tl.load(work")
    barriers = [i for i in range(len(src)) if src.startswith("tl.debug_barrier()", i)]
    assert any(last_write < i < first_read for i in barriers)
    assert any(i > last_read for i in barriers)


def test_smoke_times_the_chunked_scan_against_the_serial_one():
    """``python -m smt smoke``'s scan timing runs both Triton kernels (and mamba_ssm's where it imports) and
    reports each one's ratio to the chunked kernel (here at a small shape; the smoke uses the profile's)."""
    from smt import smoke

    rows = smoke._scan_speed_rows(torch.device(DEVICE), shapes={"tiny": (1, 70, 8, 2)}, reps=1)
    assert len(rows) == 1 and rows[0].ok
    assert rows[0].check.startswith("scan speed tiny: fwd+bwd batch 1 L=70 D=8 N=2")
    assert "triton chunked" in rows[0].value and "(1.00x)" in rows[0].value and "triton serial" in rows[0].value
    assert "per training step" in rows[0].value
