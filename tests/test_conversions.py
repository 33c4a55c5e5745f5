"""One float -> uint8 rule (round half to even, clip) and one image <-> tensor conversion, in smt.data.images,
used by every path that turns model outputs into pixels."""
import ast
import re

import numpy as np
import pytest
import torch

from smt.data.images import (float255_to_uint8, image_to_tensor, tensor_to_float255, tensor_to_image,
                             unit_to_uint8)
from conftest import REPO


def test_the_rule_rounds_half_to_even_and_clips():
    values = np.array([-3.0, 0.0, 0.49, 0.5, 1.5, 2.5, 3.5, 127.5, 128.5, 254.5, 254.51, 255.0, 300.0])
    assert float255_to_uint8(values).tolist() == [0, 0, 0, 0, 2, 2, 4, 128, 128, 254, 255, 255, 255]
    assert float255_to_uint8(values).dtype == np.uint8
    with pytest.raises(ValueError, match="NaN"):
        float255_to_uint8(np.array([1.0, np.nan]))


def _exact_halves() -> torch.Tensor:
    """float32 values v in [0, 1] whose float32 product v * 255 is exactly k + 0.5."""
    ks = torch.arange(0, 255, dtype=torch.float64)
    v = ((ks + 0.5) / 255).float()
    exact = (v * 255.0) == (ks + 0.5).float()
    assert exact.sum() > 50  # plenty of exact halves to test
    return v[exact], ks[exact]


def test_tensor_to_image_applies_the_rule_to_exact_halves():
    v, ks = _exact_halves()
    n = len(v)
    x = v.reshape(1, 1, n).expand(3, 1, n)
    img = tensor_to_image(x)
    assert img.shape == (1, n, 3) and img.dtype == np.uint8
    expected = [int(k) + (int(k) % 2) for k in ks.tolist()]  # k + 0.5 -> the even neighbour
    assert img[0, :, 0].tolist() == expected
    # the batch form, and the NumPy [0, 1] form (bicubic degradation) give the same pixels
    assert np.array_equal(tensor_to_image(x[None]), img)
    assert np.array_equal(unit_to_uint8(x.permute(1, 2, 0).numpy()), img)
    assert np.array_equal(float255_to_uint8(tensor_to_float255(x)), img)


def test_out_of_range_and_round_trip():
    x = torch.tensor([-0.2, 0.0, 1.0, 1.3]).reshape(1, 1, 4).expand(3, 1, 4)
    assert tensor_to_image(x)[0, :, 1].tolist() == [0, 0, 255, 255]
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    t = image_to_tensor(levels)
    assert t.shape == (1, 3, 16, 16) and t.dtype == torch.float32 and float(t.max()) == 1.0
    assert np.array_equal(tensor_to_image(t), levels)  # every level survives the round trip
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        image_to_tensor(levels.astype(np.float32))
    with pytest.raises(ValueError, match="one image"):
        tensor_to_image(torch.zeros(2, 3, 4, 4))


def test_every_consumer_uses_the_rule():
    """Validation in training, the infer stage, fusion, upscale and the bicubic degradation agree pixel for pixel
    with the rule, on outputs full of exact halves."""
    from smt.data.imresize import to_uint8
    from smt.infer.fusion import fuse
    from smt.train.engine import tensor_to_uint8

    v, _ = _exact_halves()
    x = v[: 64].reshape(1, 8, 8).expand(3, 8, 8).contiguous()
    want = tensor_to_image(x)
    assert np.array_equal(tensor_to_uint8(x), want)
    arr = tensor_to_float255(x)
    assert np.array_equal(fuse(arr, np.zeros_like(arr), 1.0), want)
    assert np.array_equal(fuse(arr, arr, 0.5), want)  # 0.5 a + 0.5 a == a exactly
    assert np.array_equal(to_uint8(x.permute(1, 2, 0).numpy()), want)


def test_upscale_writes_the_rule(tmp_path):
    """`python -m smt upscale` through a stand-in network whose output is full of exact halves."""
    from smt.data.images import read_image, write_png
    from smt.infer.upscale import upscale_files

    v, _ = _exact_halves()
    out_values = v.repeat(8)[: 32 * 32].reshape(1, 1, 32, 32).expand(1, 3, 32, 32).contiguous()

    class Net(torch.nn.Module):
        upscale = 4

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return out_values.clone() + 0 * self.w

    write_png(tmp_path / "in.png", np.zeros((8, 8, 3), dtype=np.uint8))
    upscale_files([tmp_path / "in.png"], tmp_path / "out", Net())
    assert np.array_equal(read_image(tmp_path / "out" / "inx4.png"), tensor_to_image(out_values))


_ALLOWED = {"smt/data/images.py"}
# Deliberate exceptions: the colour augmentation rounds a colour-transformed uint8 image back to uint8 (a data
# transform in grey levels, not a float output), and the patch dataset's uint8 -> float division is the same
# operation as images.py's; moving it there changes no value but would retrain the demo models for nothing.
_PENDING = {"smt/train/data.py", "smt/data/augment.py"}


def test_no_other_module_converts_images_itself():
    """Pixel conversions live in smt/data/images.py only: no `* 255`, `/ 255`, `.div(255)`, `.round()`,
    `np.round`/`np.rint` or HWC<->CHW permute of an image elsewhere in the package."""
    pattern = re.compile(r"\*\s*255\b|/\s*255\b|\.div\(255|\.round\(\)|np\.round\(|np\.rint\("
                         r"|permute\(2, 0, 1\)\[None\]|permute\(1, 2, 0\)")
    offenders = []
    for path in sorted((REPO / "smt").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel in _ALLOWED | _PENDING or rel.startswith("smt/models/"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):  # comments, docstrings and other text dropped
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                node.value = ""
        code = ast.unparse(tree)
        for line in code.splitlines():
            if pattern.search(line) and "_Y_WEIGHTS" not in line and "0.01 * 255" not in line and \
                    "0.03 * 255" not in line:
                offenders.append(f"{rel}: {line.strip()}")
    assert not offenders, "convert with smt.data.images instead:\n" + "\n".join(offenders)
