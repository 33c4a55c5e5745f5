"""Our Triton selective scan against the reference: on CUDA directly, on CPU under ``TRITON_INTERPRET=1``
(``tests/test_kernels.py`` runs this file that way in a subprocess)."""
import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed")

from smt.kernels import selective_scan, selective_scan_ref  # noqa: E402
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


# L = 1, one chunk exactly (64), a partial last chunk (70, 129); a non power-of-two channel count; groups
@pytest.mark.parametrize("batch,dim,nstate,length,bc", [(1, 3, 2, 1, "bnl"), (2, 6, 3, 64, "bgnl2"),
                                                        (1, 5, 4, 70, "dn"), (2, 12, 16, 129, "bnl")])
def test_triton_scan_matches_reference_values_and_grads(batch, dim, nstate, length, bc):
    ins = _inputs(batch, dim, nstate, length, bc)
    w = torch.randn(batch, dim, length, generator=torch.Generator().manual_seed(1))
    got = _run("triton", ins, w)
    ref = _run("reference", {k: v.double() for k, v in ins.items()}, w.double())
    names = ["out", "last"] + [f"grad {k}" for k in ins]
    for name, a, b in zip(names, got, ref):
        torch.testing.assert_close(a.double().cpu(), b.cpu(), rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


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


def test_auto_dispatch_uses_a_gpu_kernel_on_cuda():
    if DEVICE != "cuda":
        pytest.skip("CUDA only")
    ins = _inputs(1, 8, 4, 4096, "bnl")
    out = selective_scan(**{k: v.cuda() for k, v in ins.items()}, delta_softplus=True)
    ref = selective_scan_ref(**ins, delta_softplus=True)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)
