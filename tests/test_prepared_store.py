"""The prepared store (smt/data/prepare.py): training patches read from its memory maps are byte for byte the
patches decoded from the PNGs, for every augmentation, subset and loader; a stale, partial or foreign store is
refused with a message; an interrupted preparation resumes."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

import smt.data.prepare as prepare_mod
import smt.train.data as data_mod
from smt.config import AugmentSpec
from smt.data.images import read_image
from smt.data.prepare import STORE_INDEX, load_array, open_store, prepare_store, store_bytes
from smt.train.data import GlobalBatchSampler, PairedPatchDataset, PatchSpec, collate

from conftest import write_train_split

NIMAGES = 12


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> tuple[Path, Path]:
    """A train split of NIMAGES random pairs of varied sizes (with SHA-256 in the manifest) and its store."""
    from smt.files import sha256_file

    root = tmp_path_factory.mktemp("root")
    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(NIMAGES):
        h, w = int(rng.integers(10, 30)), int(rng.integers(10, 30))
        pairs.append((rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                      rng.integers(0, 256, (4 * h, 4 * w, 3), dtype=np.uint8)))
    write_train_split(root, pairs)
    path = root / "manifest_train.csv"
    manifest = pd.read_csv(path, dtype={"id": str}, keep_default_na=False)
    for kind in ("hr", "lr"):
        manifest[f"{kind}_sha256"] = [sha256_file(root / p) for p in manifest[f"{kind}_path"]]
    manifest.to_csv(path, index=False)
    store = tmp_path_factory.mktemp("store") / "train_store"
    summary = prepare_store(root, store, workers=2, log=lambda _: None)
    assert summary.images == NIMAGES and summary.written == 2 * NIMAGES
    return root, store


def test_store_holds_the_decoded_pngs_and_its_size_is_predicted(split):
    root, store = split
    manifest = pd.read_csv(root / "manifest_train.csv", dtype={"id": str}, keep_default_na=False)
    lr_paths, hr_paths = open_store(store, manifest)
    for row, lr_npy, hr_npy in zip(manifest.itertuples(), lr_paths, hr_paths):
        assert lr_npy == store / Path(row.lr_path).with_suffix(".npy")
        for npy, png in ((lr_npy, row.lr_path), (hr_npy, row.hr_path)):
            arr = load_array(npy)
            assert isinstance(arr, np.memmap) and not arr.flags.writeable
            assert np.array_equal(arr, read_image(root / png))
    on_disk = sum(p.stat().st_size for p in store.rglob("*.npy"))
    assert store_bytes(manifest) == on_disk  # the docs' disk estimate is this formula


def test_store_patches_equal_png_patches_byte_for_byte(split):
    """Every augmentation the sampler draws (crops, flips, transpose, channel order, colour matrix)."""
    root, store = split
    png = PairedPatchDataset(root, "train", patch_size=8, scale=4)
    mapped = PairedPatchDataset(root, "train", patch_size=8, scale=4, store=store)
    assert mapped.sizes() == png.sizes()
    aug = AugmentSpec(channel_permute=True, color_prob=0.4, hue_degrees=60.0, saturation=(0.7, 1.3))
    sampler = GlobalBatchSampler(png.sizes(), 8, 16, seed=5, augment=aug)
    colours = 0
    for step in range(12):
        for spec in sampler.draw(step):
            colours += spec.color is not None
            (a_lr, a_hr), (b_lr, b_hr) = png[spec], mapped[spec]
            assert a_lr.dtype == b_lr.dtype == torch.float32
            assert torch.equal(a_lr, b_lr) and torch.equal(a_hr, b_hr)
    assert colours > 20  # the colour path (LR re-made from the mapped HR) was exercised too
    # patches touching the last row and column
    h, w = png.sizes()[3]
    spec = PatchSpec(3, h - 8, w - 8, True, False, True)
    assert all(torch.equal(a, b) for a, b in zip(png[spec], mapped[spec]))


def test_store_decodes_nothing_and_keeps_subsets_and_loader_workers(split, monkeypatch):
    root, store = split
    png = PairedPatchDataset(root, "train", 6, 4, subset=["0007", "0002"])
    sampler = GlobalBatchSampler(png.sizes(), 6, 4, seed=1, rank=1, world_size=2)
    rank1 = [[png[s] for s in sampler.draw(step)] for step in range(3)]
    whole = [collate([png[s] for s in GlobalBatchSampler(png.sizes(), 6, 4, seed=1).draw(step)]) for step in range(3)]
    monkeypatch.setattr(data_mod, "read_image", lambda path: pytest.fail(f"decoded {path}"))
    mapped = PairedPatchDataset(root, "train", 6, 4, subset=["0007", "0002"], store=store)
    for step in range(3):
        got = [mapped[s] for s in sampler.draw(step)]
        assert all(torch.equal(a, b) for g, w in zip(got, rank1[step]) for a, b in zip(g, w))
    # DataLoader workers (each process opens its own maps) give the in-process batches
    loader = DataLoader(mapped, batch_sampler=GlobalBatchSampler(mapped.sizes(), 6, 4, seed=1), num_workers=2,
                        collate_fn=collate)
    it = iter(loader)
    for step in range(3):
        lr, hr = next(it)
        assert torch.equal(lr, whole[step][0]) and torch.equal(hr, whole[step][1])
    del it


def test_foreign_partial_or_damaged_stores_are_refused(split, tmp_path):
    root, store = split
    with pytest.raises(FileNotFoundError, match="no complete prepared store.*dvc repro prepare"):
        PairedPatchDataset(root, "train", 6, 4, store=tmp_path / "nothing")
    # a store made from other images (a PNG's hash differs)
    other = tmp_path / "other"
    other.mkdir()
    index = pd.read_csv(store / STORE_INDEX, dtype=str, keep_default_na=False)
    index.loc[4, "hr_sha256"] = "0" * 64
    index.to_csv(other / STORE_INDEX, index=False)
    with pytest.raises(ValueError, match=r"made from other images \(hr_sha256 differs for 1, e.g. '0004'\)"):
        PairedPatchDataset(root, "train", 6, 4, store=other)
    index.drop(index=5).to_csv(other / STORE_INDEX, index=False)
    with pytest.raises(ValueError, match=r"1 training images are not in the prepared store, e.g. \['0005'\]"):
        PairedPatchDataset(root, "train", 6, 4, store=other)
    # an array file gone or of the wrong size: found when the image is first used
    index = pd.read_csv(store / STORE_INDEX, dtype=str, keep_default_na=False)
    index.to_csv(other / STORE_INDEX, index=False)
    ds = PairedPatchDataset(root, "train", 6, 4, store=other)
    with pytest.raises(FileNotFoundError, match="missing from the prepared store"):
        ds[PatchSpec(0, 0, 0, False, False, False)]
    for rel in (index.loc[0, "lr_npy"], index.loc[0, "hr_npy"]):
        (other / rel).parent.mkdir(parents=True, exist_ok=True)
        np.save(other / rel, np.zeros((5, 5, 3), np.uint8))
    with pytest.raises(ValueError, match="array is 5x5 but the manifest says"):
        ds[PatchSpec(0, 0, 0, False, False, False)]


def test_preparation_resumes_and_redoes_stale_files(split, tmp_path, monkeypatch):
    root, store = split
    manifest = pd.read_csv(root / "manifest_train.csv", dtype={"id": str}, keep_default_na=False)
    partial = tmp_path / "partial"
    prepare_store(root, partial, workers=1, log=lambda _: None)
    # an interrupted run: the index gone, one array never written, one written before its PNG was remade
    (partial / STORE_INDEX).unlink()
    (partial / Path(manifest.loc[2, "hr_path"]).with_suffix(".npy")).unlink()
    stale = partial / Path(manifest.loc[3, "lr_path"]).with_suffix(".npy")
    np.save(stale, np.zeros(load_array(stale).shape, np.uint8))
    png = root / manifest.loc[3, "lr_path"]
    old = png.stat().st_mtime_ns
    import os
    os.utime(stale, ns=(old - 10**9, old - 10**9))
    decoded = []
    real = prepare_mod.read_image
    monkeypatch.setattr(prepare_mod, "read_image", lambda p: decoded.append(Path(p).name) or real(p))
    summary = prepare_store(root, partial, workers=1, log=lambda _: None)
    assert sorted(decoded) == sorted([Path(manifest.loc[2, "hr_path"]).name, png.name]) and summary.written == 2
    assert np.array_equal(load_array(stale), read_image(png))
    assert (partial / STORE_INDEX).read_bytes() == (store / STORE_INDEX).read_bytes()


def test_preparation_refuses_a_store_inside_the_root_or_a_full_disk(split, monkeypatch):
    root, _ = split
    with pytest.raises(ValueError, match="must be outside data.root"):
        prepare_store(root, root / "store")
    monkeypatch.setattr(prepare_mod.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(OSError, match=r"the store needs 0\.0 GB .* the disk has 0\.0 GB free; set data.store"):
        prepare_store(root, root.parent / "elsewhere")
