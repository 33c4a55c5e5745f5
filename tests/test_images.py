import numpy as np
import pytest
from PIL import Image

from smt.data.images import ImageError, read_image, write_png
from smt.files import sha256_file


def _save(tmp_path, arr, name, mode=None):
    p = tmp_path / name
    Image.fromarray(arr, mode=mode).save(p) if mode else Image.fromarray(arr).save(p)
    return p


def test_grayscale_becomes_rgb(tmp_path):
    g = np.arange(64, dtype=np.uint8).reshape(8, 8)
    rgb = read_image(_save(tmp_path, g, "g.png"))
    assert rgb.shape == (8, 8, 3) and (rgb == g[..., None]).all()


def test_sixteen_bit_is_rounded(tmp_path):
    v = np.array([[0, 257, 65535, 300]], dtype=np.uint16).repeat(4, 0)
    p = tmp_path / "g16.png"
    Image.fromarray(v).save(p)
    rgb = read_image(p)
    assert rgb.dtype == np.uint8 and rgb[0, :, 0].tolist() == [0, 1, 255, 1]


def test_alpha(tmp_path):
    rgba = np.full((6, 6, 4), 200, dtype=np.uint8)
    rgba[..., 3] = 255
    assert read_image(_save(tmp_path, rgba, "opaque.png")).shape == (6, 6, 3)
    rgba[0, 0, 3] = 10
    with pytest.raises(ImageError, match="transparent"):
        read_image(_save(tmp_path, rgba, "transparent.png"))


def test_palette_and_small_and_corrupt(tmp_path):
    rgb = (np.random.default_rng(0).random((10, 12, 3)) * 255).astype(np.uint8)
    p = tmp_path / "p.png"
    Image.fromarray(rgb).convert("P").save(p)
    assert read_image(p).shape == (10, 12, 3)
    with pytest.raises(ImageError, match="smaller than the required 16 px"):
        read_image(p, min_side=16)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageError, match="bad.png: not a readable image"):
        read_image(bad)
    with pytest.raises(ImageError, match="no such file"):
        read_image(tmp_path / "missing.png")


def test_write_png_roundtrip_and_atomic(tmp_path):
    rgb = (np.random.default_rng(1).random((5, 7, 3)) * 255).astype(np.uint8)
    out = tmp_path / "sub" / "x.png"
    write_png(out, rgb)
    assert (read_image(out) == rgb).all()
    assert len(sha256_file(out)) == 64
    with pytest.raises(ValueError):
        write_png(tmp_path / "y.png", rgb.astype(np.float32))
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["x.png"]
