"""The fusion fit sharded over processes (what the infer stage does under torchrun): two gloo ranks each score
every other image, one all-reduce, and both ranks get exactly the one-process fit (weight, curve, least-squares
weight)."""
import pickle

import numpy as np
import pytest
import torch

from gloo_ranks import run_ranks
from smt.infer.fusion import ShardedFit, fit_fusion_weight, fit_from_image_terms, fusion_grid, fusion_image_terms

GRID = 21


def _pairs(n=5, seed=2):
    """Tiny images of different sizes: outputs a and b as float in [0, 255] (past it at the extremes), HR uint8."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        hr = rng.integers(0, 256, (24 + 2 * i, 33 - i, 3)).astype(np.uint8)
        a = (hr + rng.normal(0, 5.0 + i, hr.shape)).astype(np.float32).astype(np.float64)
        b = (hr + rng.normal(0, 11.0, hr.shape)).astype(np.float32).astype(np.float64)
        out.append((a, b, hr))
    return out


def _fit_on_my_shard(out_file: str) -> None:
    """Run in each gloo rank: score this rank's images (every world-th, as the infer stage shards), fit."""
    from smt.distributed import dist_info, init_process_group

    rank, world = dist_info()
    init_process_group(torch.device("cpu"))
    pairs = _pairs()
    sharded = ShardedFit(len(pairs), GRID)
    for pos in range(rank, len(pairs), world):
        sharded.add(pos, *pairs[pos])
    fit = sharded.fit()
    with open(f"{out_file}.rank{rank}", "wb") as f:
        pickle.dump(fit, f)


def test_two_gloo_ranks_fit_exactly_the_one_process_weight_and_curve(tmp_path):
    whole = fit_fusion_weight(_pairs(), GRID)
    run_ranks(2, _fit_on_my_shard, str(tmp_path / "fit"), tmp=tmp_path)
    for rank in (0, 1):
        fit = pickle.loads((tmp_path / f"fit.rank{rank}").read_bytes())
        assert fit.weight == whole.weight and fit.grid == whole.grid
        np.testing.assert_allclose(fit.curve, whole.curve, rtol=0, atol=1e-9)
        assert fit.curve == whole.curve  # bit for bit: each row is one rank's, the others add zeros
        assert fit.psnr_y == whole.psnr_y and fit.least_squares_weight == whole.least_squares_weight


def test_sharded_fit_in_one_process_equals_the_fit_and_refuses_unscored_images():
    pairs = _pairs()
    sharded = ShardedFit(len(pairs), GRID)
    for pos in reversed(range(len(pairs))):  # the order of add() does not matter, the position does
        sharded.add(pos, *pairs[pos])
    fit, whole = sharded.fit(), fit_fusion_weight(pairs, GRID)
    assert (fit.weight, fit.curve, fit.least_squares_weight) == (whole.weight, whole.curve,
                                                                   whole.least_squares_weight)
    partial = ShardedFit(3, GRID)
    partial.add(0, *pairs[0])
    partial.add(2, *pairs[2])
    with pytest.raises(ValueError, match=r"image\(s\) \[1\] .* scored by no rank"):
        partial.fit()
    with pytest.raises(ValueError, match="rows of 24 terms"):
        fit_from_image_terms(np.zeros((2, 5)), fusion_grid(GRID))
    row = fusion_image_terms(*pairs[0], fusion_grid(GRID))
    assert row.shape == (GRID + 3,) and row[GRID] == (24 - 8) * (32 - 8)  # 24x33 pixels: modcrop 4, 4 shaved per side
