import json
import math

import numpy as np
import pytest
from PIL import Image

from smt.metrics import BASICSR, NTIRE2025, evaluate_pair, psnr, rgb_to_y, ssim
from conftest import FIXTURES

REF = json.loads((FIXTURES / "metrics_reference.json").read_text())


def _load(rel):
    return np.array(Image.open(FIXTURES / rel))


@pytest.mark.parametrize("pair", REF["pairs"], ids=[p["id"] for p in REF["pairs"]])
def test_matches_basicsr_and_ntire(pair):
    sr, hr = _load(pair["sr"]), _load(pair["hr"])
    b = evaluate_pair(sr, hr, BASICSR)
    assert b["psnr_y"] == pytest.approx(pair["basicsr_psnr_y"], abs=1e-5)
    assert b["ssim_y"] == pytest.approx(pair["basicsr_ssim_y"], abs=1e-6)
    assert b["psnr_rgb"] == pytest.approx(pair["basicsr_psnr_rgb"], abs=1e-5)
    assert b["ssim_rgb"] == pytest.approx(pair["basicsr_ssim_rgb"], abs=1e-6)
    n = evaluate_pair(sr, hr, NTIRE2025)
    assert n["psnr_y"] == pytest.approx(pair["ntire_psnr"], abs=1e-5)
    assert n["ssim_y"] == pytest.approx(pair["ntire_ssim"], abs=1e-6)


def test_identical_images_and_y_range():
    img = _load(REF["pairs"][0]["hr"])
    s = evaluate_pair(img, img)
    assert math.isinf(s["psnr_y"]) and s["ssim_y"] == pytest.approx(1.0)
    y = rgb_to_y(np.array([[[0, 0, 0], [255, 255, 255]]], dtype=np.uint8))
    np.testing.assert_allclose(y, [[16.0, 235.0]], atol=1e-9)
    assert psnr(np.zeros(4), np.full(4, 255.0)) == pytest.approx(0.0)


def test_bad_inputs_are_named():
    img = _load(REF["pairs"][0]["hr"])
    with pytest.raises(ValueError, match="sizes differ"):
        evaluate_pair(img[:-4], img)
    with pytest.raises(ValueError, match="uint8"):
        evaluate_pair(img.astype(np.float32), img)
    with pytest.raises(ValueError, match="11x11"):
        ssim(np.zeros((8, 8)), np.zeros((8, 8)))
