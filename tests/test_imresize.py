import numpy as np
import pytest

from smt.data.imresize import bicubic_degrade, imresize, resize_matrix, to_uint8
from conftest import FIXTURES

REF = np.load(FIXTURES / "imresize_reference.npz", allow_pickle=False)


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee"])
@pytest.mark.parametrize("tag,scale,f32_tol,max_u8_mismatch", [
    ("down4", 0.25, 3e-7, 1), ("down2", 0.5, 3e-7, 1), ("down4_3", 0.75, 2e-5, 6)])
def test_matches_basicsr_reference(name, tag, scale, f32_tol, max_u8_mismatch):
    x = REF[f"{name}_input"].astype(np.float32) / 255.0
    out = imresize(x, scale)
    ref = REF[f"{name}_{tag}_f32"]
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() < f32_tol
    u8 = to_uint8(out).astype(int)
    diff = np.abs(u8 - REF[f"{name}_{tag}_u8"])
    assert diff.max() <= 1 and (diff > 0).sum() <= max_u8_mismatch


def test_upscale_matches_reference():
    out = imresize(REF["crop32_input"].astype(np.float32) / 255.0, 4)
    assert out.shape == (128, 128, 3)
    assert np.abs(out - REF["crop32_up4_f32"]).max() < 3e-7
    assert (to_uint8(out) != REF["crop32_up4_u8"]).sum() <= 1


def test_rows_sum_to_one_and_constant_is_preserved():
    for n_in, scale in [(7, 0.25), (13, 0.5), (5, 4.0), (3, 0.25)]:
        m = resize_matrix(n_in, int(np.ceil(n_in * scale)), scale)
        np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-12)
    img = np.full((9, 11, 3), 0.3)
    np.testing.assert_allclose(imresize(img, 0.25), 0.3, atol=1e-12)


def test_degrade_size_and_dtype():
    hr = (np.random.default_rng(0).random((40, 24, 3)) * 255).astype(np.uint8)
    lr = bicubic_degrade(hr, 4)
    assert lr.shape == (10, 6, 3) and lr.dtype == np.uint8
    with pytest.raises(TypeError, match="uint8"):
        bicubic_degrade(hr.astype(np.float32), 4)
