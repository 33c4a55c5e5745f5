import numpy as np
import pytest

from smt.config import DataConfig
from smt.data.dataset_builder import build_dataset, prepare_hr
from smt.data.manifest import read_manifest
from smt.data.demo import load_demo_image
from smt.data.images import ImageError, read_image
from smt.files import sha256_file
from smt.data.imresize import bicubic_degrade


def test_build_minimal_dataset(tmp_path):
    cfg = DataConfig(root=str(tmp_path / "demo"), max_side=66, train_images=("camera", "coins"),
                     valid_images=("astronaut",), test_images=())
    manifests = build_dataset(cfg)
    train = read_manifest(cfg.root, "train", verify=True)
    assert train["id"].tolist() == ["0001", "0002"]
    assert train["source"].tolist() == ["camera", "coins"]
    assert train["hr_path"].tolist() == ["train_HR/0001.png", "train_HR/0002.png"]
    assert train["lr_path"].tolist() == ["train_LR_bicubic/X4/0001x4.png", "train_LR_bicubic/X4/0002x4.png"]
    valid = manifests["valid"]
    assert valid["id"].tolist() == ["0101"] and manifests["test"].empty
    row = valid.iloc[0]
    # 512x512 centre-cropped to 66, then modcropped to 64
    assert (row.hr_height, row.hr_width, row.lr_height, row.lr_width) == (64, 64, 16, 16)
    hr = read_image(tmp_path / "demo" / row.hr_path)
    lr = read_image(tmp_path / "demo" / row.lr_path)
    assert (lr == bicubic_degrade(hr, 4)).all()
    expected = load_demo_image("astronaut")[223:287, 223:287]
    assert (hr == expected).all()
    assert row.hr_sha256 == sha256_file(tmp_path / "demo" / row.hr_path)
    assert not (tmp_path / "demo.partial").exists()


def test_manifest_verification_catches_tampering(tmp_path):
    cfg = DataConfig(root=str(tmp_path / "d"), max_side=32, train_images=("coins",), valid_images=("camera",))
    build_dataset(cfg)
    lr = tmp_path / "d" / "valid_LR_bicubic" / "X4" / "0101x4.png"
    lr.write_bytes(lr.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="0101x4.png: content does not match"):
        read_manifest(cfg.root, "valid", verify=True)
    with pytest.raises(FileNotFoundError, match="run the data stage"):
        read_manifest(tmp_path / "nowhere", "train")


def test_prepare_hr_rejects_tiny_and_modcrops():
    with pytest.raises(ImageError, match="smaller than the scale factor 4"):
        prepare_hr(np.zeros((3, 10, 3), np.uint8), 4, name="tiny")
    assert prepare_hr(np.zeros((10, 13, 3), np.uint8), 4).shape == (8, 12, 3)


def test_unknown_demo_image():
    with pytest.raises(KeyError, match="unknown demo image 'lena'"):
        load_demo_image("lena")
