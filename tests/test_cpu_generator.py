"""PyTorch's CPU generator stepped in bulk by the C library (smt.kernels.cpu_generator) against PyTorch's own
serial draws: the same values, the same generator state after, and the fallbacks."""
import pytest
import torch

from smt.kernels import cpu_generator as G
from smt.kernels.cpu_build import load_library

pytestmark = pytest.mark.skipif(load_library() is None, reason="needs the C kernel library (a C compiler)")


@pytest.mark.parametrize("sizes", [[1], [311], [312], [313, 1], [5, 4000, 7], [100003]],
                         ids=["one", "half-block-less-one", "exactly-the-first-block", "across-a-regeneration",
                              "mid-block-then-several-regenerations", "many-regenerations"])
def test_bulk_draws_equal_pytorch_s_serial_draws_and_leave_the_same_state(sizes):
    torch.manual_seed(5)
    ours = [G.neg_uniform53(n) for n in sizes]
    state, after = torch.default_generator.get_state(), torch.rand(3)
    torch.manual_seed(5)
    theirs = [G.neg_uniform53_reference(n) for n in sizes]
    assert torch.equal(torch.default_generator.get_state(), state)
    assert torch.equal(torch.rand(3), after)
    for a, b in zip(ours, theirs):
        assert a.dtype == torch.float64 and torch.equal(a, b)
    u = -torch.cat(ours)
    assert u.min() >= 0 and u.max() < 1 and torch.equal(u * 2.0 ** 53, (u * 2.0 ** 53).round())


def test_bulk_draws_continue_after_pytorch_s_own_draws_of_other_kinds():
    torch.manual_seed(9)
    torch.randn(17)  # normal draws and the rest leave the generator at an arbitrary word
    torch.randint(0, 5, (3,))
    got = G.neg_uniform53(1000)
    torch.manual_seed(9)
    torch.randn(17)
    torch.randint(0, 5, (3,))
    assert torch.equal(got, G.neg_uniform53_reference(1000))


def test_bulk_draws_fall_back_to_none_when_the_state_layout_is_not_pytorch_s(monkeypatch):
    monkeypatch.setattr(G, "_checked", None)
    monkeypatch.setattr(G, "_STATE_BYTES", 5000)  # a PyTorch whose generator state has another size
    assert not G.bulk_draws_available()
    torch.manual_seed(1)
    before = torch.default_generator.get_state()
    assert G.neg_uniform53(10) is None
    assert torch.equal(torch.default_generator.get_state(), before)  # nothing drawn


def test_bulk_draws_fall_back_to_none_when_the_self_check_disagrees(monkeypatch):
    monkeypatch.setattr(G, "_checked", None)
    real = G.neg_uniform53_reference
    monkeypatch.setattr(G, "neg_uniform53_reference", lambda n, generator=None: real(n, generator) * 0.5)
    assert not G.bulk_draws_available()
    assert G.neg_uniform53(10) is None


def test_the_c_draw_rejects_a_state_it_does_not_understand_and_changes_nothing():
    import ctypes

    lib = load_library()
    words = torch.arange(624, dtype=torch.int32)
    out = torch.zeros(4, dtype=torch.float64)
    for left, nxt in [(0, 0), (625, 0), (300, 400), (5, -1)]:
        lt, nt = ctypes.c_int64(left), ctypes.c_int64(nxt)
        assert lib.mt_neg_uniform53(words.data_ptr(), ctypes.byref(lt), ctypes.byref(nt), 4, out.data_ptr()) == -1
        assert (lt.value, nt.value) == (left, nxt)
    assert torch.equal(words, torch.arange(624, dtype=torch.int32)) and not out.any()
