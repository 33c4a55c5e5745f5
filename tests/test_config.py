import pytest
import yaml

from smt.config import ConfigError, DataConfig, ReportConfig, _sections, load_section, parse_section
from conftest import REPO


def test_repo_params_load():
    for name in _sections():
        cfg = load_section(name, REPO / "params.yaml")
        assert isinstance(cfg, _sections()[name])
    data = load_section("data", REPO / "params.yaml")
    assert data.scale == 4 and isinstance(data.train_images, tuple)


def test_frozen():
    cfg = ReportConfig()
    with pytest.raises(Exception):
        cfg.crop_size = 3


@pytest.mark.parametrize("raw,message", [
    ({"crop_sise": 96}, r"report\.crop_sise: unknown key"),
    ({"crop_size": "96"}, r"report\.crop_size: expected int, got str"),
    ({"crop_size": True}, r"report\.crop_size: expected int, got bool"),
    ({"protocol": "PSNR"}, r"report\.protocol: must be one of"),
    ({"crop_size": 2}, r"report\.crop_size: must be >= 8"),
])
def test_report_errors_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_section(ReportConfig, raw, "report")


def test_data_errors():
    base = {"train_images": ["camera"], "valid_images": ["coins"]}
    assert parse_section(DataConfig, base, "data").test_images == ()
    with pytest.raises(ConfigError, match=r"data\.train_images\[1\]: expected str"):
        parse_section(DataConfig, {**base, "train_images": ["camera", 3]}, "data")
    with pytest.raises(ConfigError, match=r"already in data\.train_images"):
        parse_section(DataConfig, {**base, "valid_images": ["camera"]}, "data")
    with pytest.raises(ConfigError, match=r"data\.scale: must be 2, 3 or 4"):
        parse_section(DataConfig, {**base, "scale": 8}, "data")


def test_missing_file_and_section(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_section("data", tmp_path / "nope.yaml")
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"report": {}}))
    with pytest.raises(ConfigError, match="section 'data' is missing"):
        load_section("data", p)
    with pytest.raises(ConfigError, match="unknown section 'trian'"):
        load_section("trian", p)
