"""The report's tables and tracked metrics, without a browser: no Python reprs, precision by column, the training
start point in words, the headline metrics' keys and the ablations' metrics files narrow and free of strings."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from smt.config import TrainConfig, parse_section
from smt.report.evaluation import HEADLINE_KEYS, headline_metrics
from smt.report.index import summary_table
from smt.report.tables import column_format, format_value, frame_table, kv_table, start_point


def test_kv_table_renders_values_in_words_never_as_reprs():
    html = kv_table({"subset": "", "milestones": (100, 200), "bf16": False, "nested": {"a": 1.5}, "none": None,
                     "empty": []}, {"subset": "training images"})
    assert "<th>training images</th><td>&ndash;</td>" in html
    assert "<td>100, 200</td>" in html and "<td>no</td>" in html and "<td>none</td>" in html
    assert '<table class="kv"><tr><th>a</th><td>1.5</td></tr></table>' in html  # nested: a table, not a dict
    for repr_mark in ("{", "}", "(", "[", "'", "None", "False"):
        assert repr_mark not in html.replace("&ndash;", ""), repr_mark


def test_columns_are_formatted_to_the_precision_that_means_something():
    assert [column_format(c) for c in ("psnr_y", "ssim_rgb", "gain_psnr_y", "color_shift", "steps")] == [
        ".2f", ".4f", ".2f", ".2f", ".3f"]
    df = pd.DataFrame({"id": ["0101"], "psnr_y": [27.123456], "ssim_y": [0.812345678], "color_shift": [0.16363]})
    html = frame_table(df)
    assert ">27.12<" in html and ">0.8123<" in html and ">0.16<" in html and 'data-v="27.123456"' in html
    long = frame_table(pd.concat([df] * 13), "Per image")
    assert long.startswith("<details><summary>Per image (13 rows; click to open)</summary>")
    assert format_value(float("nan")) == "&ndash;" and format_value("<b>") == "&lt;b&gt;"


def test_summary_table_shows_db_to_2_decimals_ssim_to_4_and_the_gain():
    summary = {"bicubic": {"psnr_y": 26.2706, "ssim_y": 0.76708, "psnr_rgb": 24.863, "ssim_rgb": 0.73689,
                           "color_shift": 0.0272, "color_shift_max": 0.0638},
               "fused": {"psnr_y": 27.66754, "ssim_y": 0.805534, "psnr_rgb": 26.1569, "ssim_rgb": 0.77333,
                         "color_shift": 0.1636, "color_shift_max": 0.2427}}
    html = summary_table(summary, sortable=True)
    assert "<td>fused</td><td>27.67</td><td>+1.40</td><td>0.8055</td><td>26.16</td><td>0.7733</td>" in html
    assert html.startswith("<table class=sortable>")


def test_training_start_point_is_said_in_words():
    cfg = parse_section(TrainConfig, {
        "models": {"hat": {"preset": "hat_tiny", "pretrained": "weights/HAT-L.pth"}, "m": {"preset": "mambairv2_tiny"}},
        "stages": {s: {"patch_size": 8, "batch_size": 2, "loss": "l1", "lr": 1e-3, "iters": 2} for s in ("s1", "s2")},
        "stage_order": ["s1", "s2"], "rounds": 2, "out_root": "models"}, "train")
    assert start_point(cfg, "hat", 1, "s1") == "the pretrained checkpoint weights/HAT-L.pth"
    assert start_point(cfg, "m", 1, "s1") == "scratch (random initialisation)"
    assert start_point(cfg, "m", 1, "s2") == "the final weights of round 1, stage s1 (models/m/r1_s1)"
    assert start_point(cfg, "m", 2, "s1") == "the final weights of round 1, stage s2 (models/m/r1_s2)"


def _summary():
    row = lambda v: {"psnr_y": v, "ssim_y": v / 40, "psnr_rgb": v - 1, "ssim_rgb": v / 41,  # noqa: E731
                     "color_shift": 0.1, "color_shift_max": 0.2}
    methods = {"bicubic": 26.0, "hat": 27.0, "hat+SE": 27.1, "mambairv2": 27.2, "fused": 27.5}
    return {"protocol": "NTIRE2025", "num_images": {"valid": 4, "test": 2},
            "valid": {m: row(v) for m, v in methods.items()}, "test": {m: row(v + 4) for m, v in methods.items()},
            "fusion_weight": 0.25, "final_method": "fused", "below_bicubic": {"valid": []}, "generalisation": "..."}


def test_headline_metrics_hold_numbers_only_in_shared_keys():
    rows = headline_metrics(_summary(), ["hat", "mambairv2"])
    assert list(rows) == ["bicubic", "hat", "mambairv2", "final"]
    assert rows["final"] == {"valid": {"psnr_y": 27.5, "ssim_y": 27.5 / 40, "color_shift": 0.1},
                             "test": {"psnr_y": 31.5, "ssim_y": 31.5 / 40, "color_shift": 0.1}, "fusion_weight": 0.25}
    assert rows["hat"]["valid"] == {"psnr_y": 27.0, "ssim_y": 27.0 / 40, "color_shift": 0.1}
    flat = lambda d, p="": [k for key, v in d.items() for k in (flat(v, f"{p}{key}.") if isinstance(v, dict)  # noqa
                                                                 else [f"{p}{key}"])]
    columns = {k for r in rows.values() for k in flat(r)}
    assert columns == {f"{s}.{k}" for s in ("valid", "test") for k in HEADLINE_KEYS} | {"fusion_weight"}
    assert all(isinstance(v, float) for r in rows.values() for v in pd.json_normalize(r).iloc[0])


def test_ablation_metrics_are_a_few_numbers_and_the_tables_go_beside_the_page(tmp_path):
    from smt.ablations.report import ensemble_report, fusion_report, seed_ablation_report

    runs = pd.DataFrame({"variant": ["a", "a", "b", "b"], "seed": [0, 1, 0, 1], "psnr_y": [27.0, 27.2, 26.5, 26.7],
                         "bicubic_psnr_y": [26.0] * 4})
    seed_ablation_report(runs, "a", "b", "a helps", tmp_path, tmp_path / "m1.json")
    m1 = json.loads((tmp_path / "m1.json").read_text())
    assert m1 == {"valid": {"psnr_y": pytest.approx(27.1)}, "diff_psnr_y": pytest.approx(0.5),
                  "stderr": pytest.approx(m1["stderr"])} and m1["stderr"] > 0
    assert set(json.loads((tmp_path / "summary.json").read_text())["variants"]) == {"a", "b"}
    configs = pd.DataFrame({"config": ["m", "m+SE", "fused"], "work": [1.0, 8.0, 16.0], "psnr_y": [27.0, 27.3, 27.31]})
    ensemble_report(configs, tmp_path, tmp_path / "m3.json")
    assert json.loads((tmp_path / "m3.json").read_text()) == {"valid": {"psnr_y": 27.31}, "work": 16.0}
    curves = pd.DataFrame([{"split": s, "id": i, "weight": w, "psnr_y": 27 - (w - 0.3) ** 2 + (s == "test")}
                           for s in ("valid", "test") for i in ("1", "2") for w in (0.0, 0.25, 0.5, 0.75, 1.0)])
    fusion_report(curves, 0.25, tmp_path, tmp_path / "m4.json")
    m4 = json.loads((tmp_path / "m4.json").read_text())
    assert set(m4) == {"valid", "test", "fusion_weight"} and m4["fusion_weight"] == 0.25
    for m in (m1, m4):
        assert not any(isinstance(v, str) for v in pd.json_normalize(m).iloc[0])
