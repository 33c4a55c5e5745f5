"""Architecture from the weights: every official family is recognised from its state dict alone and the
detected arguments rebuild a model that loads it strictly; an unrecognised file says what was expected."""
import pytest
import torch

from smt.models import ARCHITECTURES, CheckpointError, build_model
from smt.models.detect import detect_architecture
from conftest import FIXTURES

VARIANTS = torch.load(FIXTURES / "mambairv2_variants.pt", weights_only=True)
HAT_REF = torch.load(FIXTURES / "hat_tiny_x4.pt", weights_only=True)
MAMBA_REF = torch.load(FIXTURES / "mambairv2_tiny_x4.pt", weights_only=True)
SHAPE_ARGS = ("in_chans", "embed_dim", "depths", "num_heads", "window_size", "upscale", "upsampler",
              "resi_connection", "mlp_ratio", "d_state", "inner_rank", "num_tokens", "compress_ratio",
              "squeeze_factor", "overlap_ratio")


def _assert_detects(state, arch, config):
    found_arch, kwargs = detect_architecture(state)
    assert found_arch == arch
    for k in SHAPE_ARGS:
        if k in config:
            assert tuple(kwargs[k]) == tuple(config[k]) if isinstance(config[k], (tuple, list)) \
                else kwargs[k] == config[k], k
    net = ARCHITECTURES[found_arch](**kwargs)
    net.load_state_dict(state, strict=True)  # the detected architecture fits the file exactly


@pytest.mark.parametrize("variant", VARIANTS["variants"])
def test_detects_each_official_mambairv2_family(variant):
    entry = VARIANTS[variant]
    _assert_detects(entry["state_dict"], entry["class"].lower(), entry["config"])


def test_detects_official_hat_and_classic_mambairv2():
    _assert_detects(HAT_REF["state_dict"], "hat", HAT_REF["config"])
    _assert_detects(MAMBA_REF["state_dict"], "mambairv2", MAMBA_REF["config"])


@pytest.mark.parametrize("name,scale", [("hat_s", 4), ("hat", 3), ("hat_l", 2), ("mambairv2_s", 3),
                                        ("mambairv2_light", 2), ("mambairv2_car", 1), ("mambairv2_dn", 1)])
def test_detects_released_presets_at_each_scale(name, scale):
    torch.manual_seed(0)
    net = build_model(name, **({"upscale": scale} if scale != 1 else {}))
    from smt.models.presets import preset
    arch, config = preset(name)
    _assert_detects(net.state_dict(), arch, {**config, "upscale": scale})


def test_extra_upsamplers_are_ignored_by_detection():
    net = build_model("hat_tiny", aux_scales=(2, 3))
    arch, kwargs = detect_architecture(net.state_dict())
    assert arch == "hat" and kwargs["upscale"] == 4 and "aux_scales" not in kwargs


def test_unrecognised_state_dict_says_what_was_expected():
    with pytest.raises(CheckpointError, match="cannot tell the architecture.*expected a HAT or MambaIRv2"):
        detect_architecture({"conv1.weight": torch.zeros(3, 3, 3, 3)}, "resnet.pth")
    bad = dict(HAT_REF["state_dict"])
    bad.pop("layers.0.residual_group.blocks.0.attn.relative_position_bias_table")
    with pytest.raises(CheckpointError, match="missing or malformed key"):
        detect_architecture(bad)
