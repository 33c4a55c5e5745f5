"""Every kernel path against its reference: values and gradients, fixture parity, long sequences."""
import pytest
import torch

from smt.kernels import selective_scan, selective_scan_ref, window_attention
from smt.kernels.cpu_build import load_library, openmp_library, openmp_status
from smt.kernels.selective_scan import selective_scan_cpu, selective_scan_rows
from conftest import FIXTURES

SCAN_REF = torch.load(FIXTURES / "selective_scan_ref.pt", weights_only=True)
HAS_CPU_KERNEL = load_library() is not None
PATHS = ["reference"] + (["cpu"] if HAS_CPU_KERNEL else [])
NAMES = ["u", "delta", "A", "B", "C", "D", "delta_bias"]


def test_cpu_kernel_builds_here():
    # the project's machines have a C compiler; a silent fallback would hide a 30x slowdown
    assert HAS_CPU_KERNEL


@pytest.mark.parametrize("impl", PATHS)
@pytest.mark.parametrize("layout", ["grouped", "plain"])
@pytest.mark.parametrize("dtype,suffix,rtol,atol", [(torch.float64, "", 1e-10, 1e-12),
                                                     (torch.float32, "_fp32", 1e-5, 1e-5)])
def test_scan_matches_official_fixture(impl, layout, dtype, suffix, rtol, atol):
    names = NAMES + (["z"] if layout == "plain" else [])
    ins = {n: SCAN_REF[f"{layout}_{n}"].to(dtype).clone().requires_grad_(True) for n in names}
    out, last = selective_scan(ins["u"], ins["delta"], ins["A"], ins["B"], ins["C"], ins["D"], ins.get("z"),
                               ins["delta_bias"], delta_softplus=True, return_last_state=True, impl=impl)
    (out * SCAN_REF[f"{layout}_w"].to(dtype)).sum().backward()
    torch.testing.assert_close(out, SCAN_REF[f"{layout}_out{suffix}"].to(dtype), rtol=rtol, atol=atol)
    torch.testing.assert_close(last, SCAN_REF[f"{layout}_last_state{suffix}"].to(dtype), rtol=rtol, atol=atol)
    for n in names:
        torch.testing.assert_close(ins[n].grad, SCAN_REF[f"{layout}_grad_{n}{suffix}"].to(dtype), rtol=rtol,
                                   atol=atol, msg=lambda m: f"grad {n}: {m}")


def _inputs(batch, dim, nstate, length, bc_shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    shapes = {"dn": (dim, nstate), "bnl": (batch, nstate, length), "bgnl2": (batch, 2, nstate, length),
              "bgnl1": (batch, 1, nstate, length)}
    return dict(u=r(batch, dim, length), delta=0.5 * r(batch, dim, length), A=-torch.exp(r(dim, nstate)),
                B=r(*shapes[bc_shape]), C=r(*shapes[bc_shape]), D=r(dim), z=r(batch, dim, length),
                delta_bias=0.5 * r(dim))


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="no C compiler")
@pytest.mark.parametrize("batch,dim,nstate,length,bc", [
    (1, 5, 3, 1, "bgnl1"), (2, 13, 8, 37, "bnl"), (3, 16, 16, 129, "bgnl2"), (1, 24, 4, 200, "dn"),
    (2, 20, 16, 63, "bgnl2")])  # 20 channels in 2 groups: SIMD blocks of 8 would straddle groups
def test_cpu_kernel_matches_reference_with_grads(batch, dim, nstate, length, bc):
    ref_in = _inputs(batch, dim, nstate, length, bc)
    fast_in = {k: v.clone().requires_grad_(True) for k, v in ref_in.items()}
    ref_in = {k: v.requires_grad_(True) for k, v in ref_in.items()}
    outs = []
    for fn, ins in ((selective_scan_ref, ref_in), (selective_scan_cpu, fast_in)):
        out, last = fn(ins["u"], ins["delta"], ins["A"], ins["B"], ins["C"], ins["D"], ins["z"], ins["delta_bias"],
                       True, True)
        (out.square().sum() + out.sum()).backward()
        outs.append((out, last))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-10, atol=1e-12)
    for k in ref_in:
        torch.testing.assert_close(fast_in[k].grad, ref_in[k].grad, rtol=1e-9, atol=1e-10, msg=lambda m: f"{k}: {m}")


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="no C compiler")
def test_cpu_kernel_float32_and_channel_last_views():
    ins = _inputs(2, 24, 16, 100, "bgnl1", seed=3, dtype=torch.float32)
    ref = selective_scan_ref(**{k: v.double() for k, v in ins.items()}, delta_softplus=True)
    out = selective_scan_cpu(**ins, delta_softplus=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    # channel-last memory seen through a (b, d, l) view: the model's layout
    cl = {k: (v.transpose(1, 2).contiguous().transpose(1, 2) if k in ("u", "delta", "z") else v) for k, v in ins.items()}
    torch.testing.assert_close(selective_scan_cpu(**cl, delta_softplus=True), out, rtol=0, atol=0)


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="no C compiler")
def test_long_sequence_is_stable():
    """L = 65,536 with strong decay and large inputs: no overflow, no NaN, equal to float64."""
    g = torch.Generator().manual_seed(7)
    batch, dim, nstate, length = 1, 8, 16, 65_536
    u = torch.randn(batch, dim, length, generator=g) * 10
    delta = torch.rand(batch, dim, length, generator=g) * 4
    A = -torch.exp(torch.randn(dim, nstate, generator=g)) * 8
    B = torch.randn(batch, 1, nstate, length, generator=g)
    C = torch.randn(batch, 1, nstate, length, generator=g)
    out = selective_scan_cpu(u, delta, A, B, C, delta_softplus=True)
    ref = selective_scan_cpu(u.double(), delta.double(), A.double(), B.double(), C.double(), delta_softplus=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-3)
    # the reference on a prefix: same values (a scan is causal)
    pre = selective_scan_ref(u[..., :512], delta[..., :512], A, B[..., :512], C[..., :512], delta_softplus=True)
    torch.testing.assert_close(out[..., :512], pre, rtol=1e-4, atol=1e-4)


def test_dispatch_errors():
    ins = _inputs(1, 4, 2, 3, "bnl")
    with pytest.raises(ValueError, match="unknown selective scan impl 'fast'"):
        selective_scan(**ins, impl="fast")


@pytest.mark.parametrize("mask", [False, True])
def test_sdpa_attention_equals_reference(mask):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 3, 16, 8, generator=g, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 3, 16, 16, generator=g)
    if mask:
        bias = bias + torch.where(torch.rand(6, 1, 16, 16, generator=g) > 0.7, -100.0, 0.0)
    ref = window_attention(q, k, v, bias, 8 ** -0.5, "reference")
    fast = window_attention(q, k, v, bias, 8 ** -0.5, "sdpa")
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    g_ref = torch.autograd.grad(ref.sum(), (q, k, v))
    g_fast = torch.autograd.grad(fast.sum(), (q, k, v))
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown attention impl"):
        window_attention(q, k, v, bias, 1.0, "flash")


@pytest.mark.parametrize("name", ["hat_tiny", "mambairv2_tiny"])
def test_model_fast_paths_equal_reference_paths(name):
    from smt.models import build_model

    torch.manual_seed(0)
    extra = {"routing": "argmax"} if "mamba" in name else {}
    fast = build_model(name, attn_impl="sdpa", **extra, **({"scan_impl": "auto"} if extra else {})).eval()
    ref = build_model(name, attn_impl="reference", **extra, **({"scan_impl": "reference"} if extra else {})).eval()
    ref.load_state_dict(fast.state_dict())
    x = torch.rand(1, 3, 20, 12)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)


def test_triton_kernel_tests_run_and_pass_under_the_interpreter(tmp_path):
    """Our GPU kernel (Triton) runs on CPU tensors in Triton's interpreter: run its test file that way, in a
    subprocess with ``TRITON_INTERPRET=1``, and require every test function in it to have run and passed (none
    skipped), so the default ``pytest -q`` checks the kernel."""
    import ast
    import os
    import subprocess
    import sys
    import xml.etree.ElementTree as ET

    pytest.importorskip("triton", reason="Triton is not installed")
    if torch.cuda.is_available():
        pytest.skip("with CUDA, tests/test_triton_scan.py runs the kernel on the GPU directly")
    from conftest import REPO

    test_file = REPO / "tests" / "test_triton_scan.py"
    defined = {node.name for node in ast.parse(test_file.read_text()).body
               if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}
    report = tmp_path / "triton.xml"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                          str(test_file)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    cases = ET.parse(report).getroot().iter("testcase")
    outcomes = {}  # test function -> outcomes of its parametrisations
    for case in cases:
        status = next((child.tag for child in case if child.tag in ("skipped", "failure", "error")), "passed")
        outcomes.setdefault(case.get("name").split("[")[0], set()).add(status)
    assert set(outcomes) == defined, f"ran {sorted(outcomes)}, defined {sorted(defined)}"
    assert all(o == {"passed"} for o in outcomes.values()), outcomes


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="no C compiler")
@pytest.mark.parametrize("batch,dim,nstate,length,bc", [
    (1, 5, 3, 1, "bgnl1"), (2, 13, 8, 37, "bnl"), (3, 16, 16, 129, "bgnl2"), (1, 24, 4, 200, "dn"),
    # past the kernel's 256-step chunks: N = 16 and 8 (the unrolled variants), a part-filled last block, and
    # 2 groups of 20 channels (blocks that straddle groups, gathered, beside blocks that do not)
    (1, 40, 16, 600, "bgnl1"), (2, 37, 8, 300, "bnl"), (2, 40, 16, 520, "bgnl2")])
@pytest.mark.parametrize("with_z", [True, False])
def test_fused_inference_forward_matches_reference(batch, dim, nstate, length, bc, with_z):
    """Without autograd, float32 runs the fused C pass (bias + softplus, scan, D skip, z gate in one loop, B/C
    read in place, channel blocks advanced together in chunks of steps); it must equal the reference, also for
    channel-last views and strongly negative/positive delta (both softplus branches)."""
    ins = _inputs(batch, dim, nstate, length, bc, dtype=torch.float64)
    ins["delta"] = ins["delta"] * 12  # reaches past the softplus threshold of 20 and deep into its tail
    if not with_z:
        ins["z"] = None
    ref, ref_last = selective_scan_ref(**ins, delta_softplus=True, return_last_state=True)
    f32 = {k: (v.float() if v is not None else None) for k, v in ins.items()}
    f32["u"] = f32["u"].transpose(1, 2).contiguous().transpose(1, 2)  # a channel-last view, as MambaIRv2 passes
    with torch.no_grad():
        out, last = selective_scan_cpu(**f32, delta_softplus=True, return_last_state=True)
    # float32 rounding grows with the steps: PyTorch's own float32 reference is 1.4e-5 off at 600 (a lost or
    # misplaced state between chunks is off by O(1))
    tol = 1e-5 if length <= 256 else 5e-5
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(last.double(), ref_last, rtol=tol, atol=tol)


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="no C compiler")
def test_fused_inference_forward_s_state_decay_is_exp_of_dt_a_to_float_accuracy():
    """The fused pass's exp(dt A), read off directly: step 0 sets h = 1, step 1 (u = 0, C = 1) outputs
    exp(dt A) for 4096 channels with dt A from -85 to 85. Relative error within float rounding of the product
    dt A (|dt A| ulps, x2: A is scaled by log2(e) first) plus 3e-7: a polynomial one term shorter, or a wrong
    coefficient, is several times over."""
    dim = 4096
    x = torch.linspace(-85, 85, dim, dtype=torch.float64)
    A = torch.where(x < 0, -torch.ones(dim), torch.ones(dim)).double()[:, None]  # (D, N = 1)
    dt1 = x.abs().float().double()
    u = torch.zeros(1, dim, 2, dtype=torch.float64)
    u[..., 0] = 1.0
    delta = torch.stack([torch.ones(dim, dtype=torch.float64), dt1], -1)[None]
    B = torch.tensor([1.0, 0.0], dtype=torch.float64).expand(1, 1, 2)
    C = torch.tensor([0.0, 1.0], dtype=torch.float64).expand(1, 1, 2)
    with torch.no_grad():
        got = selective_scan_cpu(u.float(), delta.float(), A.float(), B.float(),
                                 C.float(), None, None, None, False)[0, :, 1].double()
    want = torch.exp(dt1 * A[:, 0])
    rel = ((got - want) / want).abs()
    bound = 3e-7 + 2 * 6e-8 * (dt1 * A[:, 0]).abs()
    assert torch.all(rel <= bound), f"worst {float((rel / bound).max()):.2f} x the bound"


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="no C compiler")
@pytest.mark.parametrize("batch,dim,nstate,length", [(2, 40, 16, 300), (1, 21, 8, 33), (1, 9, 5, 7)])
def test_scan_over_rows_equals_gather_scan_scatter(batch, dim, nstate, length):
    """selective_scan_rows: step l reads row rows[b, l] of u, delta, B (C in step order) and writes row
    rows[b, l] of y; equal to the reference scan of the gathered inputs, scattered back."""
    ins = _inputs(batch, dim, nstate, length, "bnl", dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    rows = torch.stack([torch.randperm(length, generator=g) for _ in range(batch)])
    take = lambda t: torch.gather(t, 2, rows[:, None].expand_as(t))  # noqa: E731 - (b, *, L) along L
    ref = selective_scan_ref(take(ins["u"]), take(ins["delta"]), ins["A"], take(ins["B"]), ins["C"], ins["D"],
                             delta_bias=ins["delta_bias"], delta_softplus=True)
    ref = torch.empty_like(ref).scatter_(2, rows[:, None].expand_as(ref), ref)
    f32 = {k: v.float() for k, v in ins.items() if k != "z"}
    with torch.no_grad():
        got = selective_scan_rows(**f32, delta_softplus=True, rows=rows)
    tol = 1e-5 if length <= 256 else 5e-5
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="no C compiler")
@pytest.mark.parametrize("layout", ["channel-last", "contiguous"])
def test_fused_forward_reads_bfloat16_inputs_as_their_float32_copies_exactly(layout):
    """bfloat16 u, delta and z (a bf16-weights MambaIRv2's tokens) are widened inside the kernel: the outputs
    and last states equal those of the .float() copies bit for bit, over rows and in order, with a part-filled
    last channel block (37 channels) and both strides (unit channel stride: vector loads; else per lane)."""
    g = torch.Generator().manual_seed(3)
    batch, dim, nstate, length = 2, 37, 16, 300
    make = lambda: torch.randn(batch, length, dim, generator=g).bfloat16()  # noqa: E731
    u, delta, z = (make() for _ in range(3))
    if layout == "channel-last":  # (b, D, L) views of (b, L, D) memory
        u, delta, z = (t.transpose(1, 2) for t in (u, delta, z))
    else:
        u, delta, z = (t.transpose(1, 2).contiguous() for t in (u, delta, z))
    rest = dict(A=-torch.rand(dim, nstate, generator=g) - 0.05, B=torch.randn(batch, nstate, length, generator=g),
                C=torch.randn(batch, nstate, length, generator=g), D=torch.randn(dim, generator=g),
                delta_bias=torch.randn(dim, generator=g) - 2)
    rows = torch.stack([torch.randperm(length, generator=g) for _ in range(batch)])
    with torch.no_grad():
        got, got_last = selective_scan_cpu(u, delta, z=z, **rest, delta_softplus=True, return_last_state=True)
        want, want_last = selective_scan_cpu(u.float(), delta.float(), z=z.float(), **rest, delta_softplus=True,
                                             return_last_state=True)
        got_rows = selective_scan_rows(u, delta, **rest, delta_softplus=True, rows=rows)
        want_rows = selective_scan_rows(u.float(), delta.float(), **rest, delta_softplus=True, rows=rows)
    # selective_scan_cpu returns u's dtype; the kernel's float32 output rounds to it as the copies' does
    assert got.dtype == torch.bfloat16 and torch.equal(got, want.bfloat16()) and torch.equal(got_last, want_last)
    assert got_rows.dtype == torch.float32 and torch.equal(got_rows, want_rows)
    assert want.abs().max() > 1 and torch.isfinite(want).all()


def test_inputs_of_unequal_strides_are_copied_to_the_layout_of_u():
    """The fused forward needs one set of strides for u, delta and z: a channel-last u (MambaIRv2's tokens) keeps
    all three channel-last, read with vector loads (bf16 autocast's delta is a slice of a padded GEMM output);
    a channel-first u keeps them channel-first. Values unchanged."""
    from smt.kernels.selective_scan import _common_layout

    g = torch.Generator().manual_seed(4)
    u = torch.randn(2, 300, 37, generator=g).bfloat16().transpose(1, 2)  # (b, D, L), channel-last memory
    delta = torch.randn(2, 300, 48, generator=g).bfloat16()[..., :37].transpose(1, 2)  # padded rows, sliced
    cu, cd, cz = _common_layout(u, delta, None)
    assert cz is None and cu.stride() == cd.stride() == (300 * 37, 1, 37)
    assert torch.equal(cu, u) and torch.equal(cd, delta)
    fu, fd, fz = _common_layout(u.contiguous(), delta, delta)
    assert fu.stride() == fd.stride() == fz.stride() == (37 * 300, 300, 1) and torch.equal(fd, delta)


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="no C compiler")
def test_scan_over_rows_refuses_what_is_not_a_permutation_and_autograd():
    ins = {k: v.float() for k, v in _inputs(1, 8, 4, 6, "bnl").items() if k != "z"}
    with torch.no_grad():
        for bad in (torch.tensor([[0, 1, 2, 3, 4, 6]]), torch.tensor([[0, 1, 2, 3, 4, 4]]),
                    torch.tensor([[0, 1, 2, 3, 4, -1]]), torch.tensor([[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 5, 5]]),
                    torch.arange(6, dtype=torch.int32)[None], torch.arange(6)):
            with pytest.raises(ValueError, match="permutation of range"):
                selective_scan_rows(**ins, rows=bad)
    with pytest.raises(ValueError, match="no autograd"):
        selective_scan_rows(**{**ins, "u": ins["u"].requires_grad_(True)}, rows=torch.arange(6)[None])


def test_openmp_scan_is_used_where_pytorch_runs_on_libgomp():
    """PyTorch's Linux wheels run on their own libgomp: there the inference scan must run on that team (else
    its Python threads compete with PyTorch's spinning workers: 1.8x slower in MambaIRv2-L)."""
    import os

    if not HAS_CPU_KERNEL or torch.__config__.parallel_info().find("OpenMP") < 0:
        pytest.skip("no CPU kernel, or PyTorch is not built with OpenMP")
    if os.environ.get("SMT_DISABLE_OPENMP_SCAN"):
        pytest.skip("switched off by SMT_DISABLE_OPENMP_SCAN")
    from smt.kernels.cpu_build import _libgomp_paths

    if len(_libgomp_paths()) != 1:
        pytest.skip(f"PyTorch does not run on exactly one libgomp here: {openmp_status()}")
    assert openmp_library() is not None, openmp_status()
    assert openmp_status().startswith("OpenMP on PyTorch's libgomp")


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="no C compiler")
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_openmp_scan_equals_the_python_threads_bit_for_bit(monkeypatch, threads):
    """The OpenMP entry points run the same job ranges as the Python threads: the same bits for the inference
    forward, and for training's forward and backward (each range's dA, dB, dC partial sums in its own buffer),
    for any thread count (3 threads over 3 blocks of channels in 2 batches: ranges that split a batch)."""
    if openmp_library() is None:
        pytest.skip(openmp_status())
    import importlib

    ss = importlib.import_module("smt.kernels.selective_scan")  # the module (the package exports the function)
    ins = {k: (v.float() if v is not None else None) for k, v in _inputs(2, 40, 16, 300, "bgnl2").items()}

    def both() -> list[torch.Tensor]:
        with torch.no_grad():
            out = list(selective_scan_cpu(**ins, delta_softplus=True, return_last_state=True))
        leaves = {k: v.clone().requires_grad_(True) for k, v in ins.items()}
        y, last = selective_scan_cpu(**leaves, delta_softplus=True, return_last_state=True)
        (y.square().sum() + last.sum()).backward()
        return out + [y.detach(), last.detach()] + [leaves[k].grad for k in sorted(leaves)]

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        omp = both()
        monkeypatch.setattr(ss, "USE_OPENMP", False)
        py = both()
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(omp, py))


@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernels_compile_for_a_gpu_with_barriers_and_relaxed_atomics(arch):
    """Without a GPU, Triton still compiles our kernels for one (to PTX and cubin): they must compile, the
    backward must keep its two barriers around the scratch buffer (a tile of 2 x 2 is replicated across a
    block's threads), and every atomic add must be relaxed (no acq_rel fences in the hot loop)."""
    import inspect
    import os

    triton = pytest.importorskip("triton", reason="Triton is not installed")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("under TRITON_INTERPRET=1 the kernels are interpreted, not compiled")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from smt.kernels import triton_scan as ts

    compiled = {}
    for kernel, consts in ((ts._scan_fwd, {"CHUNK": 64, "BLOCK_D": 32, "BLOCK_N": 16, "STORE_STATES": True}),
                           (ts._scan_bwd, {"CHUNK": 64, "BLOCK_D": 2, "BLOCK_N": 2, "ONE_GROUP": True}),
                           (ts._scan_bwd, {"CHUNK": 64, "BLOCK_D": 32, "BLOCK_N": 16, "ONE_GROUP": False})):
        params = inspect.signature(kernel.fn).parameters
        sig = {p: "constexpr" if p in consts else "*fp32" if p.endswith("_ptr") else "i32" for p in params}
        try:
            k = triton.compile(ASTSource(kernel, sig, constexprs=consts), target=GPUTarget("cuda", arch, 32))
        except Exception as exc:  # noqa: BLE001
            if "ptxas" in str(exc).lower():
                pytest.skip(f"Triton's CUDA toolchain is unavailable here: {exc}")
            raise
        assert k.asm["cubin"]
        compiled[(kernel.fn.__name__, consts.get("ONE_GROUP"))] = k.asm["ttgir"]
    for (name, _), ttgir in compiled.items():
        assert "atomic_rmw" not in ttgir or "acq_rel" not in ttgir, name
        if name == "_scan_bwd":
            assert ttgir.count("ttg.barrier") == 2, name
            assert ttgir.count("tt.atomic_rmw fadd, relaxed") == 3, name  # dC, dB per step; dA at the end


def test_chunked_triton_kernels_compile_for_sm90_without_spills_or_atomics():
    """The chunked scan's kernels at the launch constants they run with (one warp per 16 x 32 tile) compile for
    an H100 with no register spills (ptxas -v; docs/gpu_scan.md explains the choice) and no atomics (the
    backward's partial sums are reduced in a fixed order: deterministic)."""
    import inspect
    import os
    import subprocess
    import tempfile

    triton = pytest.importorskip("triton", reason="Triton is not installed")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("under TRITON_INTERPRET=1 the kernels are interpreted, not compiled")
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    from smt.kernels import triton_scan as ts

    tile = {"T": ts._SCAN_CHUNK, "BD": ts._SCAN_BLOCK_D}
    cases = [(ts._chunk_sums, {**tile, "REVERSE": False}, ts._SCAN_WARPS),
             (ts._chunk_sums, {**tile, "REVERSE": True}, ts._SCAN_WARPS),
             (ts._chunk_pass, {"REVERSE": True, "CB": ts._PASS_CB, "BE": ts._PASS_BE}, 4),
             (ts._chunk_scan_fwd, tile, ts._SCAN_WARPS),
             (ts._chunk_scan_bwd, {**tile, "ONE_GROUP": True}, ts._SCAN_WARPS)]
    for kernel, consts, warps in cases:
        params = inspect.signature(kernel.fn).parameters
        sig = {p: "constexpr" if p in consts else "*fp32" if p.endswith("_ptr") else "i32" for p in params}
        try:
            k = triton.compile(ASTSource(kernel, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": warps})
        except Exception as exc:  # noqa: BLE001
            if "ptxas" in str(exc).lower():
                pytest.skip(f"Triton's CUDA toolchain is unavailable here: {exc}")
            raise
        assert "atomic" not in k.asm["ttgir"], kernel.fn.__name__
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(k.asm["ptx"])
            f.flush()
            info = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                                  capture_output=True, text=True, check=True).stderr
        assert "0 bytes spill stores, 0 bytes spill loads" in info, (kernel.fn.__name__, consts, info)


def test_kernel_cache_key_covers_every_header_the_sources_include(tmp_path, monkeypatch):
    """Each ``#include "..."`` of the C sources is in HEADERS (shipped as package data), and an edited header
    gives another cached library: a stale binary built from the old constants is never loaded."""
    import re

    import smt.kernels.cpu_build as cpu_build

    included = {name for src in cpu_build.SOURCES for name in re.findall(r'#include "([^"]+)"', src.read_text())}
    assert included and included == {h.name for h in cpu_build.HEADERS}
    assert all(h.parent == cpu_build.SOURCES[0].parent and h.exists() for h in cpu_build.HEADERS)
    built = []
    monkeypatch.setenv("SMT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_build, "_build", lambda target, cc, flags: built.append(target))
    first = cpu_build._built("cc", cpu_build.FLAGS)
    edited = tmp_path / cpu_build.HEADERS[0].name
    edited.write_text(cpu_build.HEADERS[0].read_text() + "\n/* edited */\n")
    monkeypatch.setattr(cpu_build, "HEADERS", (edited, *cpu_build.HEADERS[1:]))
    second = cpu_build._built("cc", cpu_build.FLAGS)
    assert first != second and built == [first, second]
