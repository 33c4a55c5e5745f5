import dataclasses

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


def test_config_sections_are_frozen():
    cfg = ReportConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
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


def test_profiles_parse_and_demo_profile_is_the_committed_params(tmp_path):
    from smt.pipeline import write_dvc_yaml
    from smt.profile import SECTIONS, list_profiles

    profiles = list_profiles(REPO)
    assert {"demo", "ntire2025"} <= set(profiles)
    for path in profiles.values():
        for section in SECTIONS:
            load_section(section, path)
        write_dvc_yaml(path, tmp_path / f"{path.stem}.yaml")  # every profile makes a pipeline
    assert profiles["demo"].read_text() == (REPO / "params.yaml").read_text(), \
        "params.yaml is not profiles/demo.yaml: the README's main command must run the demo"
    ntire = load_section("train", profiles["ntire2025"])
    assert ntire.rounds == 5 and ntire.models["hat"].preset == "hat_l" and ntire.models["mambairv2"].preset == \
        "mambairv2_l"
    assert [(s.patch_size, s.batch_size, s.loss, s.lr, s.iters) for s in ntire.stages.values()] == [
        (64, 64, "l1", 1e-4, 250_000), (128, 16, "mse", 1e-5, 250_000), (128, 16, "mse", 1e-5, 100_000)]
    # the paper's augmentation (flips and rotations); the colour measures are the demo's only
    assert ntire.augment.dihedral and not ntire.augment.channel_permute and ntire.augment.color_prob == 0.0
    infer = load_section("infer", profiles["ntire2025"])
    assert infer.window_tiles == (100, 200, 300, 400, 500) and infer.window_weights == (1.0, 1.0, 1.2, 0.8, 0.8)


def test_ntire_dry_run_lists_what_is_missing_here():
    from smt.profile import check_params, format_check

    items = check_params(REPO / "profiles" / "ntire2025.yaml", gpus=0)
    missing = [i.what for i in items if i.status == "missing"]
    assert any("HAT-L_SRx4_ImageNet-pretrain.pth" in m for m in missing)
    assert any("data.folders.DIV2K_test_LR" in m for m in missing)
    assert any("no CUDA device" in m for m in missing)
    assert any("LSDIR_train" in i.what for i in items if i.status == "todo")
    assert format_check(items).splitlines()[-1].startswith("NOT READY")
    with_gpus = check_params(REPO / "profiles" / "ntire2025.yaml", gpus=4)
    assert any("train.nproc = 8 but this machine has 4" in i.what for i in with_gpus)
    demo = check_params(REPO / "params.yaml", gpus=0)
    assert not [i for i in demo if i.status == "missing"], format_check(demo)


def test_switch_profile_rewrites_params_and_pipeline_and_keeps_edits(tmp_path):
    import shutil

    from smt.profile import switch_profile

    shutil.copytree(REPO / "profiles", tmp_path / "profiles")
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text() + "# my edit\n")
    items, actions = switch_profile("ntire2025", tmp_path, gpus=0)
    assert (tmp_path / "params.yaml").read_text() == (REPO / "profiles" / "ntire2025.yaml").read_text()
    assert "train_mambairv2_r5_s3:" in (tmp_path / "dvc.yaml").read_text()
    backups = list(tmp_path.glob("params.yaml.*.bak"))
    assert len(backups) == 1 and backups[0].read_text().endswith("# my edit\n") and "edited by hand" in actions[0]
    switch_profile("demo", tmp_path, gpus=0)
    assert (tmp_path / "params.yaml").read_text() == (REPO / "params.yaml").read_text()
    assert len(list(tmp_path.glob("params.yaml.*.bak"))) == 1  # a profile's own text is never backed up
    with pytest.raises(ConfigError, match="unknown profile 'nope'"):
        switch_profile("nope", tmp_path)
