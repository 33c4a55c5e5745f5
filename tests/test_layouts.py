"""The authors' checkpoint layouts (team BBox's MambaIRv2_Multiscale and MSHAT): read wherever a checkpoint is
accepted, written by ``export --layout bbox``, and every malformed file named."""
from __future__ import annotations

import pytest
import torch

from smt.export import export_checkpoint, read_for_export
from smt.models import build_model, load_model, load_weights
from smt.models.layouts import BBOX_HAT, BBOX_MAMBAIRV2, aux_scales_of, detect_layout, to_bbox, to_ours
from smt.models.loading import CheckpointError, read_checkpoint


def _model(name: str, aux=(2, 3)):
    torch.manual_seed(0)
    net = build_model(name, aux_scales=aux).eval()
    if hasattr(net, "routing"):
        net.routing = "argmax"
    return net


def _bbox_keys(plain_keys: set[str], arch: str) -> set[str]:
    """The key set of the authors' class, derived from the official keys by their constructors' names."""
    up = {k for k in plain_keys if k.startswith("upsample.")}
    rest = plain_keys - up
    if arch == "mambairv2":
        return rest | {"upsample4" + k[len("upsample"):] for k in up} | {
            "upsample2.0.weight", "upsample2.0.bias", "upsample3.0.weight", "upsample3.0.bias"}
    return plain_keys | {"upsample_2x.0.weight", "upsample_2x.0.bias"}


@pytest.mark.parametrize("name,arch", [("hat_tiny", "hat"), ("mambairv2_tiny", "mambairv2")])
def test_bbox_export_has_exactly_the_authors_keys_and_reads_back_to_the_same_tensors(name, arch, tmp_path):
    net = _model(name)
    ours = tmp_path / "ours.pth"
    torch.save({"params_ema": net.state_dict()}, ours)
    out = export_checkpoint(ours, tmp_path / "bbox.pth", "bbox", expect_arch=arch)
    raw = torch.load(out, weights_only=True)
    assert list(raw) == ["params"]
    plain = set(build_model(name).state_dict())
    assert set(raw["params"]) == _bbox_keys(plain, arch)
    assert detect_layout(raw["params"]) == (BBOX_MAMBAIRV2 if arch == "mambairv2" else BBOX_HAT)
    back, container, layout = read_checkpoint(out)
    assert container == "params" and layout == detect_layout(raw["params"])
    expected = {k: v for k, v in net.state_dict().items()
                if not (arch == "hat" and k.startswith("aux_upsample.x3."))}  # MSHAT has no x3 upsampler
    assert set(back) == set(expected)
    assert all(torch.equal(back[k], v) for k, v in expected.items())


@pytest.mark.parametrize("name", ["hat_tiny", "mambairv2_tiny"])
def test_authors_layout_runs_for_inference_with_the_x4_head_and_reports_unused_heads_once(name, tmp_path, capsys):
    net = _model(name)
    path = tmp_path / "bbox.pth"
    torch.save({"params": to_bbox(net.state_dict(), name.split("_")[0], 4, "pixelshuffle")}, path)
    loaded = load_model(path, routing="argmax")  # architecture and sizes from the tensors
    err = capsys.readouterr().err
    assert err.count("not used by this model") == 1 and "aux_upsample.x2" in err and "authors'" in err
    x = torch.rand(1, 3, 19, 13)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))


def test_module_prefixes_and_params_ema_container_are_accepted_in_the_authors_layout(tmp_path):
    net = _model("mambairv2_tiny")
    bbox = to_bbox(net.state_dict(), "mambairv2", 4, "pixelshuffle")
    path = tmp_path / "ddp.pth"
    torch.save({"params_ema": {"module." + k: v for k, v in bbox.items()}}, path)
    state, container, layout = read_checkpoint(path)
    assert container == "params_ema" and layout == BBOX_MAMBAIRV2
    assert aux_scales_of(state) == (2, 3) and "upsample.0.weight" in state and "upsample4.0.weight" not in state


def test_training_init_from_the_authors_hat_fills_x2_and_leaves_x3_at_init(tmp_path):
    src = _model("hat_tiny", aux=(2,))
    path = tmp_path / "team15_SMT_HAT.pth"
    torch.save({"params": to_bbox(src.state_dict(), "hat", 4, "pixelshuffle")}, path)
    dst = build_model("hat_tiny", aux_scales=(2, 3))
    report = load_weights(dst, path, allow_missing=("aux_upsample.",))
    assert report.layout == BBOX_HAT and report.missing_allowed == ["aux_upsample.x3.0.weight", "aux_upsample.x3.0.bias"]
    assert torch.equal(dst.aux_upsample["x2"][0].weight, src.aux_upsample["x2"][0].weight)


def test_hat_x3_upsampler_has_no_slot_in_the_authors_layout_and_is_left_out():
    net = _model("hat_tiny")
    bbox = to_bbox(net.state_dict(), "hat", 4, "pixelshuffle")
    assert not any(k.startswith(("aux_upsample.", "upsample_3x")) for k in bbox)
    assert "upsample_2x.0.weight" in bbox


def test_bbox_export_names_the_upsamplers_a_model_was_not_trained_with(tmp_path):
    plain = tmp_path / "plain.pth"
    torch.save({"params_ema": _model("mambairv2_tiny", aux=()).state_dict()}, plain)
    with pytest.raises(CheckpointError, match=r"needs upsamplers.*x2 \(upsample2\), x3 \(upsample3\); it has none"):
        export_checkpoint(plain, tmp_path / "o.pth", "bbox")
    only3 = tmp_path / "only3.pth"
    torch.save({"params_ema": _model("hat_tiny", aux=(3,)).state_dict()}, only3)
    with pytest.raises(CheckpointError, match=r"x2 \(upsample_2x\); it has x3"):
        export_checkpoint(only3, tmp_path / "o.pth", "bbox")


def test_malformed_authors_files_and_bad_export_arguments_are_named(tmp_path):
    net = _model("mambairv2_tiny")
    bbox = to_bbox(net.state_dict(), "mambairv2", 4, "pixelshuffle")
    no_x4 = {k: v for k, v in bbox.items() if not k.startswith("upsample4.")}
    path = tmp_path / "no_x4.pth"
    torch.save({"params": no_x4}, path)
    with pytest.raises(CheckpointError, match=r"no_x4.pth: the authors' MambaIRv2_Multiscale layout.*'upsample4"):
        load_model(path)
    bad_shape = dict(bbox)
    bad_shape["upsample2.0.weight"] = bad_shape["upsample2.0.weight"][:5]
    path = tmp_path / "bad_shape.pth"
    torch.save({"params": bad_shape}, path)
    with pytest.raises(CheckpointError, match=r"shape mismatches.*aux_upsample\.x2\.0\.weight"):
        read_for_export(path)
    good = tmp_path / "good.pth"
    torch.save({"params": bbox}, good)
    with pytest.raises(CheckpointError, match="holds a mambairv2 model, not hat"):
        export_checkpoint(good, tmp_path / "o.pth", "bbox", expect_arch="hat")
    with pytest.raises(ValueError, match=r"--layout 'authors': not a layout \(valid: official, bbox\)"):
        export_checkpoint(good, tmp_path / "o.pth", "authors")
    with pytest.raises(ValueError, match=r"the authors' layout is a \.pth file"):
        export_checkpoint(good, tmp_path / "o.safetensors", "bbox")
    legacy = {("aux_heads.x2." + k[len("aux_upsample.x2."):] if k.startswith("aux_upsample.x2.") else k): v
              for k, v in net.state_dict().items()}
    with pytest.raises(CheckpointError, match="previous release"):
        to_bbox(legacy, "mambairv2", 4, "pixelshuffle")
    assert not (tmp_path / "o.pth").exists()


def test_official_export_of_an_authors_file_is_the_plain_official_layout(tmp_path):
    net = _model("hat_tiny")
    src = tmp_path / "team15_SMT_HAT.pth"
    torch.save({"params": to_bbox(net.state_dict(), "hat", 4, "pixelshuffle")}, src)
    out = export_checkpoint(src, tmp_path / "official.pth")
    raw = torch.load(out, weights_only=True)
    assert list(raw) == ["params_ema"] and set(raw["params_ema"]) == set(build_model("hat_tiny").state_dict())


def test_a_state_dict_in_our_layout_comes_back_unchanged():
    state = _model("hat_tiny").state_dict()
    renamed, layout = to_ours(state)
    assert layout == "official" and list(renamed) == list(state)
