"""The report's generalisation line: per-image gains over bicubic, images below it, the final method."""
import pandas as pd
import pytest

from smt.report.evaluation import below_bicubic, final_method, gains_over_bicubic, generalisation_note


def _per_image(rows):
    return pd.DataFrame(rows, columns=["split", "method", "id", "source", "psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb",
                                       "color_shift"])


@pytest.fixture
def per_image():
    return _per_image([
        ("valid", "bicubic", "0101", "astronaut", 26.0, 0.8, 25.0, 0.8, 0.1),
        ("valid", "bicubic", "0102", "coffee", 27.0, 0.8, 26.0, 0.8, 0.0),
        ("test", "bicubic", "0201", "rocket", 30.0, 0.8, 28.0, 0.8, 0.0),
        ("valid", "hat", "0101", "astronaut", 27.0, 0.8, 25.5, 0.8, 0.3),
        ("valid", "hat", "0102", "coffee", 27.5, 0.8, 26.2, 0.8, 0.2),
        ("test", "hat", "0201", "rocket", 30.2, 0.8, 27.9, 0.8, 1.7),
        ("valid", "fused", "0101", "astronaut", 27.2, 0.8, 25.6, 0.8, 0.2),
        ("valid", "fused", "0102", "coffee", 27.6, 0.8, 26.3, 0.8, 0.4),
        ("test", "fused", "0201", "rocket", 30.3, 0.8, 28.1, 0.8, 0.6),
    ])


def test_gains_are_differences_to_bicubic_on_the_same_image(per_image):
    g = gains_over_bicubic(per_image).set_index(["split", "method", "id"])
    assert g.loc[("valid", "hat", "0101"), "gain_psnr_y"] == pytest.approx(1.0)
    assert g.loc[("test", "hat", "0201"), "gain_psnr_rgb"] == pytest.approx(-0.1)
    assert g.loc[("test", "fused", "0201"), "gain_psnr_y"] == pytest.approx(0.3)
    assert "bicubic" not in g.index.get_level_values("method")


def test_final_method_is_the_fused_ensemble_or_the_last_method():
    assert final_method(["bicubic", "hat", "mambairv2+SE", "fused"]) == "fused"
    assert final_method(["bicubic", "hat", "hat+SE"]) == "hat+SE"
    with pytest.raises(ValueError, match="no method"):
        final_method(["bicubic"])


def test_note_names_every_image_below_bicubic_and_the_worst_colour_shift(per_image):
    gains = gains_over_bicubic(per_image)
    assert below_bicubic(gains, "fused") == {"valid": [], "test": []}
    assert below_bicubic(gains, "hat") == {"valid": [], "test": ["0201"]}
    ok = generalisation_note(gains, "fused")
    assert "above bicubic in PSNR-Y and PSNR-RGB on every one of the 3" in ok
    assert "+0.30 dB" in ok and "0.60 grey levels (test/0201 (rocket))" in ok
    bad = generalisation_note(gains, "hat")
    assert "BELOW bicubic on 1 of 3" in bad and "test/0201 (rocket): PSNR-Y +0.20 dB, PSNR-RGB -0.10 dB" in bad
    assert "1.70 grey levels" in bad
