"""``upscale`` keeps the input's form: grey stays grey (the mean of the model's three output channels), 16-bit
grey stays 16-bit at full precision, alpha is kept, a palette image comes back RGB (not re-quantised), RGB stays
byte-for-byte what the 8-bit path gives; a folder gives every format Pillow reads and reports the rest as skipped,
with a count."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from smt.__main__ import main
from smt.data.images import ImageError, UserImage, pillow_suffixes, read_as_given, uint8_to_unit, write_as_given
from smt.data.imresize import imresize, to_uint8
from smt.infer import upscale as up
from smt.models import build_model


class _SpreadNearest(torch.nn.Module):
    """A stand-in x2 model: nearest-neighbour upscaling, with the red channel raised and the blue lowered by the
    same amount, so that the mean of the three output channels is the input's grey exactly."""
    upscale = 2
    window_size = 4
    spread = 6 / 255

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        y = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest") + 0 * self.w
        return y + torch.tensor([self.spread, 0.0, -self.spread]).view(1, 3, 1, 1)


class _Nearest(_SpreadNearest):
    spread = 0.0


def _up2(a: np.ndarray) -> np.ndarray:
    return a.repeat(2, 0).repeat(2, 1)


def _run(tmp_path, name: str, pil: Image.Image, model=None, **save) -> tuple[Image.Image, list[str]]:
    pil.save(tmp_path / name, **save)
    logs = []
    s = up.upscale_files([tmp_path / name], tmp_path / "out", model or _Nearest(), progress=False, log=logs.append)
    assert not s.skipped, s.skipped
    out = Image.open(s.written[0])
    out.load()
    return out, logs


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_rgb_stays_rgb_with_the_bytes_of_the_8_bit_path(tmp_path, rng):
    rgb = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    out, logs = _run(tmp_path, "a.png", Image.fromarray(rgb), _SpreadNearest())
    assert out.mode == "RGB" and not logs
    want = _up2(rgb).astype(np.int64) + np.array([6, 0, -6])
    assert np.array_equal(np.array(out), np.clip(want, 0, 255).astype(np.uint8))


def test_grey_stays_grey_as_the_mean_of_the_three_output_channels(tmp_path, rng):
    grey = rng.integers(10, 246, (6, 7), dtype=np.uint8)
    out, _ = _run(tmp_path, "g.png", Image.fromarray(grey), _SpreadNearest())
    assert out.mode == "L"
    assert np.array_equal(np.array(out), _up2(grey))  # red +6 and blue -6 average out


def test_grey_with_alpha_stays_grey_with_its_alpha_upscaled_bicubically(tmp_path, rng):
    la = rng.integers(0, 256, (6, 7, 2), dtype=np.uint8)
    out, _ = _run(tmp_path, "ga.png", Image.fromarray(la))
    assert out.mode == "LA"
    arr = np.array(out)
    assert np.array_equal(arr[..., 0], _up2(la[..., 0]))
    assert np.array_equal(arr[..., 1], to_uint8(imresize(uint8_to_unit(la[..., 1]), 2)))


def test_16_bit_grey_stays_16_bit_at_full_precision(tmp_path, rng):
    deep = rng.integers(0, 65536, (6, 7), dtype=np.uint16)
    out, _ = _run(tmp_path, "d.png", Image.fromarray(deep))
    assert out.mode == "I;16"
    assert np.array_equal(np.array(out), _up2(deep))  # every one of the 65536 levels survives, not 256
    # through the whole 16-bit chain: read back as 16-bit from the written PNG
    assert read_as_given(tmp_path / "out" / "dx2.png").rgb.dtype == np.uint16


def test_16_bit_tiff_and_32_bit_integer_grey_are_16_bit(tmp_path, rng):
    deep = rng.integers(0, 65536, (5, 6), dtype=np.uint16)
    out, _ = _run(tmp_path, "t.tif", Image.fromarray(deep))
    assert out.mode == "I;16" and np.array_equal(np.array(out), _up2(deep))
    wide = Image.fromarray(deep.astype(np.int32))  # mode I
    out, _ = _run(tmp_path, "i.tif", wide)
    assert out.mode == "I;16" and np.array_equal(np.array(out), _up2(deep))


def test_palette_comes_back_rgb_with_its_colours_not_requantised(tmp_path, rng):
    rgb = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    pal = Image.fromarray(rgb).quantize(colors=8)
    out, _ = _run(tmp_path, "p.png", pal)
    assert out.mode == "RGB"
    assert np.array_equal(np.array(out), _up2(np.array(pal.convert("RGB"))))
    pal.info["transparency"] = 0  # palette entry 0 transparent: RGBA
    out, _ = _run(tmp_path, "pt.png", pal, transparency=0)
    assert out.mode == "RGBA"
    alpha = np.array(pal.convert("RGBA"))[..., 3]
    assert alpha.min() == 0 and np.array_equal(np.array(out)[..., 3], to_uint8(imresize(uint8_to_unit(alpha), 2)))


def test_rgba_keeps_its_alpha_and_an_opaque_alpha_is_dropped(tmp_path, rng):
    rgba = rng.integers(0, 256, (6, 7, 4), dtype=np.uint8)
    out, _ = _run(tmp_path, "a.png", Image.fromarray(rgba))
    assert out.mode == "RGBA" and np.array_equal(np.array(out)[..., :3], _up2(rgba[..., :3]))
    rgba[..., 3] = 255
    out, _ = _run(tmp_path, "b.png", Image.fromarray(rgba))
    assert out.mode == "RGB"


def test_bilevel_comes_back_8_bit_grey(tmp_path, rng):
    bits = rng.integers(0, 2, (6, 8)).astype(bool)
    out, _ = _run(tmp_path, "b.png", Image.fromarray(bits))
    assert out.mode == "L" and np.array_equal(np.array(out), _up2(bits.astype(np.uint8) * 255))


def _png16(path, arr: np.ndarray, colour_type: int) -> None:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit colour): filter 0 on every row."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def test_16_bit_colour_is_written_8_bit_with_a_note(tmp_path, rng):
    deep = rng.integers(0, 65536, (5, 6, 3), dtype=np.uint16)
    _png16(tmp_path / "c.png", deep, 2)
    logs = []
    s = up.upscale_files([tmp_path / "c.png"], tmp_path / "out", _Nearest(), progress=False, log=logs.append)
    out = Image.open(s.written[0])
    assert out.mode == "RGB" and np.array_equal(np.array(out), _up2((deep >> 8).astype(np.uint8)))  # Pillow's bytes
    assert len(logs) == 1 and "Pillow decodes 8 bits" in logs[0]


def test_an_animated_gif_upscales_its_first_frame_with_a_note(tmp_path, rng):
    frames = [Image.fromarray(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)).quantize(colors=16) for _ in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    logs = []
    s = up.upscale_files([tmp_path / "anim.gif"], tmp_path / "out", _Nearest(), progress=False, log=logs.append)
    assert np.array_equal(np.array(Image.open(s.written[0])), _up2(np.array(frames[0].convert("RGB"))))
    assert logs == [f"{tmp_path / 'anim.gif'}: 3 frames: the first is upscaled"]


def test_float_images_are_refused_and_writing_checks_its_input(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(ImageError, match="floating-point images are not supported"):
        read_as_given(tmp_path / "f.tif")
    like = UserImage(np.zeros((2, 2, 3), np.uint16), None, True)
    with pytest.raises(ValueError, match="NaN"):
        write_as_given(tmp_path / "n.png", np.full((2, 2, 3), np.nan), like)


def test_the_folder_scan_takes_every_format_pillow_reads_and_counts_the_rest(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    rgb = np.random.default_rng(1).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    for name in ("a.gif", "b.webp", "c.tif", "d.bmp", "e.jpg", "f.PNG"):
        Image.fromarray(rgb).save(src / name)
    (src / "notes.txt").write_text("not an image")
    (src / "README").write_text("no suffix")
    (src / "sub").mkdir()
    assert {".gif", ".webp", ".tif", ".bmp", ".jpg", ".png"} <= pillow_suffixes()
    scan = up.scan_inputs([src])
    assert [p.name for p in scan.files] == ["a.gif", "b.webp", "c.tif", "d.bmp", "e.jpg", "f.PNG"]
    assert {p.name: why for p, why in scan.skipped} == {
        "README": "not an image format Pillow reads (no suffix)", "notes.txt":
        "not an image format Pillow reads (.txt)", "sub": "a folder: folders are not searched"}
    # the command: all six written, the three skipped entries reported with their count, exit 0
    torch.manual_seed(0)
    torch.save({"params_ema": build_model("hat_tiny").eval().state_dict()}, tmp_path / "HAT_tiny.pth")
    rc = main(["upscale", str(src), "-o", str(tmp_path / "out"), "--checkpoint", str(tmp_path / "HAT_tiny.pth"),
               "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 0
    assert "upscale: skipped 3 folder entries: README (not an image format Pillow reads (no suffix));" in captured.err
    assert captured.out.strip() == (f"wrote 6 image(s) to {tmp_path / 'out'}; 3 folder entries skipped (not "
                                    "images Pillow reads)")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{c}x4.png" for c in "abcdef"]


def test_a_folder_without_images_is_an_error_naming_what_was_skipped(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"no images found in .*skipped 1 folder entry: notes.txt"):
        up.scan_inputs([tmp_path])
