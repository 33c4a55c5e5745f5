"""The authors' inference protocol (smt.infer.bbox_protocol) against their code's outputs on random weights
(tests/fixtures/bbox_smt, made by running ZZXF11/BBox_Solution_NTIRE2025_ImageSR_x4 on CPU: see its README),
their fusion, and the protocol switches (infer.protocol, --protocol)."""
from __future__ import annotations

import io
import lzma
from pathlib import Path

import numpy as np
import pytest
import torch

from smt.config import ConfigError, InferConfig, parse_section
from smt.data.images import image_to_tensor, tensor_to_image
from smt.infer.bbox_protocol import (BBOX_SEED, BBoxMethod, check_protocol, fuse_bbox, hat_bbox, mambairv2_bbox,
                                     split_tiles, gumbel_routing)
from smt.models import HAT, MambaIRv2, load_model

FIXTURES = Path(__file__).parent / "fixtures" / "bbox_smt"


def _load_xz(name: str):
    with lzma.open(FIXTURES / name) as f:
        return torch.load(io.BytesIO(f.read()), weights_only=True)


@pytest.fixture(scope="module")
def case():
    return _load_xz("cases.pt.xz")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The fixture's two files in the authors' layouts, as their released ``.pth`` files are."""
    folder = tmp_path_factory.mktemp("bbox")
    paths = {}
    for name in ("hat", "mambairv2"):
        paths[name] = folder / f"{name}.pth"
        paths[name].write_bytes(lzma.open(FIXTURES / f"{name}_bbox_layout.pth.xz").read())
    return paths


@pytest.fixture(scope="module")
def nets(checkpoints):
    """Our classes loaded from the authors' layouts by the project's loader (architecture from the tensors)."""
    return {name: load_model(path, None, "cpu") for name, path in checkpoints.items()}


def _assert_uint8_parity(ours: np.ndarray, theirs: torch.Tensor, near_half: torch.Tensor, what: str) -> int:
    """Equal bytes, except by one level where their float lay within 1e-3 of a rounding boundary (x255): our
    models compute their function with other float rounding. Returns how many pixels differ."""
    ours_chw = torch.from_numpy(ours).permute(2, 0, 1).reshape(-1).int()
    theirs_chw = theirs.permute(2, 0, 1).reshape(-1).int()
    diff = (ours_chw - theirs_chw).abs()
    off = torch.nonzero(diff).flatten()
    assert diff.max() <= 1, f"{what}: a pixel differs by {int(diff.max())} levels"
    assert bool(torch.isin(off, near_half.long()).all()), \
        f"{what}: {int((~torch.isin(off, near_half.long())).sum())} pixels differ away from a rounding boundary"
    return len(off)


def test_bbox_models_are_our_classes_loaded_from_their_layouts(nets):
    assert isinstance(nets["hat"], HAT) and isinstance(nets["mambairv2"], MambaIRv2)
    assert nets["hat"].window_size == 16 and nets["mambairv2"].window_size == 16


def test_hat_forward_matches_their_mshat_on_the_padded_input(nets, case):
    x = image_to_tensor(case["inputs"]["a_odd"].numpy())
    ph, pw = case["forward"]["hat_input_padded_to"]
    from smt.models.common import pad_reflect_any
    xp = pad_reflect_any(x, ph - x.shape[-2], pw - x.shape[-1], "symmetric")  # their process_img padding
    with torch.no_grad():
        y = nets["hat"](xp)
    torch.testing.assert_close(y, case["forward"]["hat"][4], atol=1e-4, rtol=0)


def test_every_head_of_their_forward_matches_ours_loaded_with_the_extra_upsamplers(case):
    """Their MambaIRv2_Multiscale (x4, x3, x2 after one Gumbel seed) and MSHAT (x4, x2) forwards against ours built
    with the extra upsamplers (``smt.models.layouts.to_ours``: their heads share conv_before_upsample/conv_last)."""
    from smt.models.common import pad_reflect_any
    from smt.models.layouts import aux_scales_of, to_ours

    x = image_to_tensor(case["inputs"]["a_odd"].numpy())
    for name, cls, args in (("mambairv2", MambaIRv2, case["mamba_args"]), ("hat", HAT, case["hat_args"])):
        state, _ = to_ours(_load_xz(f"{name}_bbox_layout.pth.xz")["params"])
        net = cls(**args, aux_scales=aux_scales_of(state)).eval()
        net.load_state_dict(state, strict=True)
        if name == "hat":
            ph, pw = case["forward"]["hat_input_padded_to"]  # MSHAT does not pad: their process_img's padding
            inp, ref = pad_reflect_any(x, ph - x.shape[-2], pw - x.shape[-1], "symmetric"), case["forward"]["hat"]
        else:
            inp, ref = x, case["forward"]["mamba"]
            torch.manual_seed(case["forward"]["mamba_seed"])
        with torch.no_grad():
            got = net.forward_multiscale(inp)
        assert set(got) == set(net.aux_scales) | {4} and set(got) <= set(ref)
        for scale, y in got.items():
            torch.testing.assert_close(y, ref[scale], atol=1e-4, rtol=0, msg=f"{name} x{scale}")


def _hat_parity(nets, case, name: str) -> None:
    ours = tensor_to_image(hat_bbox(nets["hat"], image_to_tensor(case["inputs"][name].numpy())))
    assert ours.shape == tuple(case["hat_u8"][name].shape)
    _assert_uint8_parity(ours, case["hat_u8"][name], case["hat_near_half"][name], f"HAT {name}")


def _mambairv2_parity(nets, case, names: list[str]) -> None:
    assert case["seed"] == BBOX_SEED and names == case["order"][:len(names)]
    net = nets["mambairv2"]
    torch.manual_seed(case["seed"])  # once per run; the images in their (sorted) order, the stream carried
    with gumbel_routing(net):
        for name in names:
            ours = tensor_to_image(mambairv2_bbox(net, image_to_tensor(case["inputs"][name].numpy())))
            _assert_uint8_parity(ours, case["mamba_u8"][name], case["mamba_near_half"][name], f"MambaIRv2 {name}")


def test_hat_bbox_protocol_matches_their_uint8_output_on_the_odd_sized_image(nets, case):
    _hat_parity(nets, case, "a_odd")


@pytest.mark.slow
def test_hat_bbox_protocol_matches_their_uint8_output_on_the_larger_image(nets, case):
    _hat_parity(nets, case, "b_tiled")


def test_mambairv2_bbox_protocol_matches_their_uint8_output_with_the_same_gumbel_stream(nets, case):
    _mambairv2_parity(nets, case, ["a_odd"])  # every split size covers the image: 40 whole-image passes


@pytest.mark.slow
def test_mambairv2_bbox_protocol_matches_their_tiled_uint8_output_after_the_first_image(nets, case):
    _mambairv2_parity(nets, case, ["a_odd", "b_tiled"])  # S = 100 tiles 2 x 2 (one side reflect-padded)


def test_upscale_with_their_two_checkpoints_fuses_as_their_test_py(checkpoints, case, tmp_path):
    from PIL import Image

    from smt.__main__ import main

    src = tmp_path / "a_odd.png"
    Image.fromarray(case["inputs"]["a_odd"].numpy()).save(src)
    assert main(["upscale", str(src), "-o", str(tmp_path / "out"), "--protocol", "bbox",
                 "--checkpoint", str(checkpoints["hat"]), "--checkpoint", str(checkpoints["mambairv2"])]) == 0
    got = np.array(Image.open(tmp_path / "out" / "a_oddx4.png"))
    theirs = case["fused_u8"]["a_odd"].numpy()
    # BBoxMethod seeds BBOX_SEED at its first image; equal to their fused bytes except where a model's own output
    # sat on a rounding boundary (the two tests above: one value each)
    assert got.shape == theirs.shape
    diff = np.abs(got.astype(int) - theirs.astype(int))
    assert diff.max() <= 1 and np.count_nonzero(diff) <= 2


def test_fuse_bbox_equals_their_fusion_and_floor_of_the_mean(case):
    for name, theirs in case["fused_u8"].items():
        got = fuse_bbox(case["mamba_u8"][name].numpy(), case["hat_u8"][name].numpy())
        np.testing.assert_array_equal(got, theirs.numpy())
    a, b = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8))
    np.testing.assert_array_equal(fuse_bbox(a, b), ((a.astype(int) + b) // 2).astype(np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        fuse_bbox(a.astype(np.float32), b)


def test_split_tiles_partition_the_padded_image_with_their_overlap():
    for h, w, s in [(104, 101, 100), (37, 29, 100), (250, 611, 200), (1020, 2040, 300)]:
        pad_h, pad_w, tiles, core_h, core_w = split_tiles(h, w, s)
        n_h, n_w = h // s + 1, w // s + 1
        assert len(tiles) == n_h * n_w and (h + pad_h) % n_h == 0 and (w + pad_w) % n_w == 0
        assert pad_h < n_h and pad_w < n_w
        for rows, cols, i, j in tiles:
            assert rows.start == max(0, i * core_h - core_h // 10) if i else rows.start == 0
            assert rows.stop == (i + 1) * core_h + (core_h // 10 if i < n_h - 1 else 0)
            assert cols.stop == (j + 1) * core_w + (core_w // 10 if j < n_w - 1 else 0)


def test_protocol_names_are_checked_everywhere(tmp_path, capsys):
    assert check_protocol("bbox") == "bbox"
    with pytest.raises(ValueError, match=r"unknown protocol 'authors' \(valid: smt, bbox\)"):
        check_protocol("authors")
    assert parse_section(InferConfig, {"protocol": "bbox"}, "infer").protocol == "bbox"
    assert InferConfig().protocol == "smt"
    with pytest.raises(ConfigError, match="protocol"):
        parse_section(InferConfig, {"protocol": "theirs"}, "infer")
    from smt.benchmark import parse_protocols
    assert parse_protocols("both") == ("smt", "bbox") and parse_protocols("bbox, smt") == ("bbox", "smt")
    with pytest.raises(ValueError, match="--protocol: unknown protocol 'x'"):
        parse_protocols("smt,x")
    from smt.__main__ import main
    src = tmp_path / "in.png"
    from PIL import Image
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src)
    assert main(["upscale", str(src), "-o", str(tmp_path / "o"), "--protocol", "nope"]) == 2
    assert "--protocol: unknown protocol 'nope' (valid: smt, bbox)" in capsys.readouterr().err
    assert main(["upscale", str(src), "-o", str(tmp_path / "o"), "--checkpoint", "a.pth", "--checkpoint",
                 "b.pth"]) == 2
    assert "two fused by the authors' protocol (--protocol bbox)" in capsys.readouterr().err


from test_infer import trained_setup  # noqa: E402,F401 - the infer stage's tiny data and models


@pytest.mark.slow
def test_infer_stage_runs_their_protocol_beside_ours_and_instead_of_ours(trained_setup, tmp_path):
    """infer.protocol bbox: the fused images are their method's (valid then test: one Gumbel stream);
    compare_protocols: both fused PSNR-Y on test in results/protocols.json, seconds only in the timings file."""
    import dataclasses
    import json

    from smt.data.images import read_image
    from smt.data.manifest import read_manifest
    from smt.infer.runner import load_method_models, run_inference
    from smt.metrics import NTIRE2025, evaluate_pair

    data, train, infer, _ = trained_setup
    cfg = dataclasses.replace(infer, protocol="bbox", compare_protocols=True)
    out = tmp_path / "results"
    run_inference(cfg, train, data, out, log=lambda m: None, timings_path=tmp_path / "timings.json")
    table = json.loads((out / "protocols.json").read_text())
    assert table["images"] == 1 and set(table["psnr_y"]) == {"smt", "bbox"} and "seconds" not in str(table)
    assert json.loads((tmp_path / "timings.json").read_text())["fused [bbox]"]["seconds_per_image"] > 0
    method = BBoxMethod(load_method_models(cfg, train, "cpu"))
    root = Path(data.root)
    for split in ("valid", "test"):
        for row in read_manifest(data.root, split).itertuples():
            theirs = method(read_image(root / row.lr_path))
            np.testing.assert_array_equal(read_image(out / split / "fused" / f"{row.id}x4.png"), theirs)
            if split == "test":
                got = evaluate_pair(theirs, read_image(root / row.hr_path), NTIRE2025)["psnr_y"]
                assert table["psnr_y"]["bbox"] == pytest.approx(got, abs=1e-9)
    with pytest.raises(ConfigError, match="one process"):
        parse_section(InferConfig, {"protocol": "bbox", "nproc": 2}, "infer")


def test_benchmark_puts_both_protocols_side_by_side_on_the_same_weights(checkpoints, nets, case):
    from smt.benchmark import run_cli_methods

    seconds: dict[str, list[float]] = {}
    methods, _, label = run_cli_methods(str(checkpoints["hat"]), None, None, "cpu", protocols=("smt", "bbox"),
                                        seconds=seconds)
    assert list(methods) == [label, f"{label} [bbox]"]
    lr = case["inputs"]["a_odd"].numpy()
    theirs = methods[f"{label} [bbox]"](lr)
    np.testing.assert_array_equal(theirs, tensor_to_image(hat_bbox(nets["hat"], image_to_tensor(lr))))
    assert methods[label](lr).shape == theirs.shape and set(seconds) == set(methods)
    with pytest.raises(ValueError, match="bbox protocol has its own ensemble"):
        run_cli_methods(str(checkpoints["hat"]), None, None, "cpu", use_self_ensemble=True, protocols=("bbox",))


@pytest.mark.parametrize("name", ["hat", "mambairv2"])
def test_export_in_their_layout_gives_back_the_state_dict_their_class_made(checkpoints, name, tmp_path):
    """Their file -> our loader -> ``export --layout bbox``: the very keys, shapes, dtypes and values their class
    saved (buffers included), so their loaders (MambaIRv2_Multiscale strict, MSHAT strict=False) load it as the
    original; the official-layout export of the same file loads into our plain class."""
    from smt.__main__ import main

    out = tmp_path / f"{name}_bbox.pth"
    assert main(["export", name, "--checkpoint", str(checkpoints[name]), "--layout", "bbox", "-o", str(out)]) == 0
    theirs = torch.load(checkpoints[name], weights_only=True)["params"]
    ours = torch.load(out, weights_only=True)
    assert list(ours) == ["params"] and set(ours["params"]) == set(theirs)
    for k, v in theirs.items():
        assert ours["params"][k].dtype == v.dtype and torch.equal(ours["params"][k], v), k
    official = tmp_path / f"{name}.pth"
    assert main(["export", name, "--checkpoint", str(checkpoints[name]), "-o", str(official)]) == 0
    plain = torch.load(official, weights_only=True)["params_ema"]
    assert not any(k.startswith(("upsample2", "upsample3", "upsample4", "upsample_2x", "aux_")) for k in plain)
    assert load_model(official, None, "cpu") is not None
