"""The fusion-weight fit: the one-pass PyTorch scoring equals the per-weight NumPy reference (same weight, same
curve to 1e-9 dB, same fused pixels), reads its images once from any iterable, and combines per-image shards."""
import numpy as np
import pytest
import torch

from smt.infer.fusion import (fit_fusion_weight, fit_fusion_weight_reference, fit_from_squared_errors, fuse,
                              fusion_grid, fusion_squared_errors, least_squares_weight)
from smt.metrics import BASICSR, NTIRE2025, prepare_pair, rgb_to_y


def _pairs(n=4, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = 30 + 3 * i, 41 - 2 * i  # not multiples of the modcrop
        hr = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        a = hr + rng.normal(0, 6.0 + i, hr.shape)  # past 0 and 255 at the extremes: the clip matters
        b = hr + rng.normal(0, 12.0, hr.shape)
        a[0, :4] = np.array([0.5, 1.5, 2.5, 254.5])[:, None]  # exact halves: round half to even
        b[0, :4] = a[0, :4]
        out.append((a, b, hr))
    return out


@pytest.mark.parametrize("protocol", [NTIRE2025, BASICSR], ids=["ntire2025", "basicsr"])
def test_one_pass_fit_equals_the_reference(protocol):
    pairs = _pairs()
    ref = fit_fusion_weight_reference(pairs, 101, protocol)
    fast = fit_fusion_weight(iter(pairs), 101, protocol)  # an iterator: read once
    assert fast.weight == ref.weight and fast.grid == ref.grid
    np.testing.assert_allclose(fast.curve, ref.curve, rtol=0, atol=1e-9)
    assert fast.psnr_y == pytest.approx(ref.psnr_y, abs=1e-9)
    assert fast.least_squares_weight == ref.least_squares_weight == least_squares_weight(pairs, protocol)


def test_squared_errors_are_those_of_the_fused_uint8_images():
    a, b, hr = _pairs(1, seed=3)[0]
    weights = [0.0, 0.37, 0.5, 1.0]
    sse, n = fusion_squared_errors(a, b, hr, weights, NTIRE2025)
    for w, e in zip(weights, sse):
        sr, hc = prepare_pair(fuse(a, b, w), hr, NTIRE2025)
        want = np.square(rgb_to_y(sr) - rgb_to_y(hc))
        assert n == want.size
        assert e == pytest.approx(want.sum(), rel=1e-12)


def test_shards_of_images_combine_to_the_whole_fit():
    """Ranks may score disjoint shards: the per-image sums, gathered in image order, give the same fit."""
    pairs = _pairs(5, seed=1)
    weights = fusion_grid(21)
    whole = fit_fusion_weight(pairs, 21)
    shards = [pairs[0::2], pairs[1::2]]  # rank 0 and rank 1
    scored = {}
    for rank, shard in enumerate(shards):
        for k, p in enumerate(shard):
            scored[2 * k + rank] = fusion_squared_errors(*p, weights)
    sse, counts = zip(*(scored[i] for i in range(len(pairs))))
    combined = fit_from_squared_errors(sse, counts, weights, whole.least_squares_weight)
    assert combined.weight == whole.weight and combined.curve == whole.curve


def test_fusion_fit_errors():
    a, b, hr = _pairs(1)[0]
    with pytest.raises(ValueError, match="at least one validation image"):
        fit_fusion_weight(iter([]))
    with pytest.raises(ValueError, match="differ in size"):
        fusion_squared_errors(a[:-1], b, hr, [0.5])
    with pytest.raises(ValueError, match="NaN"):
        fusion_squared_errors(np.full_like(a, np.nan), b, hr, [0.5])
    with pytest.raises(ValueError, match="at least 2 weights"):
        fusion_grid(1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
def test_fit_on_the_gpu_equals_the_cpu_fit():
    pairs = _pairs()
    cpu, gpu = fit_fusion_weight(pairs, 101), fit_fusion_weight(pairs, 101, device="cuda")
    assert gpu.weight == cpu.weight
    np.testing.assert_allclose(gpu.curve, cpu.curve, rtol=0, atol=1e-9)
