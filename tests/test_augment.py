"""Colour augmentation: pairs stay exactly consistent with the bicubic degradation; the colour-shift metric."""
import numpy as np
import pytest
import torch

from smt.config import AugmentSpec, ConfigError, parse_section
from smt.data.augment import PERMUTATIONS, apply_color, color_matrix, degrade_patch
from smt.data.imresize import bicubic_degrade
from smt.metrics import NTIRE2025, color_shift, evaluate_pair
from smt.train.data import GlobalBatchSampler, PairedPatchDataset, PatchSpec
from conftest import write_train_split


def _photo_like(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients plus texture: every channel different, values spanning 0..255."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([200 * x + 30, 120 + 100 * np.sin(6 * y), 255 * (1 - x * y)], axis=-1)
    return np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).round().astype(np.uint8)


def test_color_matrix_identity_keeps_grey_and_mean_and_permutes_at_120_degrees():
    np.testing.assert_allclose(color_matrix(0.0, 1.0), np.eye(3), atol=1e-12)
    m = color_matrix(37.0, 0.6)
    np.testing.assert_allclose(m @ np.ones(3), np.ones(3), atol=1e-12)  # grey stays grey
    np.testing.assert_allclose(np.ones(3) @ m, np.ones(3), atol=1e-12)  # the mean of R, G, B is kept
    # a third of a turn about the grey axis is the cyclic channel permutation
    np.testing.assert_allclose(color_matrix(120.0, 1.0), np.eye(3)[[2, 0, 1]], atol=1e-12)
    np.testing.assert_allclose(color_matrix(0.0, 0.0), np.full((3, 3), 1 / 3), atol=1e-12)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_degrade_patch_equals_degrading_the_whole_transformed_image(scale):
    hr = _photo_like(30 * scale, 26 * scale, seed=scale)
    matrix = color_matrix(-95.0, 1.4)
    whole_hr = apply_color(hr, matrix)
    whole_lr = bicubic_degrade(whole_hr, scale)
    p = 9
    for top, left in [(0, 0), (1, 2), (10, 7), (30 - p, 26 - p), (30 - p - 1, 0)]:
        lr, hr_patch = degrade_patch(hr, top, left, p, scale, matrix)
        np.testing.assert_array_equal(lr, whole_lr[top:top + p, left:left + p])
        np.testing.assert_array_equal(hr_patch, whole_hr[scale * top:scale * (top + p), scale * left:scale * (left + p)])
    with pytest.raises(ValueError, match="outside"):
        degrade_patch(hr, 25, 0, p, scale, matrix)


def test_channel_permutation_commutes_with_the_degradation_exactly():
    hr = _photo_like(64, 48)
    lr = bicubic_degrade(hr, 4)
    for perm in PERMUTATIONS:
        np.testing.assert_array_equal(bicubic_degrade(np.ascontiguousarray(hr[..., list(perm)]), 4),
                                      lr[..., list(perm)])


@pytest.fixture(scope="module")
def photo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("photo")
    hr = _photo_like(96, 80, seed=7)
    write_train_split(root, [(bicubic_degrade(hr, 4), hr)])
    return root, hr


def test_dataset_pairs_under_colour_augmentation_equal_degrade_of_transformed_hr(photo_root):
    root, hr = photo_root
    ds = PairedPatchDataset(root, "train", patch_size=8, scale=4)
    for channels in [(0, 1, 2), (2, 0, 1), (1, 0, 2)]:
        for color in [None, (150.0, 0.7), (-30.0, 1.5)]:
            for tr in (False, True):
                spec = PatchSpec(0, 5, 3, True, False, tr, channels, color)
                lr, hr_patch = ds[spec]
                full_hr = apply_color(hr, color_matrix(*color)) if color else hr
                full_hr = np.ascontiguousarray(full_hr[..., list(channels)])
                full_lr = bicubic_degrade(full_hr, 4)
                want_lr = torch.from_numpy(full_lr[5:13, 3:11]).permute(2, 0, 1).flip(-1)
                want_hr = torch.from_numpy(full_hr[20:52, 12:44]).permute(2, 0, 1).flip(-1)
                if tr:
                    want_lr, want_hr = want_lr.transpose(-1, -2), want_hr.transpose(-1, -2)
                assert torch.equal((lr * 255).round().to(torch.uint8), want_lr)
                assert torch.equal((hr_patch * 255).round().to(torch.uint8), want_hr)


def test_sampler_draws_colour_augmentation_only_when_configured():
    sizes = [(24, 20)]
    plain = GlobalBatchSampler(sizes, 8, 64, seed=1).draw(3)
    assert all(s.channels == (0, 1, 2) and s.color is None for s in plain)
    spec = AugmentSpec(channel_permute=True, color_prob=0.5, hue_degrees=90.0, saturation=(0.5, 1.5))
    drawn = GlobalBatchSampler(sizes, 8, 64, seed=1, augment=spec).draw(3)
    # crops and flips are drawn first, so they are those of the paper's recipe
    assert [(s.top, s.left, s.hflip, s.vflip, s.transpose) for s in drawn] == \
        [(s.top, s.left, s.hflip, s.vflip, s.transpose) for s in plain]
    assert len({s.channels for s in drawn}) > 3
    colored = [s.color for s in drawn if s.color is not None]
    assert 16 < len(colored) < 48
    assert all(-90 <= h <= 90 and 0.5 <= sat <= 1.5 for h, sat in colored)
    assert drawn == GlobalBatchSampler(sizes, 8, 64, seed=1, augment=spec).draw(3)
    no_flips = GlobalBatchSampler(sizes, 8, 16, seed=1, augment=AugmentSpec(dihedral=False)).draw(0)
    assert not any(s.hflip or s.vflip or s.transpose for s in no_flips)


def test_augment_config_rejects_bad_values_naming_the_key():
    assert parse_section(AugmentSpec, {"color_prob": 1, "saturation": [0.5, 2]}, "train.augment").color_prob == 1.0
    with pytest.raises(ConfigError, match="color_prob"):
        parse_section(AugmentSpec, {"color_prob": 1.5}, "train.augment")
    with pytest.raises(ConfigError, match="saturation"):
        parse_section(AugmentSpec, {"saturation": [1.5, 0.5]}, "train.augment")
    with pytest.raises(ConfigError, match="train.augment.hue"):
        parse_section(AugmentSpec, {"hue": 10}, "train.augment")


def test_color_shift_measures_the_largest_channel_mean_error():
    rng = np.random.default_rng(3)
    hr = rng.integers(20, 230, (40, 36, 3), dtype=np.uint8)
    shifted = hr.astype(np.int16) + np.array([3, -2, 0], dtype=np.int16)
    assert color_shift(shifted.astype(np.uint8), hr) == pytest.approx(3.0, abs=1e-12)
    # a shift on half the pixels of one channel counts half
    half = hr.copy()
    half[:20, :, 2] += 5
    assert color_shift(half, hr) == pytest.approx(2.5, abs=1e-12)
    assert color_shift(hr, hr) == 0.0
    # zero-mean noise does not count as a shift, and evaluate_pair reports it on the protocol's region
    noisy = hr.astype(np.int16)
    noisy[::2] += 4
    noisy[1::2] -= 4
    m = evaluate_pair(noisy.astype(np.uint8), hr, NTIRE2025)
    assert m["color_shift"] == pytest.approx(0.0, abs=1e-12) and m["psnr_rgb"] < 40
    with pytest.raises(ValueError, match="one size"):
        color_shift(hr, hr[:10])
