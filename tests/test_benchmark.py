"""``python -m smt benchmark`` on small synthetic sets: LR made as the standard sets were, scores equal to
``smt evaluate``'s, gray images, fusion, the published-number lookup, each bad input's message, the JSON format,
downloads from a 127.0.0.1 server (pin, resume, offline reuse, nothing half-written in ROOT) and the stage."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from smt.benchmark import (PUBLISHED, benchmark_sets, ensure_set, format_table, literature_protocol, prepare_image,
                           preset_of, published_psnr, results_json, run_cli_methods)
from smt.data.download import DownloadError
from smt.data.images import ImageError, float255_to_uint8, uint8_to_unit, write_png
from smt.data.imresize import imresize, to_uint8
from smt.data.sources import load_sources
from smt.evaluate import bicubic_upscale, evaluate_folder
from smt.metrics import BASICSR, NTIRE2025
from smt.models import CheckpointError, build_model
from test_download import _Server, _targz  # the download tests' local HTTP server (ranges, cuts), archives

from conftest import REPO


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth colour image (SR scores on pure noise say nothing)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(x / 5.0 + c) + np.cos(y / 7.0 - c) for c in range(3)], axis=-1)
    return np.clip(127 + 50 * base + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)


def _set(root, name: str, images: dict[str, np.ndarray]):
    hr = root / name / "HR"
    hr.mkdir(parents=True)
    for key, img in images.items():
        Image.fromarray(img).save(hr / f"{key}.png")
    return hr


def _bicubic(scale: int = 4):
    return lambda lr: bicubic_upscale(lr, scale).astype(np.float64)


# ------------------------------------------------------------------------------------------------- LR and scores


def test_lr_is_imresize_of_the_hr_cropped_to_a_multiple_of_the_scale(tmp_path):
    full = _photo(50, 47)
    _set(tmp_path, "Set5", {"a": full})
    seen = []
    run = benchmark_sets({"probe": lambda lr: seen.append(lr) or _bicubic()(lr)}, 4, ["Set5"], tmp_path,
                         progress=False)
    cropped = full[:48, :44]
    expected = to_uint8(imresize(uint8_to_unit(cropped), 0.25))
    assert len(seen) == 1 and seen[0].dtype == np.uint8 and np.array_equal(seen[0], expected)
    assert run.crops["Set5"] == ["a 47x50 -> 44x48"]
    assert "HR cropped to a multiple of 4: 1 of 1 images (e.g. a 47x50 -> 44x48)" in format_table(run, "Set5")
    img = prepare_image(tmp_path / "Set5" / "HR" / "a.png", 4)
    assert np.array_equal(img.hr, cropped) and img.original_size == (50, 47)


def test_scores_equal_smt_evaluate_under_both_protocols(tmp_path):
    hr = {"a": _photo(48, 64, 1), "b": _photo(40, 52, 2)}
    _set(tmp_path, "Set14", hr)
    rng = np.random.default_rng(3)
    sr = {k: np.clip(v.astype(int) + rng.integers(-9, 10, v.shape), 0, 255).astype(np.uint8) for k, v in hr.items()}
    outputs = iter([sr["a"], sr["b"]])  # images are read in sorted order
    run = benchmark_sets({"fixed": lambda lr: next(outputs).astype(np.float64)}, 4, ["Set14"], tmp_path,
                         progress=False)
    for k, img in sr.items():
        write_png(tmp_path / "sr" / f"{k}x4.png", img)
    ours = run.per_image.set_index("id")
    lit = evaluate_folder(tmp_path / "sr", tmp_path / "Set14" / "HR", BASICSR).set_index("id")
    challenge = evaluate_folder(tmp_path / "sr", tmp_path / "Set14" / "HR", NTIRE2025).set_index("id")
    for k in hr:
        assert ours.loc[k, "psnr_y"] == pytest.approx(lit.loc[k, "psnr_y"], abs=1e-12)
        assert ours.loc[k, "ssim_y"] == pytest.approx(lit.loc[k, "ssim_y"], abs=1e-12)
        assert ours.loc[k, "challenge_psnr_y"] == pytest.approx(challenge.loc[k, "psnr_y"], abs=1e-12)
        assert ours.loc[k, "challenge_ssim_y"] == pytest.approx(challenge.loc[k, "ssim_y"], abs=1e-12)
    res = run.results["Set14"]["fixed"]
    assert res.n == 2 and res.psnr_y == pytest.approx(lit["psnr_y"].mean(), abs=1e-12)


def test_literature_shave_is_the_scale_and_differs_from_the_challenge_at_x2(tmp_path):
    assert literature_protocol(2).crop_border == 2 and literature_protocol(4).crop_border == 4
    hr = _photo(44, 46, 4)  # 46 is a multiple of 2, not of 4: the challenge protocol modcrops it
    _set(tmp_path, "Set5", {"a": hr})
    noisy = np.clip(hr.astype(int) + np.random.default_rng(5).integers(-20, 21, hr.shape), 0, 255).astype(np.uint8)
    run = benchmark_sets({"fixed": lambda lr: noisy.astype(np.float64)}, 2, ["Set5"], tmp_path, progress=False)
    r = run.results["Set5"]["fixed"]
    assert r.psnr_y != r.challenge_psnr_y and not any("same numbers" in n for n in run.notes)


def test_gray_image_is_replicated_for_the_model_and_reported(tmp_path):
    gray = _photo(32, 32, 6)[..., 0]
    hr = tmp_path / "Set14" / "HR"
    hr.mkdir(parents=True)
    Image.fromarray(gray, mode="L").save(hr / "bridge.png")
    Image.fromarray(_photo(32, 32, 7)).save(hr / "comic.png")
    seen = {}
    run = benchmark_sets({"probe": lambda lr: seen.setdefault(len(seen), lr) is not None and _bicubic()(lr)},
                         4, ["Set14"], tmp_path, progress=False)
    lr_gray = seen[0]
    assert lr_gray.shape == (8, 8, 3) and (lr_gray[..., 0] == lr_gray[..., 1]).all() and \
        (lr_gray[..., 1] == lr_gray[..., 2]).all()
    assert run.results["Set14"]["probe"].gray == ["bridge [1-channel file]"]
    assert run.per_image.set_index("id").loc["bridge", "gray"] and \
        "1 gray (bridge [1-channel file])" in format_table(run, "Set14")
    # gray content stored as RGB is gray too, but not a one-channel file
    Image.fromarray(np.repeat(gray[..., None], 3, axis=2)).save(hr / "man.png")
    run = benchmark_sets({"b": _bicubic()}, 4, ["Set14"], tmp_path, progress=False)
    assert run.results["Set14"]["b"].gray == ["bridge [1-channel file]", "man"]
    per = run.per_image.set_index("id")
    assert per.loc["man", "psnr_y"] == pytest.approx(per.loc["bridge", "psnr_y"], abs=1e-12)  # same pixels, same Y


def test_fused_method_mixes_the_float_outputs_then_rounds(tmp_path):
    hr = _photo(32, 36, 8)
    _set(tmp_path, "Set5", {"a": hr})
    a, b = hr.astype(np.float64) + 7.3, hr.astype(np.float64) - 4.1
    run = benchmark_sets({"A": lambda lr: a, "B": lambda lr: b}, 4, ["Set5"], tmp_path,
                         fused={"fused": ("A", "B", 0.25)}, progress=False)
    expected = float255_to_uint8(0.25 * a + 0.75 * b)
    from smt.benchmark import score_y

    psnr, ssim = score_y(expected, hr, literature_protocol(4))
    got = run.results["Set5"]["fused"]
    assert got.psnr_y == pytest.approx(psnr, abs=1e-12) and got.ssim_y == pytest.approx(ssim, abs=1e-12)


# --------------------------------------------------------------------------------------------- published numbers


def test_published_numbers_are_looked_up_by_architecture_and_scale():
    assert published_psnr("hat_l", "Set5", 4) == 33.30 and published_psnr("hat_l", "Urban100", 4) == 28.60
    assert published_psnr("mambairv2_l", "Manga109", 4) == 32.66 and published_psnr("mambairv2_l", "B100", 4) == 28.01
    assert published_psnr("hat_l", "DIV2K_valid", 4) is None  # not in the paper's table
    assert published_psnr("hat_l", "Set5", 2) is None and published_psnr("hat_tiny", "Set5", 4) is None
    assert published_psnr(None, "Set5", 4) is None
    assert [PUBLISHED["hat_l"]["psnr_y"][s] for s in ("Set5", "Set14", "B100", "Urban100", "Manga109")] == \
        [33.30, 29.47, 28.09, 28.60, 33.09]


def test_preset_is_read_from_our_checkpoint_metadata(tmp_path):
    from smt.models.presets import preset
    from smt.train.checkpoint import save_safetensors

    arch, kwargs = preset("hat_l")
    path = tmp_path / "model.safetensors"
    meta = {"arch": arch, "model_args": json.dumps({**kwargs, "aux_scales": [2, 3]})}
    save_safetensors({"w": torch.zeros(1)}, path, meta)
    assert preset_of(path, None) == "hat_l"
    assert preset_of(path, "mambairv2_l") == "mambairv2_l"  # --model wins
    assert preset_of(tmp_path / "official.pth", None) is None  # no metadata: unknown


def test_table_puts_the_published_number_beside_ours(tmp_path):
    _set(tmp_path, "Set5", {"a": _photo(40, 40, 9)})
    run = benchmark_sets({"bicubic": _bicubic(), "hat_l": _bicubic()}, 4, ["Set5"], tmp_path,
                         published={"hat_l": "hat_l"}, progress=False)
    r = run.results["Set5"]
    assert r["hat_l"].published_psnr_y == 33.30 and r["bicubic"].published_psnr_y == 28.42
    row = next(line for line in format_table(run, "Set5").splitlines() if line.startswith("hat_l"))
    assert "33.30" in row and f"{r['hat_l'].psnr_y - 33.30:+.2f}" in row


# ------------------------------------------------------------------------------------------------------ bad input


def test_folder_without_images_is_named(tmp_path):
    (tmp_path / "Set5" / "HR").mkdir(parents=True)
    (tmp_path / "Set5" / "HR" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"Set5/HR: no images"):
        benchmark_sets({"b": _bicubic()}, 4, ["Set5"], tmp_path, progress=False)


def test_unknown_set_is_named_with_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown benchmark set 'Set6' \(known: Set5, Set14, B100, Urban100"):
        benchmark_sets({"b": _bicubic()}, 4, ["Set6"], tmp_path, progress=False)


def test_hr_smaller_than_the_scale_is_named(tmp_path):
    _set(tmp_path, "Set5", {"tiny": _photo(3, 9)})
    with pytest.raises(ImageError, match=r"tiny\.png: 9x3 is smaller than the scale factor 4"):
        benchmark_sets({"b": _bicubic()}, 4, ["Set5"], tmp_path, progress=False)


def test_image_too_small_to_score_is_named(tmp_path):
    _set(tmp_path, "Set5", {"small": _photo(16, 16)})  # 8x8 after the 4-pixel shave: no 11x11 SSIM window
    with pytest.raises(ValueError, match=r"small\.png: cannot be scored"):
        benchmark_sets({"b": _bicubic()}, 4, ["Set5"], tmp_path, progress=False)


def test_checkpoint_that_does_not_match_is_named(tmp_path):
    path = tmp_path / "mamba.pth"
    torch.save({"params": build_model("mambairv2_tiny").state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"mamba\.pth: checkpoint does not fit HAT"):
        run_cli_methods(str(path), "hat_tiny", None, "cpu")
    with pytest.raises(ValueError, match=r"--model: unknown preset 'hat_xl'"):
        run_cli_methods(str(path), "hat_xl", None, "cpu")


def test_set_folder_without_hr_is_not_overwritten_by_a_download(tmp_path):
    (tmp_path / "Set5" / "LR").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"Set5/HR: not found \(.*Set5 exists without it\)"):
        ensure_set("Set5", tmp_path, log=lambda m: None)
    assert sorted(p.name for p in (tmp_path / "Set5").iterdir()) == ["LR"]


def test_set_without_a_download_says_where_to_put_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Manga109/HR: not found.*put its HR images there"):
        ensure_set("Manga109", tmp_path, log=lambda m: None)


def test_cli_reports_bad_input_with_exit_code_2(tmp_path, capsys):
    from smt.__main__ import main

    path = tmp_path / "hat.pth"
    torch.save({"params_ema": build_model("hat_tiny").state_dict()}, path)
    assert main(["benchmark", "--checkpoint", str(path), "--model", "hat_tiny", "--sets", "Set5,Set7",
                 "--root", str(tmp_path), "--device", "cpu"]) == 2
    assert "unknown set 'Set7'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------ CLI, JSON


def test_cli_writes_one_table_per_set_and_the_json(tmp_path, capsys):
    from smt.__main__ import main

    torch.manual_seed(0)
    path = tmp_path / "hat.pth"
    torch.save({"params_ema": build_model("hat_tiny").state_dict()}, path)
    _set(tmp_path / "root", "Set5", {"a": _photo(32, 32, 1), "b": _photo(36, 40, 2)})
    _set(tmp_path / "root", "Set14", {"c": _photo(40, 36, 3)})
    out = tmp_path / "scores.json"
    assert main(["benchmark", "--checkpoint", str(path), "--model", "hat_tiny", "--sets", "Set5,Set14",
                 "--root", str(tmp_path / "root"), "--device", "cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Set5 x4: 2 images" in printed and "Set14 x4: 1 images" in printed
    scores = json.loads(out.read_text())
    assert set(scores) == {"Set5", "Set14"} and all(set(v) == {"psnr_y", "ssim_y", "n"} for v in scores.values())
    assert scores["Set5"]["n"] == 2 and scores["Set14"]["n"] == 1
    assert 0 < scores["Set5"]["ssim_y"] <= 1 and np.isfinite(scores["Set5"]["psnr_y"])


def test_results_json_is_the_literature_mean_per_set(tmp_path):
    _set(tmp_path, "Set5", {"a": _photo(40, 40, 1), "b": _photo(44, 40, 2)})
    run = benchmark_sets({"bicubic": _bicubic()}, 4, ["Set5"], tmp_path, progress=False)
    got = results_json(run, "bicubic")
    df = run.per_image
    assert got == {"Set5": {"psnr_y": pytest.approx(df["psnr_y"].mean()), "ssim_y": pytest.approx(df["ssim_y"].mean()),
                            "n": 2}}


# ------------------------------------------------------------------------------------------------------ downloads


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def served_set(tmp_path, monkeypatch):
    """A two-image 'Set5' archive on 127.0.0.1 and a sources file pointing at it."""
    monkeypatch.setattr("smt.data.download.time.sleep", lambda s: None)  # no back-off pauses between tries
    server = _Server()
    # big enough that a cut transfer is visibly resumed
    images = {"Set5_HR/baby.png": _png(_photo(64, 64, 1)), "Set5_HR/bird.png": _png(_photo(60, 64, 2)),
              "Set5_HR/noise.bin": np.random.default_rng(0).bytes(200_000)}
    server.files["/Set5_HR.tar.gz"] = _targz(images)
    entry = {"description": "test Set5", "license": "TEST LICENCE LINE",
             "archives": [{"url": server.url("/Set5_HR.tar.gz"), "filename": "Set5_HR.tar.gz", "size": None,
                           "sha256": None}], "hr": "*_HR/*", "lr": None, "images": 2}
    (tmp_path / "sources.json").write_text(json.dumps({"Set5": entry}))
    yield server, load_sources(tmp_path / "sources.json")
    server.close()


def test_missing_set_is_downloaded_pinned_and_reused_offline(tmp_path, served_set):
    server, sources = served_set
    root, logs = tmp_path / "root", []
    kw = dict(downloads=tmp_path / "dl", lock=tmp_path / "lock.json")
    hr = ensure_set("Set5", root, sources, log=logs.append, **kw)
    assert sorted(p.name for p in hr.iterdir()) == ["baby.png", "bird.png"]
    assert any("TEST LICENCE LINE" in m for m in logs)
    assert sorted(p.name for p in root.iterdir()) == ["Set5"]  # no staging folder left behind
    pinned = json.loads((tmp_path / "lock.json").read_text())[server.url("/Set5_HR.tar.gz")]
    assert pinned["size"] == len(server.files["/Set5_HR.tar.gz"]) and len(pinned["sha256"]) == 64
    requests = len(server.ranges)
    server.close()  # offline from here on
    run = benchmark_sets({"bicubic": _bicubic()}, 4, ["Set5"], root, sources=sources, progress=False, **kw)
    assert run.results["Set5"]["bicubic"].n == 2 and len(server.ranges) == requests


def test_interrupted_download_resumes_with_a_range_request(tmp_path, served_set):
    server, sources = served_set
    server.flaky.add("/Set5_HR.tar.gz")
    hr = ensure_set("Set5", tmp_path / "root", sources, tmp_path / "dl", tmp_path / "lock.json", log=lambda m: None)
    assert len(list(hr.iterdir())) == 2
    size = len(server.files["/Set5_HR.tar.gz"])
    assert server.ranges[:2] == [("/Set5_HR.tar.gz", None), ("/Set5_HR.tar.gz", f"bytes={size // 2}-")]


def test_failed_download_leaves_nothing_in_root(tmp_path, served_set):
    server, sources = served_set
    server.truncate.add("/Set5_HR.tar.gz")
    server.no_range.add("/Set5_HR.tar.gz")
    root = tmp_path / "root"
    with pytest.raises(DownloadError, match=r"Set5_HR\.tar\.gz.*incomplete"):
        ensure_set("Set5", root, sources, tmp_path / "dl", tmp_path / "lock.json", log=lambda m: None)
    assert not root.exists() or not any(root.iterdir())
    assert (tmp_path / "dl" / "Set5_HR.tar.gz.part").exists()  # kept outside ROOT, for the next try to resume


def test_archive_with_the_wrong_image_count_leaves_nothing_in_root(tmp_path, served_set):
    server, sources = served_set
    entry = json.loads((tmp_path / "sources.json").read_text())
    entry["Set5"]["images"] = 5
    (tmp_path / "sources.json").write_text(json.dumps(entry))
    root = tmp_path / "root"
    with pytest.raises(DownloadError, match=r"Set5: the archives hold 2 HR images matching '\*_HR/\*', expected 5"):
        ensure_set("Set5", root, load_sources(tmp_path / "sources.json"), tmp_path / "dl", tmp_path / "lock.json",
                   log=lambda m: None)
    assert not root.exists() or not any(root.iterdir())


def test_every_benchmark_set_is_a_data_source():
    from smt.benchmark import SETS

    sources = load_sources()
    assert set(SETS) <= set(sources)
    for name in ("Set5", "Set14", "B100", "Urban100"):
        assert sources[name].archives and sources[name].license and sources[name].images
    assert not sources["Manga109"].archives and "manga109.org" in sources["Manga109"].description


# ------------------------------------------------------------------------------------------------------ the stage


def test_benchmark_stage_exists_only_with_a_benchmark_section(tmp_path):
    import yaml

    from smt.pipeline import stage_definitions

    demo = stage_definitions(REPO / "params.yaml")
    assert "benchmark" not in demo
    full = stage_definitions(REPO / "profiles" / "ntire2025.yaml")
    stage = full["benchmark"]
    assert stage.notebook == "notebooks/95_benchmark.ipynb"
    assert {"benchmark.sets", "benchmark.root", "infer.self_ensemble", "train.models"} <= set(stage.params)
    assert "benchmark.downloads" not in stage.params  # where archives are cached changes no result
    assert "results" in stage.deps and any(d.endswith("hat/r5_s3/model.safetensors") for d in stage.deps)
    params = yaml.safe_load((REPO / "profiles" / "ntire2025.yaml").read_text())
    params["benchmark"]["sets"] = ["Set5", "Set55"]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ValueError, match=r"benchmark.sets: unknown set 'Set55'"):
        stage_definitions(tmp_path / "p.yaml")


def test_stage_scores_every_configuration_and_the_fused_method(tmp_path):
    """The stage on the demo params with random tiny models: the infer stage's methods, the fusion of the two
    most complete configurations with the fitted weight, and the metrics file's format."""
    import yaml

    from smt.benchmark import run_benchmark_stage, score_y
    from smt.config import load_section
    from smt.data.images import image_to_tensor, tensor_to_float255
    from smt.infer.runner import METHOD_ORDER, model_outputs
    from smt.train.checkpoint import save_safetensors
    from smt.models import load_model
    from smt.train.engine import exported_weights

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["out_root"] = str(tmp_path / "models")
    params["infer"]["device"] = "cpu"
    params["benchmark"] = {"sets": ["Set5"], "root": str(tmp_path / "bench")}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    train_cfg, infer_cfg = load_section("train", tmp_path / "p.yaml"), load_section("infer", tmp_path / "p.yaml")
    r, s = train_cfg.schedule()[-1]
    torch.manual_seed(0)
    for m, spec in train_cfg.models.items():
        save_safetensors(build_model(spec.preset).state_dict(), tmp_path / "models" / m / train_cfg.run_name(r, s)
                         / "model.safetensors", {})
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "fusion.json").write_text(json.dumps({"model_a": "hat", "model_b": "mambairv2",
                                                                   "weight_a": 0.3}))
    hr = _photo(48, 48, 11)
    _set(tmp_path / "bench", "Set5", {"a": hr})
    run = run_benchmark_stage(tmp_path / "p.yaml", tmp_path / "results", tmp_path / "report",
                              tmp_path / "metrics.json", log=lambda m: None)
    assert list(run.results["Set5"]) == ["bicubic", *METHOD_ORDER(infer_cfg)]
    lr = prepare_image(tmp_path / "bench" / "Set5" / "HR" / "a.png", 4).lr
    bests = []
    for m in ("hat", "mambairv2"):
        net = load_model(exported_weights(train_cfg, m, r, s), train_cfg.models[m].preset, "cpu", routing="argmax")
        bests.append(tensor_to_float255(list(model_outputs(net, image_to_tensor(lr), m, infer_cfg, 4, 0).values())[-1]))
    psnr, ssim = score_y(float255_to_uint8(0.3 * bests[0] + 0.7 * bests[1]), hr, literature_protocol(4))
    assert run.results["Set5"]["fused"].psnr_y == pytest.approx(psnr, abs=1e-9)
    metrics = json.loads((tmp_path / "metrics.json").read_text())["benchmark"]
    assert metrics["fused"]["Set5"] == {"psnr_y": pytest.approx(psnr, abs=1e-9),
                                        "ssim_y": pytest.approx(ssim, abs=1e-9), "n": 1}
    assert (tmp_path / "report" / "per_image.csv").is_file() and "Set5 x4: 1 images" in \
        (tmp_path / "report" / "tables.txt").read_text()
    # the same method exported as a bundle (issue 19) and benchmarked from the command line's code path
    from smt.export import export_bundle

    bundle = export_bundle(train_cfg, infer_cfg, 4, tmp_path / "results" / "fusion.json", tmp_path / "m.safetensors")
    methods, published, label = run_cli_methods(None, None, str(bundle), "cpu")
    from_bundle = benchmark_sets(methods, 4, ["Set5"], tmp_path / "bench", published=published, progress=False)
    assert from_bundle.results["Set5"][label].psnr_y == pytest.approx(psnr, abs=1e-9)


def test_preset_is_detected_from_official_weights(tmp_path):
    """An official-layout ``.pth`` (weights only): the preset comes from the weights' shapes."""
    path = tmp_path / "official.pth"
    torch.save({"params_ema": build_model("hat_tiny").state_dict()}, path)
    assert preset_of(path, None) == "hat_tiny"
    path.write_bytes(b"not a checkpoint")
    assert preset_of(path, None) is None


def test_interrupted_copy_into_root_leaves_nothing_there(tmp_path, served_set, monkeypatch):
    server, sources = served_set
    calls = []

    def copy_then_interrupt(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the set is being copied into ROOT
        return _copyfile(src, dst)

    import shutil

    _copyfile = shutil.copyfile
    monkeypatch.setattr("smt.benchmark.shutil.copyfile", copy_then_interrupt)
    root = tmp_path / "root"
    with pytest.raises(KeyboardInterrupt):
        ensure_set("Set5", root, sources, tmp_path / "dl", tmp_path / "lock.json", log=lambda m: None)
    assert len(calls) == 2 and not any(root.iterdir())  # neither Set5 nor its hidden staging folder
