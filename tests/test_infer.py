"""Inference: tiling, self-ensemble, multi-window, fusion, byte-identical reruns, sharding, the upscale CLI."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from smt.infer.ensemble import TRANSFORMS, apply_transform, invert_transform, multi_window, self_ensemble
from smt.infer.fusion import fit_fusion_weight, fuse
from smt.infer.tiling import tile_starts, tiled_forward


def _nearest(x):  # a pointwise "model": every output pixel depends on one input pixel
    return x.repeat_interleave(4, -1).repeat_interleave(4, -2)


class _Conv(torch.nn.Module):
    """A small x4 model with a 7x7 receptive field (zero padding, as real models)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 3 * 16, 5, padding=2)

    def forward(self, x):
        return F.pixel_shuffle(self.c2(torch.relu(self.c1(x))), 4) + _nearest(x)


def test_tile_starts_cover_and_stay_inside():
    for length in (1, 7, 32, 33, 100):
        for tile, overlap in ((8, 2), (16, 4), (32, 0), (200, 8)):
            starts = tile_starts(length, tile, overlap)
            covered = set()
            for s in starts:
                covered |= set(range(s, min(s + tile, length)))
                assert 0 <= s and (s + tile <= length or length <= tile)
            assert covered == set(range(length))
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(10, 4, 4)


def test_one_tile_equals_whole_and_pointwise_model_is_exact_for_any_tiling():
    x = torch.rand(1, 3, 21, 30)
    model = _Conv()
    with torch.no_grad():
        whole = model(x)
        assert torch.equal(tiled_forward(model, x, 4, 64, 8), whole)
        assert torch.equal(tiled_forward(model, x, 4, 0, 8), whole)
    torch.testing.assert_close(tiled_forward(_nearest, x, 4, 8, 3, batch=3), _nearest(x), rtol=0, atol=1e-6)


def test_blended_seams_are_invisible():
    """Against whole-image inference, blended tiles err far less at the seams than tiles pasted side by side."""
    x = torch.rand(1, 3, 40, 40)
    model = _Conv()
    with torch.no_grad():
        whole = model(x)
        blended = tiled_forward(model, x, 4, 16, 6)
        pasted = tiled_forward(model, x, 4, 16, 0)  # overlap 0: plain pasting
    seam_rows = slice(4 * 16 - 8, 4 * 16 + 8)  # around the first seam (HR pixels)
    err_blend = (blended - whole)[..., seam_rows, :].abs().mean().item()
    err_paste = (pasted - whole)[..., seam_rows, :].abs().mean().item()
    assert err_blend < 0.25 * err_paste
    # no step across the seam: the jump between neighbouring rows there is like that between any two rows at
    # an LR pixel boundary (rows 3 mod 4; the model's output has that period)
    jumps = (blended[..., 1:, :] - blended[..., :-1, :]).abs().mean(dim=(0, 1, 3))
    assert jumps[4 * 16 - 1].item() < 1.5 * jumps[3::4].median().item()


def test_transforms_invert_exactly_and_self_ensemble_of_equivariant_model():
    x = torch.rand(1, 3, 5, 7)
    assert len(set(TRANSFORMS)) == 8
    for tf in TRANSFORMS:
        assert torch.equal(invert_transform(apply_transform(x, tf), tf), x)
    # a model commuting with flips/transposes gives its own output back
    assert torch.allclose(self_ensemble(_nearest, x), _nearest(x), atol=1e-7)
    model = _Conv()
    with torch.no_grad():
        torch.testing.assert_close(self_ensemble(model, x, batch=True), self_ensemble(model, x), rtol=1e-6, atol=1e-6)


def test_multi_window_dedups_identical_tilings():
    x = torch.rand(1, 3, 30, 30)
    model = _Conv()
    calls = []

    def counting(t):
        calls.append(t.shape)
        return model(t)

    with torch.no_grad():
        y, distinct = multi_window(counting, x, 4, [32, 48, 64, 16], [1, 1, 1.2, 0.8], overlap=4)
        whole, tiled = model(x), tiled_forward(model, x, 4, 16, 4)
    assert distinct == 2  # 32, 48 and 64 all cover the 30x30 image
    torch.testing.assert_close(y, (3.2 * whole + 0.8 * tiled) / 4.0)
    with pytest.raises(ValueError, match="one weight per tile size"):
        multi_window(model, x, 4, [8, 16], [1.0], overlap=2)


def test_fusion_recovers_known_optimum():
    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(3):
        hr = rng.integers(40, 216, (64, 64, 3)).astype(np.uint8)
        a = hr + rng.normal(0, 6.0, hr.shape)  # noise variances 36 and 144: best w = 144 / 180 = 0.8
        b = hr + rng.normal(0, 12.0, hr.shape)
        pairs.append((a, b, hr))
    fit = fit_fusion_weight(pairs, grid=101)
    assert fit.weight == pytest.approx(0.8, abs=0.04)
    assert fit.least_squares_weight == pytest.approx(0.8, abs=0.03)
    assert fit.psnr_y == max(fit.curve)
    assert fuse(np.array([[[254.6, 0.4, 127.5]]]), np.zeros((1, 1, 3)), 1.0).tolist() == [[[255, 0, 128]]]


@pytest.fixture(scope="module")
def trained_setup(tmp_path_factory):
    """A data root and 'trained' (randomly initialised) exported models for both architectures."""
    from smt.config import DataConfig, InferConfig, TrainConfig, parse_section
    from smt.data.dataset_builder import build_dataset
    from smt.models import build_model
    from smt.train.checkpoint import save_safetensors
    import json

    base = tmp_path_factory.mktemp("infer")
    data = DataConfig(root=str(base / "d"), max_side=40, train_images=("camera",), valid_images=("astronaut", "coins"),
                      test_images=("chelsea",))
    build_dataset(data)
    train = parse_section(TrainConfig, {
        "models": {"hat": {"preset": "hat_tiny"}, "mambairv2": {"preset": "mambairv2_tiny"}},
        "stages": {"s1": {"patch_size": 8, "batch_size": 2, "loss": "l1", "lr": 1e-3, "iters": 1}},
        "stage_order": ["s1"], "out_root": str(base / "models")}, "train")
    for name, preset in (("hat", "hat_tiny"), ("mambairv2", "mambairv2_tiny")):
        torch.manual_seed(1)
        net = build_model(preset, aux_scales=(2, 3))
        arch = "hat" if name == "hat" else "mambairv2"
        from smt.models.presets import preset as get_preset

        kwargs = {**get_preset(preset)[1], "aux_scales": [2, 3]}
        save_safetensors(net.state_dict(), base / "models" / name / "r1_s1" / "model.safetensors",
                         {"arch": arch, "model_args": json.dumps(kwargs)})
    infer = parse_section(InferConfig, {"window_tiles": [6, 8, 16], "window_weights": [1.0, 1.0, 1.2],
                                        "tile_overlap": 2, "device": "cpu"}, "infer")
    return data, train, infer, base


@pytest.mark.parametrize("routing", ["argmax", "gumbel"])
def test_inference_stage_is_byte_identical_on_rerun(trained_setup, routing):
    import dataclasses

    from smt.infer.runner import run_inference

    data, train, infer, base = trained_setup
    infer = dataclasses.replace(infer, routing=routing)
    outs = []
    for run in ("a", "b"):
        res = run_inference(infer, train, data, base / f"results_{routing}_{run}", log=lambda m: None)
        files = sorted((base / f"results_{routing}_{run}").rglob("*.png"))
        outs.append({f.relative_to(base / f"results_{routing}_{run}"): f.read_bytes() for f in files})
    assert outs[0] == outs[1]
    names = {p.parts[1] for p in outs[0]}
    assert names == {"hat", "hat+SE", "mambairv2", "mambairv2+SE", "mambairv2+SE+MW", "fused"}
    assert {p.parts[0] for p in outs[0]} == {"valid", "test"}
    assert 0.0 <= res["fusion"]["weight_a"] <= 1.0 and set(res["timings"]) >= names


def test_inference_sharded_over_two_processes_equals_one(trained_setup, tmp_path):
    """torchrun with 2 CPU processes (gloo): each takes every other image, rank 0 fuses; same bytes as 1 process."""
    import dataclasses
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from smt.config import as_dict
    from smt.infer.runner import run_inference

    data, train, infer, base = trained_setup
    single = run_inference(infer, train, data, tmp_path / "one", log=lambda m: None)
    params = {"data": as_dict(data), "train": as_dict(train),
              "infer": {**as_dict(dataclasses.replace(infer, nproc=2))}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(json_ready(params)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "smt", "infer", "--params", str(tmp_path / "params.yaml"),
                          "--out", str(tmp_path / "two"), "--timings", str(tmp_path / "timings_two.json")],
                         cwd=Path(__file__).parents[1], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    files = {p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.png")}
    assert files == {p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*.png")}
    assert len(files) == 3 * 6  # 3 images x 6 methods
    for f in files:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f
    two = json.loads((tmp_path / "two" / "fusion.json").read_text())
    assert two["weight_a"] == single["fusion"]["weight_a"] and two["curves"] == single["fusion"]["curves"]
    # wall-clock stays out of results/ (a DVC output): it goes to --timings, outside it
    timings = json.loads((tmp_path / "timings_two.json").read_text())
    assert list(timings) == list(single["timings"]) and not (tmp_path / "two" / ".fusion_inputs").exists()
    assert json.loads((tmp_path / "two" / "methods.json").read_text())["methods"] == single["methods"]
    assert not (tmp_path / "two" / "timings.json").exists()


def json_ready(obj):
    """Tuples -> lists, recursively (yaml.safe_dump writes lists only)."""
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj


def test_upscale_cli(trained_setup, tmp_path, capsys):
    from PIL import Image

    from smt.__main__ import main

    data, train, infer, base = trained_setup
    ckpt = base / "models" / "hat" / "r1_s1" / "model.safetensors"
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.full((9, 11), 100, np.uint8)).save(src / "gray.png")
    (src / "broken.png").write_bytes(b"nope")
    rc = main(["upscale", str(src), "--out", str(tmp_path / "out"), "--checkpoint", str(ckpt), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 1 and "broken.png: not a readable image" in err
    assert np.array(Image.open(tmp_path / "out" / "grayx4.png")).shape == (36, 44)  # grey stays grey (issue 34)
    # a second run refuses to overwrite
    rc = main(["upscale", str(src / "gray.png"), "--out", str(tmp_path / "out"), "--checkpoint", str(ckpt)])
    assert rc == 1 and "exists (use --overwrite)" in capsys.readouterr().err
    # a checkpoint for another architecture: a named error, not a traceback
    rc = main(["upscale", str(src / "gray.png"), "--out", str(tmp_path / "o2"), "--checkpoint", str(ckpt),
               "--model", "mambairv2_tiny"])
    assert rc == 2 and "does not fit MambaIRv2" in capsys.readouterr().err
    rc = main(["upscale", str(tmp_path / "missing"), "--out", str(tmp_path / "o3"), "--checkpoint", str(ckpt)])
    assert rc == 2 and "no such file or folder" in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["bf16", "bf16-weights"])
def test_bf16_inference_stays_within_a_hundredth_of_a_db_and_leaves_the_model_fp32(precision):
    from smt.data.demo import load_demo_image
    from smt.data.imresize import bicubic_degrade
    from smt.infer.precision import with_precision
    from smt.metrics import NTIRE2025, evaluate_pair
    from smt.models import build_model

    torch.manual_seed(0)
    net = build_model("mambairv2_tiny", routing="argmax").eval()
    hr = load_demo_image("astronaut")[100:164, 180:244]
    x = torch.from_numpy(bicubic_degrade(hr, 4)).permute(2, 0, 1)[None].float() / 255
    out = {}
    for p in ("fp32", precision):
        y = tiled_forward(with_precision(net, p), x, 4, 0, 0)
        assert y.dtype == torch.float32
        out[p] = (y[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    assert all(t.dtype == torch.float32 for t in net.parameters())  # a bf16 copy, if any, is separate
    d = abs(evaluate_pair(out[precision], hr, NTIRE2025)["psnr_y"] - evaluate_pair(out["fp32"], hr, NTIRE2025)["psnr_y"])
    assert 0 < d < 0.01  # bf16 really ran (outputs differ) and stays within 0.01 dB
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        with_precision(net, "fp16")


def test_timing_resets_peak_memory_and_synchronises_around_each_call():
    """timings.json on GPU: each method's peak is its own call's (counter reset first) and the clock stops only
    after the device finished (synchronised before start and before stop); on CPU none of these calls happen."""
    from smt.infer.runner import measure

    class FakeCuda:
        def __init__(self):
            self.calls = []

        def synchronize(self, device):
            self.calls.append("sync")

        def reset_peak_memory_stats(self, device):
            self.calls.append("reset")

        def max_memory_allocated(self, device):
            self.calls.append("peak")
            return 3 * 2**20

    fake = FakeCuda()
    y, seconds, peak = measure(torch.device("cuda", 0), lambda: fake.calls.append("run") or torch.ones(1), cuda=fake)
    assert fake.calls == ["sync", "reset", "run", "sync", "peak"] and peak == 3.0 and seconds >= 0 and y.item() == 1
    cpu = FakeCuda()
    _, _, peak = measure(torch.device("cpu"), lambda: torch.ones(1), cuda=cpu)
    assert cpu.calls == [] and peak > 0
