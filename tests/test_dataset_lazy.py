"""PairedPatchDataset reads images lazily: bounded memory however many images a split has, the same patches as
holding every image in memory, and size errors still raised when the dataset is built."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import smt.train.data as data_mod
from smt.data.images import read_image
from smt.config import AugmentSpec
from smt.train.data import GlobalBatchSampler, PairedPatchDataset, PatchSpec, cut_patch

from conftest import write_train_split

NIMAGES = 300


def _write_split(root: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        h, w = int(rng.integers(8, 14)), int(rng.integers(8, 14))
        hr = rng.integers(0, 256, (4 * h, 4 * w, 3), dtype=np.uint8)
        pairs.append((rng.integers(0, 256, (h, w, 3), dtype=np.uint8), hr))
    write_train_split(root, pairs)


@pytest.fixture(scope="module")
def many_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("many")
    _write_split(root, NIMAGES)
    return root


def _eager_patch(lr_img: np.ndarray, hr_img: np.ndarray, spec: PatchSpec, p: int, s: int):
    """The dataset's patch cut from images held in memory (what the dataset did before it was lazy)."""
    lr_t, hr_t = (torch.from_numpy(a).permute(2, 0, 1).contiguous() for a in (lr_img, hr_img))
    return cut_patch(lr_t, hr_t, spec, p, s)


def test_cache_is_bounded_and_batches_equal_eager(many_root):
    cap = 8
    ds = PairedPatchDataset(many_root, "train", patch_size=6, scale=4, cache_images=cap)
    assert len(ds) == NIMAGES and len(ds._cache) == 0  # nothing decoded by the constructor
    manifest = pd.read_csv(many_root / "manifest_train.csv", dtype={"id": str})
    eager = [(read_image(many_root / r.lr_path), read_image(many_root / r.hr_path)) for r in manifest.itertuples()]
    assert ds.sizes() == [lr.shape[:2] for lr, _ in eager]
    aug = AugmentSpec(channel_permute=True, color_prob=0.3, hue_degrees=30.0, saturation=(0.8, 1.2))
    sampler = GlobalBatchSampler(ds.sizes(), 6, 16, seed=3, augment=aug)
    touched = set()
    biggest = max(lr.nbytes + hr.nbytes for lr, hr in eager)
    for step in range(40):
        for spec in sampler.draw(step):
            touched.add(spec.image)
            got = ds[spec]
            want = _eager_patch(*eager[spec.image], spec, 6, 4)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
            assert len(ds._cache) <= cap
            assert sum(a.nbytes + b.nbytes for a, b in ds._cache.values()) <= cap * biggest
    assert len(touched) > 10 * cap  # the batches really cycled through many more images than the cache holds


def test_recently_used_images_stay_cached(many_root, monkeypatch):
    ds = PairedPatchDataset(many_root, "train", patch_size=6, scale=4, cache_images=2)
    decoded = []
    real = data_mod.read_image
    monkeypatch.setattr(data_mod, "read_image", lambda path: decoded.append(Path(path).name) or real(path))
    for image in (0, 1, 0, 2, 0, 1):
        ds[PatchSpec(image, 0, 0, False, False, False)]
    # 0 stays (used most recently each time), 1 is evicted by 2 and decoded again; one LR + one HR per decode
    assert decoded == ["0000x4.png", "0000.png", "0001x4.png", "0001.png", "0002x4.png", "0002.png",
                       "0001x4.png", "0001.png"]
    assert list(ds._cache) == [0, 1]
    state = ds.__getstate__()
    assert len(state["_cache"]) == 0 and len(ds._cache) == 2  # workers get no copy of the cache


def test_size_errors_raised_at_construction_without_decoding(tmp_path, monkeypatch):
    _write_split(tmp_path, 3, seed=1)
    monkeypatch.setattr(data_mod, "read_image", lambda path: pytest.fail(f"decoded {path} while building"))
    path = tmp_path / "manifest_train.csv"
    manifest = pd.read_csv(path, dtype={"id": str}, keep_default_na=False)
    small = int(manifest[["lr_height", "lr_width"]].min().min())
    with pytest.raises(ValueError, match=f"smaller than the patch size {small + 1}"):
        PairedPatchDataset(tmp_path, "train", patch_size=small + 1, scale=4)
    with pytest.raises(ValueError, match="is not x4 of LR"):
        manifest.assign(hr_width=manifest["hr_width"] + 1).to_csv(path, index=False)
        PairedPatchDataset(tmp_path, "train", patch_size=4, scale=4)
    with pytest.raises(ValueError, match="cache_images must be >= 1"):
        PairedPatchDataset(tmp_path, "train", patch_size=4, scale=4, cache_images=0)


def test_sizes_fall_back_to_headers_and_stale_manifest_is_caught(tmp_path):
    _write_split(tmp_path, 3, seed=2)
    path = tmp_path / "manifest_train.csv"
    manifest = pd.read_csv(path, dtype={"id": str}, keep_default_na=False)
    blank = manifest.assign(lr_height="", lr_width="", hr_height="", hr_width="")
    blank.to_csv(path, index=False)
    ds = PairedPatchDataset(tmp_path, "train", patch_size=4, scale=4)
    assert ds.sizes() == list(zip(manifest["lr_height"], manifest["lr_width"]))
    assert ds.hr_sizes == list(zip(manifest["hr_height"], manifest["hr_width"]))
    wrong = manifest.assign(lr_height=manifest["lr_height"] + 1, hr_height=manifest["hr_height"] + 4)
    wrong.to_csv(path, index=False)
    ds = PairedPatchDataset(tmp_path, "train", patch_size=4, scale=4)
    with pytest.raises(ValueError, match="but the manifest says"):
        ds[PatchSpec(0, 0, 0, False, False, False)]
