"""The report pages in a real browser (headless Chromium over the DevTools protocol, tests/browser.py).

The fixture runs the report stage's logic on a tiny data set (two validation images, one test image, 48 px) with
three synthetic methods (bicubic plus a fixed offset: known scores, no training), so these tests take seconds.
The pages of the other stages are written as stubs here; tests/test_pipeline.py crawls the real ones after a tiny
`dvc repro`. Without a browser every test here skips, saying how to get one.
"""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import yaml

from browser import HOW_TO_GET_ONE, Browser, crawl, find_chromium
from conftest import REPO

CHROMIUM = find_chromium()
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason=HOW_TO_GET_ONE)
OFFSETS = {"hat": 6, "mambairv2": 3, "fused": 0}  # grey levels added to bicubic: fused equals bicubic


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """(work folder, EvaluationResult) of the report stage on tiny data with synthetic method outputs."""
    from smt.config import DataConfig, ReportConfig
    from smt.data.dataset_builder import build_dataset
    from smt.data.images import read_image, write_png
    from smt.data.manifest import read_manifest
    from smt.evaluate import bicubic_upscale
    from smt.pipeline import stage_definitions
    from smt.report.evaluation import run_evaluation
    from smt.report.index import ABLATIONS

    work = tmp_path_factory.mktemp("site")
    data_cfg = DataConfig(root=str(work / "data/demo"), max_side=48, train_images=("camera",),
                          valid_images=("astronaut", "coins"), test_images=("chelsea",))
    build_dataset(data_cfg)
    for split in ("valid", "test"):
        for row in read_manifest(data_cfg.root, split).itertuples():
            bic = bicubic_upscale(read_image(work / "data/demo" / row.lr_path), 4)[: row.hr_height, : row.hr_width]
            for method, offset in OFFSETS.items():
                out = np.clip(bic.astype(int) + offset, 0, 255).astype(np.uint8)
                write_png(work / "results" / split / method / f"{row.id}x4.png", out)
    (work / "results/methods.json").write_text(json.dumps({"methods": list(OFFSETS)}))
    (work / "results/protocols.json").write_text(json.dumps(  # shown by name where present, as infer writes it
        {"split": "valid", "images": 2, "method": "fused", "psnr_y": {"smt": 27.123, "bbox": 27.081}}))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(root=data_cfg.root)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    # the other stages' pages: stubs (test_pipeline.py crawls the real ones)
    for stage in stage_definitions(work / "params.yaml"):
        if stage not in ("report", *ABLATIONS):
            page = work / "reports" / stage / f"{stage}.html"
            page.parent.mkdir(parents=True, exist_ok=True)
            page.write_text(f"<!DOCTYPE html><html><head><title>{stage}</title></head><body>{stage}</body></html>")
    (work / "timings").mkdir()
    measured = {"hat": {"seconds_per_image": 0.25, "peak_mb": 512.0},
                "fused": {"seconds_per_image": 1.5, "peak_mb": 700}}
    (work / "timings/infer.js").write_text(f"window.SMT_TIMINGS = {json.dumps({'infer': measured})};\n")
    result = run_evaluation(data_cfg, ReportConfig(), work / "results", work / "reports/report", work / "reports",
                            work / "params.yaml")
    (work / "reports/report/report.html").write_text("<!DOCTYPE html><html><body>report</body></html>")  # notebook's
    return work, result


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip(HOW_TO_GET_ONE)
    b = Browser(CHROMIUM)
    yield b
    b.close()


def _viewer(browser, site, split="valid", image="0101"):
    browser.errors.clear()
    browser.open((site[0] / f"reports/report/view/{split}/{image}.html").as_uri())
    return browser


@needs_browser
def test_every_page_loads_without_console_errors_and_every_link_and_image_resolves(site, browser):
    work, result = site
    report = crawl(browser, work / "reports/index.html", work / "reports")
    assert {p: e for p, e in report.items() if e} == {}
    pages = {str(p) for p in report}
    for e in result.images:  # every image's viewer and the gallery are reached from the index
        assert str(work / "reports/report" / e.page) in pages
    assert str(work / "reports/report/gallery_1.html") in pages
    assert len(result.images) == 3 and {e.split for e in result.images} == {"valid", "test"}


@needs_browser
def test_crawler_reports_missing_targets_console_errors_and_exceptions(tmp_path, browser):
    """The check above can fail: a page with a dead link, a missing image and a throwing script."""
    (tmp_path / "bad.html").write_text('<!DOCTYPE html><html><body><a href="nowhere.html">x</a>'
                                       '<img src="missing.png"><script>console.error("boom"); null.x;</script>'
                                       "</body></html>")
    problems = crawl(browser, tmp_path / "bad.html", tmp_path)[str(tmp_path / "bad.html")]
    text = "\n".join(problems)
    assert "nowhere.html" in text and "missing.png" in text and "boom" in text and "exception" in text


@needs_browser
def test_index_opens_with_the_headline_chart_thumbnails_and_cost(site, browser):
    work, result = site
    browser.open((work / "reports/index.html").as_uri())
    headline = browser.eval("document.querySelector('h2').textContent + '|' + "
                            "document.querySelector('h2 + table').innerText")
    assert headline.startswith("Headline: fused against bicubic|") and "valid (2 images)" in headline
    assert "test (1 image)" in headline and "+0.00" in headline  # fused == bicubic here
    order = browser.eval("Array.from(document.querySelectorAll('h2')).map(h => h.textContent)")
    assert order[:5] == ["Headline: fused against bicubic", "Protocol comparison", "Gain over bicubic, per image",
                         "Look at the images", "Cost per method"]
    thumbs = browser.eval("Array.from(document.querySelectorAll('.thumbs img')).map(i => i.loading)")
    assert thumbs == ["lazy"] * 3
    cost = browser.eval("document.getElementById('cost').innerText")
    assert "seconds per image" in cost and "0.250" in cost and "512" in cost
    assert browser.eval("document.body.innerText").count("dvc repro ablation_") == 4
    compare = browser.eval("(h => [1, 2, 3].map(n => { let e = h; for (let i = 0; i < n; i++) e = e.nextElementSibling;"
                           " return e.innerText; }).join('|'))(Array.from(document.querySelectorAll('h2'))"
                           ".find(h => h.textContent == 'Protocol comparison'))")
    assert "the authors' (infer.protocol: bbox)" in compare and "ours (infer.protocol: smt)" in compare
    assert "27.123" in compare and "27.081" in compare and "valid images (2)" in compare


@needs_browser
def test_viewer_slider_moves_and_the_shown_image_changes(site, browser):
    b = _viewer(browser, site)
    start = b.eval("[imgA.dataset.choice, imgB.dataset.choice, imgA.style.clipPath, slider.value]")
    assert start[:2] == ["fused", "bicubic"] and start[3] == "500"
    rect = b.eval("(r => [r.left, r.top, r.width, r.height])(slider.getBoundingClientRect())")
    b.click(rect[0] + 0.2 * rect[2], rect[1] + rect[3] / 2)  # a real click on the slider
    moved = b.eval("[slider.value, imgA.style.clipPath, line.style.left]")
    assert int(moved[0]) < 300 and moved[1] != start[2]
    b.key("ArrowRight")
    assert int(b.eval("slider.value")) > int(moved[0])
    b.key("3")  # the third choice (HR, bicubic, hat, ...) on the left
    assert b.eval("[imgA.dataset.choice, imgA.src.endsWith('/results/valid/hat/0101x4.png')]") == ["hat", True]
    b.key("1", modifiers=8)  # Shift+1: HR on the right
    assert b.eval("imgB.dataset.choice") == "HR"
    b.key("s")  # swap
    assert b.eval("[imgA.dataset.choice, imgB.dataset.choice]") == ["HR", "hat"]
    tags = b.eval("tagA.textContent + '|' + tagB.textContent")
    df = site[1].per_image
    hat = df[(df.split == "valid") & (df.method == "hat") & (df.id == "0101")].iloc[0]
    assert tags == f"HR: reference|hat: PSNR-Y {hat.psnr_y:.2f} dB, colour shift {hat.color_shift:.2f}"
    assert b.errors == []


@needs_browser
def test_viewer_zoom_and_pan_stay_in_step(site, browser):
    b = _viewer(browser, site)
    rects = "JSON.stringify([imgA.getBoundingClientRect(), imgB.getBoundingClientRect()])"
    before = json.loads(b.eval(rects))
    b.key("+", code="Equal")
    b.key("+", code="Equal")
    b.key("ArrowRight", modifiers=8)  # Shift+arrow pans
    a, bb = json.loads(b.eval(rects))
    assert a == bb and a["width"] == pytest.approx(before[0]["width"] * 1.5625)
    assert b.eval("document.getElementById('zoom').textContent") == "156%"
    box = b.eval("(r => [r.left + r.width / 2, r.top + r.height / 2])(stage.getBoundingClientRect())")
    b.send("Input.dispatchMouseEvent", type="mouseWheel", x=box[0], y=box[1], deltaX=0, deltaY=-100)
    b.eval("new Promise(r => setTimeout(r, 50))")
    a2, b2 = json.loads(b.eval(rects))
    assert a2 == b2 and a2["width"] > a["width"]
    b.key("0")
    assert json.loads(b.eval(rects))[0]["width"] == pytest.approx(before[0]["width"])
    assert b.errors == []


@needs_browser
def test_screenshot_of_a_viewer_is_not_blank(site, browser):
    from PIL import Image

    b = _viewer(browser, site)
    b.key("+", code="Equal")
    shot = np.asarray(Image.open(io.BytesIO(b.screenshot())).convert("RGB")).astype(float)
    assert shot.shape[0] > 100 and shot.std() > 20
    assert len(np.unique(shot.reshape(-1, 3), axis=0)) > 200  # the photograph, not flat colour


def test_report_pages_are_byte_identical_on_rerun(site, tmp_path):
    """Every file the report stage writes (pages, thumbnails, bicubic PNGs, metrics) has the same bytes."""
    from smt.config import DataConfig, ReportConfig
    from smt.report.evaluation import run_evaluation

    work, result = site
    before = tmp_path / "before"
    shutil.copytree(work / "reports", before)
    run_evaluation(DataConfig(root=str(work / "data/demo"), max_side=48, train_images=("camera",),
                              valid_images=("astronaut", "coins"), test_images=("chelsea",)),
                   ReportConfig(), work / "results", work / "reports/report", work / "reports", work / "params.yaml")
    files = sorted(p.relative_to(before) for p in before.rglob("*") if p.is_file())
    assert len(files) > 20 and sorted(p.relative_to(work / "reports") for p in (work / "reports").rglob("*")
                                      if p.is_file()) == files
    for f in files:
        assert (work / "reports" / f).read_bytes() == (before / f).read_bytes(), f


def test_viewer_pages_link_full_resolution_images_and_carry_each_versions_scores(site):
    work, result = site
    e = next(x for x in result.images if x.split == "valid" and x.id == "0101")
    assert list(e.versions) == ["HR", "bicubic", "hat", "mambairv2", "fused"]
    page = (work / "reports/report" / e.page).read_text()
    data = json.loads(page.split("window.VIEWER = ", 1)[1].split(";</script>", 1)[0])
    srcs = {c["name"]: c["src"] for c in data["choices"]}
    assert srcs["HR"] == "../../../../data/demo/valid_HR/0101.png"
    assert srcs["hat"] == "../../../../results/valid/hat/0101x4.png"
    assert srcs["bicubic"] == "../../bicubic/valid/0101.png"
    shifts = {c["name"]: c["color_shift"] for c in data["choices"]}
    df = result.per_image.set_index(["split", "method", "id"])
    assert shifts["HR"] is None and shifts["hat"] == round(df.loc[("valid", "hat", "0101"), "color_shift"], 4)
    assert shifts["hat"] > shifts["bicubic"] + 5  # 6 grey levels added, a few clipped
    assert shifts["fused"] == pytest.approx(shifts["bicubic"])
    assert (data["width"], data["height"]) == (e.width, e.height)
    test = next(x for x in result.images if x.split == "test")
    assert "view/test/0201.html" in page or data["next"] == "../../view/valid/0102.html"
    assert test.thumb == "thumbs/test/0201.png" and (work / "reports/report" / test.thumb).exists()
