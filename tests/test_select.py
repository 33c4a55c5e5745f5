"""CLIP selection: ranking, top-K, dedup and caps with known answers; cache reuse; offline behaviour."""
import numpy as np
import pandas as pd
import pytest
import torch

from smt.config import ConfigError, DataConfig, SelectConfig, parse_section
from smt.data.dataset_builder import build_dataset
from smt.select.clip_select import ClipEncoder, SelectionError, embed_images, load_encoder, rank_pool, run_selection
from smt.train.data import PairedPatchDataset, read_subset


def _unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_ranking_topk_dedup_and_caps():
    targets = _unit([[1, 0, 0], [1, 0.2, 0]])
    pool = _unit([[1, 0.1, 0],      # 0: closest to the targets
                  [1, 0.1, 0.001],  # 1: near-duplicate of 0
                  [0.7, 0.7, 0],    # 2
                  [0, 0, 1],        # 3: unrelated
                  [0.9, 0, 0.4]])   # 4
    sources = ["a", "a", "a", "b", "b"]
    table = rank_pool(pool, targets, sources, top_k=3, dedup_threshold=0.999)
    sel = table[table.selected].sort_values("rank")
    assert sel["index"].tolist() == [0, 4, 2] and sel["rank"].tolist() == [1, 2, 3]
    assert table.set_index("index").loc[1, "reason"].startswith("near-duplicate")
    assert table.set_index("index").loc[3, "reason"] == "beyond top_k"
    # scores are the mean cosine to the targets, in descending order
    np.testing.assert_allclose(table.score, np.sort(pool @ targets.mean(0))[::-1])
    capped = rank_pool(pool, targets, sources, top_k=3, dedup_threshold=1.0, per_source_cap=1)
    assert capped[capped.selected]["index"].tolist() == [0, 4]
    assert set(capped[~capped.selected].reason) == {"source cap (1)"}
    with pytest.raises(ValueError, match="target set is empty"):
        rank_pool(pool, targets[:0], sources, 2)


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sel") / "d"
    build_dataset(DataConfig(root=str(root), max_side=48, train_images=("camera", "coins", "brick"),
                             valid_images=("astronaut",)))
    return root


def test_selection_manifest_cache_and_stage3_dataset(small_root, tmp_path):
    cfg = SelectConfig(model="smt-tiny-vit", allow_untrained=True, top_k=2, dedup_threshold=1.0,
                       cache_dir=str(tmp_path / "cache"), target_splits=("valid",))
    first = run_selection(cfg, small_root, tmp_path / "out")
    assert first.untrained and first.embedded == {"pool": 3, "targets": 1}
    manifest = pd.read_csv(first.manifest_path, dtype={"id": str})
    assert manifest["rank"].tolist() == [1, 2] and set(manifest.features) == {"untrained"}
    again = run_selection(cfg, small_root, tmp_path / "out2")
    assert again.embedded == {"pool": 0, "targets": 0}  # everything from the cache
    pd.testing.assert_frame_equal(pd.read_csv(again.manifest_path), pd.read_csv(first.manifest_path))
    ds = PairedPatchDataset(small_root, "train", 8, 4, subset=read_subset(first.manifest_path))
    assert ds.ids == manifest["id"].tolist()


def test_offline_weights_fail_clearly_unless_allowed(small_root, tmp_path):
    cfg = SelectConfig(model="ViT-B-32", pretrained="openai", cache_dir=str(tmp_path / "c"))
    with pytest.raises(SelectionError, match="could not be loaded(.|\n)*select.pretrained to a local checkpoint"):
        run_selection(cfg, small_root, tmp_path / "out")
    no_weights = SelectConfig(model="smt-tiny-vit", cache_dir=str(tmp_path / "c"))
    with pytest.raises(SelectionError, match="untrained features"):
        run_selection(no_weights, small_root, tmp_path / "out")


def test_select_config_validation():
    with pytest.raises(ConfigError, match="select.top_k: must be >= 1"):
        parse_section(SelectConfig, {"top_k": 0}, "select")
    with pytest.raises(ConfigError, match="select.dedup_threshold"):
        parse_section(SelectConfig, {"dedup_threshold": 2.0}, "select")
    with pytest.raises(ConfigError, match="device"):
        parse_section(SelectConfig, {"device": "gpu"}, "select")


@pytest.mark.parametrize("requested", ["auto", "cpu", "cuda"], ids=["auto", "cpu", "asks-cuda"])  # id "cuda" = GPU-only
def test_clip_encoder_takes_its_device_from_the_select_config(requested, monkeypatch, tmp_path):
    import smt.distributed

    asked = []
    monkeypatch.setattr(smt.distributed, "device_for", lambda r: asked.append(r) or torch.device("cpu"))
    cfg = SelectConfig(model="smt-tiny-vit", allow_untrained=True, device=requested, cache_dir=str(tmp_path))
    enc = load_encoder(cfg)
    assert asked == [requested] and enc.device == torch.device("cpu")
    assert {p.device for p in enc.model.parameters()} == {torch.device("cpu")}


def test_clip_cuda_without_a_gpu_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = SelectConfig(model="smt-tiny-vit", allow_untrained=True, device="cuda", cache_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="no CUDA device is available"):
        load_encoder(cfg)


def test_embedding_sends_images_to_the_encoder_device(small_root, tmp_path):
    """Images go to the encoder's device and embeddings come back to the CPU (a 'meta' model stands in for a
    GPU one)."""
    seen = []

    class Model(torch.nn.Module):
        def encode_image(self, batch):
            seen.append(batch.device.type)
            return torch.ones(batch.shape[0], 4, device=batch.device)

    enc = ClipEncoder(Model(), lambda im: torch.zeros(3, 8, 8), "stub", True, torch.device("meta"))
    with pytest.raises(NotImplementedError):  # meta tensors have no data to copy back: it got that far
        embed_images([next(small_root.rglob("*.png"))], enc, tmp_path, crops=1)
    assert seen == ["meta"]
