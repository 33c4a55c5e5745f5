"""`python -m smt upscale` and `export`: the pipeline's whole method on a user's image (byte-identical to the infer
stage's fused output), bundles, exports other tools load (spandrel), architecture detection for official files,
and the SR-tool conventions (naming, suffix, alpha, tile auto and out-of-memory retry, flag validation, exit codes).
The tiny pipeline is test_infer's ``trained_setup`` (two random-weight tiny models, three images)."""
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from smt.__main__ import main
from smt.config import as_dict
from smt.data.images import read_as_given
from smt.infer import upscale as up
from smt.models import build_model, load_model
import test_infer
from test_infer import json_ready

trained_setup = test_infer.trained_setup  # test_infer's module fixture, reused here


@pytest.fixture(scope="module")
def run(trained_setup):
    """The tiny pipeline's infer stage, run once, and its params.yaml."""
    from smt.infer.runner import run_inference

    data, train, infer, base = trained_setup
    results = base / "results_upscale"
    run_inference(infer, train, data, results, log=lambda m: None)
    params = base / "params_upscale.yaml"
    params.write_text(yaml.safe_dump(json_ready({"data": as_dict(data), "train": as_dict(train),
                                                 "infer": as_dict(infer)})))
    return data, params, results, base


def _valid_lr(data):
    import pandas as pd

    row = pd.read_csv(f"{data.root}/manifest_valid.csv", dtype={"id": str}).iloc[0]
    return f"{data.root}/{row.lr_path}", row.id


def test_whole_method_is_byte_identical_to_the_infer_stage(run, tmp_path, capsys):
    data, params, results, _ = run
    lr, id_ = _valid_lr(data)
    rc = main(["upscale", "-i", lr, "-o", str(tmp_path / "out"), "--params", str(params),
               "--results", str(results), "--device", "cpu"])
    assert rc == 0
    assert "upscale: inference paths: cpu" in capsys.readouterr().err  # says which paths it takes
    # 0000x4.png stays 0000x4.png (no doubled scale tag) and has the fused image's bytes
    assert (tmp_path / "out" / f"{id_}x4.png").read_bytes() == (results / "valid" / "fused" / f"{id_}x4.png").read_bytes()


def test_whole_method_with_gumbel_routing_uses_the_stage_seed_of_the_image(trained_setup, tmp_path):
    """Random (Gumbel) routing: the same bytes only if upscale seeds each image as the infer stage does
    (``0000x4.png`` -> image 0), so this checks the seeding, not just the computation."""
    import dataclasses

    from smt.infer.runner import run_inference

    data, train, infer, _ = trained_setup
    infer = dataclasses.replace(infer, routing="gumbel", seed=3)
    run_inference(infer, train, data, tmp_path / "results", log=lambda m: None)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(json_ready({"data": as_dict(data), "train": as_dict(train),
                                                 "infer": as_dict(infer)})))
    lr, id_ = _valid_lr(data)
    assert main(["upscale", "-i", lr, "-o", str(tmp_path / "out"), "--params", str(params),
                 "--results", str(tmp_path / "results"), "--device", "cpu"]) == 0
    want = (tmp_path / "results" / "valid" / "fused" / f"{id_}x4.png").read_bytes()
    assert (tmp_path / "out" / f"{id_}x4.png").read_bytes() == want
    # another name gives another seed, hence (with Gumbel routing) other bytes
    other = tmp_path / "photo.png"
    other.write_bytes(open(lr, "rb").read())
    assert main(["upscale", "-i", str(other), "-o", str(tmp_path / "out"), "--params", str(params),
                 "--results", str(tmp_path / "results"), "--suffix", ""]) == 0
    assert up.image_id(other, 4) == 0 != int(id_)
    assert (tmp_path / "out" / "photo.png").read_bytes() != want


def test_bundle_runs_the_same_method(run, tmp_path):
    data, params, results, _ = run
    lr, id_ = _valid_lr(data)
    bundle = tmp_path / "method.safetensors"
    assert main(["export", "bundle", "-o", str(bundle), "--params", str(params), "--results", str(results)]) == 0
    assert main(["upscale", lr, "-o", str(tmp_path / "out"), "--bundle", str(bundle), "--device", "cpu"]) == 0
    assert (tmp_path / "out" / f"{id_}x4.png").read_bytes() == (results / "valid" / "fused" / f"{id_}x4.png").read_bytes()
    method = up.method_from_bundle(bundle)
    fit = json.loads((results / "fusion.json").read_text())
    assert method.weight_a == fit["weight_a"] and list(method.models) == ["hat", "mambairv2"]
    assert method.cfg.window_tiles == (6, 8, 16) and method.cfg.self_ensemble
    # the benchmark's view of a bundle: an upscaler returning the method's image on the [0, 255] scale
    from smt.infer.bundle import load_bundle

    upscaler = load_bundle(bundle)
    fused = np.array(Image.open(results / "valid" / "fused" / f"{id_}x4.png"))
    assert upscaler.scale == 4 and np.array_equal(upscaler(np.array(Image.open(lr))), fused.astype(np.float64))
    # a bundle is not a checkpoint, and a checkpoint is not a bundle
    assert main(["upscale", lr, "-o", str(tmp_path / "o2"), "--checkpoint", str(bundle)]) == 2
    ckpt = tmp_path / "hat.safetensors"
    assert main(["export", "hat", "-o", str(ckpt), "--params", str(params)]) == 0
    assert main(["upscale", lr, "-o", str(tmp_path / "o3"), "--bundle", str(ckpt)]) == 2


def test_export_pth_is_the_official_layout_without_extra_upsamplers(run, tmp_path):
    data, params, results, base = run
    out = tmp_path / "hat.pth"
    assert main(["export", "hat", "-o", str(out), "--params", str(params)]) == 0
    obj = torch.load(out, weights_only=True)
    assert list(obj) == ["params_ema"]
    state = obj["params_ema"]
    assert not any(k.startswith("aux_upsample.") for k in state)
    ref = build_model("hat_tiny")
    assert set(state) == set(ref.state_dict())
    ref.load_state_dict(state, strict=True)
    # no --model needed: the architecture is read from the weights
    net = load_model(out, None, "cpu", routing="argmax")
    x = torch.rand(1, 3, 12, 10)
    with torch.no_grad():
        assert torch.equal(net(x), ref.eval()(x))


def test_export_safetensors_carries_architecture_metadata(run, tmp_path):
    from safetensors import safe_open

    _, params, _, _ = run
    out = tmp_path / "m.safetensors"
    assert main(["export", "mambairv2", "-o", str(out), "--params", str(params)]) == 0
    with safe_open(str(out), "pt") as fh:
        meta, keys = fh.metadata(), list(fh.keys())
    args = json.loads(meta["model_args"])
    assert meta["arch"] == "mambairv2" and meta["scale"] == "4" and meta["upsampler"] == "pixelshuffle"
    assert "aux_scales" not in args and not any(k.startswith("aux_upsample.") for k in keys)
    assert set(keys) == set(build_model("mambairv2_tiny").state_dict())


def test_export_refuses_unknown_names_and_suffixes(run, tmp_path, capsys):
    _, params, _, _ = run
    assert main(["export", "swinir", "-o", str(tmp_path / "a.pth"), "--params", str(params)]) == 2
    assert "not a model of the pipeline" in capsys.readouterr().err
    assert main(["export", "hat", "-o", str(tmp_path / "a.onnx"), "--params", str(params)]) == 2
    assert "must end in .pth or .safetensors" in capsys.readouterr().err
    assert main(["export", "hat", "-o", str(tmp_path / "no" / "a.pth"), "--params", str(params)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_spandrel_loads_the_hat_export_and_matches(run, tmp_path):
    spandrel = pytest.importorskip("spandrel", reason="spandrel (test-only, requirements.txt) is not installed")
    _, params, _, _ = run
    for suffix in (".pth", ".safetensors"):
        out = tmp_path / f"hat{suffix}"
        assert main(["export", "hat", "-o", str(out), "--params", str(params)]) == 0
        desc = spandrel.ModelLoader().load_from_file(str(out))
        assert desc.architecture.id == "HAT" and desc.scale == 4
        ours = load_model(out, None, "cpu", routing="argmax")
        x = torch.rand(1, 3, 13, 21, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            theirs = desc.model.eval()(x)
            assert (ours(x) - theirs).abs().max().item() < 1e-5


# --- conventions ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("src,suffix,want", [("0801x4.png", None, "0801x4.png"), ("0801.png", None, "0801x4.png"),
                                             ("photo.jpg", "_sr", "photo_sr.png"), ("0801X4.png", "", "0801.png"),
                                             ("x4.png", None, "x4x4.png"), ("0801x2.png", None, "0801x2x4.png")])
def test_output_names_do_not_double_the_scale_tag(src, suffix, want):
    from pathlib import Path

    assert up.output_name(Path(src), 4, suffix) == want


def test_image_id_gives_the_infer_stage_seed_number():
    from pathlib import Path

    assert up.image_id(Path("0801x4.png"), 4) == 801 and up.image_id(Path("cat.png"), 4) == 0


class _Nearest(torch.nn.Module):
    """A stand-in x2 model: nearest-neighbour upscaling (exact, any size)."""
    upscale = 2
    window_size = 4

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest") + 0 * self.w


def test_alpha_is_kept_and_upscaled_bicubically(tmp_path):
    from smt.data.images import uint8_to_unit
    from smt.data.imresize import imresize, to_uint8

    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (6, 7, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    s = up.upscale_files([tmp_path / "a.png"], tmp_path / "out", _Nearest(), progress=False)
    assert not s.skipped
    out = np.array(Image.open(tmp_path / "out" / "ax2.png"))
    assert out.shape == (12, 14, 4)
    assert np.array_equal(out[..., :3], rgba[..., :3].repeat(2, 0).repeat(2, 1))  # colour through the model
    assert np.array_equal(out[..., 3], to_uint8(imresize(uint8_to_unit(rgba[..., 3]), 2)))
    # fully opaque alpha: written as RGB
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "b.png")
    up.upscale_files([tmp_path / "b.png"], tmp_path / "out", _Nearest(), progress=False)
    assert np.array(Image.open(tmp_path / "out" / "bx2.png")).shape == (12, 14, 3)


@pytest.mark.parametrize("argv,words", [
    (["--tile", "-5"], "--tile: must be"), (["--tile", "8", "--tile-overlap", "8"], "--tile-overlap: must be smaller"),
    (["--tile-overlap", "-1"], "--tile-overlap: must be >= 0"), (["-o", "/nonexistent/dir/out"], "--output: the parent"),
])
def test_invalid_flags_are_refused_naming_the_flag(tmp_path, capsys, argv, words):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "in.png")
    args = ["upscale", "-i", str(tmp_path / "in.png"), "--checkpoint", str(tmp_path / "none.pth")]
    if "-o" not in argv:
        args += ["-o", str(tmp_path / "out")]
    assert main(args + argv) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_checkpoint_without_model_is_detected_and_failures_are_one_line_each(tmp_path, capsys):
    torch.manual_seed(0)
    net = build_model("hat_tiny").eval()
    torch.save({"params_ema": net.state_dict()}, tmp_path / "HAT_tiny.pth")
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.full((9, 11, 3), 90, np.uint8)).save(src / "ok.png")
    (src / "bad.png").write_bytes(b"not an image")
    rc = main(["upscale", "-i", str(src), "-o", str(tmp_path / "out"), "--checkpoint", str(tmp_path / "HAT_tiny.pth"),
               "--device", "cpu", "--suffix", "_hat"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("upscale:")]
    assert rc == 1 and len(err) == 1 and err[0].startswith("failed: ") and "bad.png: not a readable image" in err[0]
    assert np.array(Image.open(tmp_path / "out" / "ok_hat.png")).shape == (36, 44, 3)
    # an unrecognised file says what was expected
    torch.save({"params": {"conv.weight": torch.zeros(1)}}, tmp_path / "other.pth")
    rc = main(["upscale", "-i", str(src / "ok.png"), "-o", str(tmp_path / "o2"), "--checkpoint",
               str(tmp_path / "other.pth")])
    assert rc == 2 and "expected a HAT or MambaIRv2" in capsys.readouterr().err


def test_tile_auto_from_memory_and_tiled_equals_whole_for_a_pointwise_model():
    net = build_model("hat_tiny")
    whole = up.auto_tile([net], 100, 80, batch=4, free_bytes=2**40)
    assert whole == 0
    tile = up.auto_tile([net], 1000, 800, batch=4, free_bytes=64 * 2**20)
    per_px = up._bytes_per_lr_pixel(net)
    assert tile % 8 == 0 and 8 <= tile < 1000
    assert 4 * tile * tile * per_px <= 0.5 * 64 * 2**20 < 4 * (tile + 8) ** 2 * per_px


def test_out_of_memory_retries_with_half_the_tile(tmp_path):
    tried = []

    def run(tile):
        tried.append(tile)
        if tile == 0 or tile > 40:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (stand-in)")
        return tile

    logs = []
    assert up.run_with_oom_retry(run, 0, 200, 160, overlap=8, min_tile=16, log=logs.append) == 25
    assert tried == [0, 100, 50, 25] and len(logs) == 3 and "retrying with tile 50" in logs[1]
    with pytest.raises(torch.cuda.OutOfMemoryError):
        up.run_with_oom_retry(lambda t: run(10**6), 64, 200, 160, overlap=8, min_tile=16, log=logs.append)


def test_per_tile_progress_counts_every_tile_of_the_method(run):
    from smt.infer.tiling import tile_progress

    data, params, results, _ = run
    method = up.method_from_run(params, results)
    rgb = read_as_given(_valid_lr(data)[0]).rgb
    h, w = rgb.shape[:2]
    seen = []
    with tile_progress(seen.append):
        method.run(up.image_to_tensor(rgb), 0)
    assert sum(seen) == method.tiles(h, w) and len(seen) > 2
    single = up.SingleModel(_Nearest(), tile=8, overlap=1)
    seen.clear()
    with tile_progress(seen.append):
        single.run(torch.rand(1, 3, 20, 20))
    assert single.tiles(20, 20) == sum(seen) == 9  # starts 0, 7, 12 on each axis
