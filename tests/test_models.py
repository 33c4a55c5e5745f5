"""HAT and MambaIRv2: parity with the official implementations (fixtures), loading, shapes, gradients."""
import pytest
import torch

from smt.models import HAT, PRESETS, CheckpointError, MambaIRv2, build_model, count_parameters, load_weights
from conftest import FIXTURES

HAT_REF = torch.load(FIXTURES / "hat_tiny_x4.pt", weights_only=True)
MAMBA_REF = torch.load(FIXTURES / "mambairv2_tiny_x4.pt", weights_only=True)


class _Capture:
    """Forward hook recording ``conv_after_body``'s output (the fixtures' ``feat_*``)."""

    def __init__(self, model):
        self.value = None
        model.conv_after_body.register_forward_hook(lambda m, i, o: setattr(self, "value", o))


def _check(out, feat, ref_out, ref_feat):
    assert out.shape == ref_out.shape
    assert (out - ref_out).abs().max().item() < 1e-4
    assert ((feat - ref_feat).abs().max() / max(1.0, ref_feat.abs().max().item())).item() < 1e-4


@pytest.mark.parametrize("attn_impl", ["reference", "sdpa"])
def test_hat_matches_official(attn_impl):
    model = HAT(**HAT_REF["config"], attn_impl=attn_impl).eval()
    cap = _Capture(model)
    model.load_state_dict(HAT_REF["state_dict"], strict=True)
    with torch.no_grad():
        for size in (16, 24):
            _check(model(HAT_REF[f"input_{size}"]), cap.value, HAT_REF[f"output_{size}"], HAT_REF[f"feat_{size}"])
        model.load_state_dict({**HAT_REF["state_dict"], **HAT_REF["perturbed_update"]}, strict=True)
        _check(model(HAT_REF["input_16"]), cap.value, HAT_REF["output_16_perturbed"], HAT_REF["feat_16_perturbed"])


@pytest.mark.parametrize("routing,key", [("gumbel", "seeded"), ("argmax", "argmax")])
@pytest.mark.parametrize("size", [16, 20])
@pytest.mark.parametrize("perturbed", ["", "_perturbed"])
def test_mambairv2_matches_official(routing, key, size, perturbed):
    model = MambaIRv2(**MAMBA_REF["config"], routing=routing).eval()
    cap = _Capture(model)
    sd = {**MAMBA_REF["state_dict"], **MAMBA_REF["perturbed_update"]} if perturbed else MAMBA_REF["state_dict"]
    model.load_state_dict(sd, strict=True)
    if routing == "gumbel":
        torch.manual_seed(MAMBA_REF["gumbel_seed"])
    with torch.no_grad():
        out = model(MAMBA_REF[f"input_{size}"])
    _check(out, cap.value, MAMBA_REF[f"output_{key}_{size}{perturbed}"], MAMBA_REF[f"feat_{key}_{size}{perturbed}"])


def test_gumbel_routing_is_random_and_argmax_is_not():
    model = MambaIRv2(**MAMBA_REF["config"]).eval()
    model.load_state_dict({**MAMBA_REF["state_dict"], **MAMBA_REF["perturbed_update"]})
    x = MAMBA_REF["input_16"]
    with torch.no_grad():
        a, b = model(x), model(x)
        torch.manual_seed(5)
        c = model(x)
        torch.manual_seed(5)
        d = model(x)
        model.routing = "argmax"
        e, f = model(x), model(x)
    assert not torch.equal(a, b) and torch.equal(c, d) and torch.equal(e, f)


def test_official_parameter_counts_and_keys():
    assert count_parameters(build_model("hat_l")) == 40_846_575
    assert count_parameters(build_model("mambairv2_l")) == 34_238_235
    assert set(HAT(**HAT_REF["config"]).state_dict()) == set(HAT_REF["state_dict"])
    assert set(MambaIRv2(**MAMBA_REF["config"]).state_dict()) == set(MAMBA_REF["state_dict"])


def test_unknown_preset_and_argument():
    with pytest.raises(KeyError, match="valid presets: hat_l"):
        build_model("hat_xl")
    with pytest.raises(TypeError):
        build_model("hat_tiny", embed_dimm=3)
    with pytest.raises(ValueError, match="upsampler='pixelshuffle'"):
        HAT(upsampler="nearest+conv")


@pytest.mark.parametrize("name", ["hat_tiny", "mambairv2_tiny"])
@pytest.mark.parametrize("hw", [(5, 7), (1, 1), (17, 9), (8, 8)])
def test_any_input_size(name, hw):
    model = build_model(name, **({"routing": "argmax"} if "mamba" in name else {})).eval()
    with torch.no_grad():
        y = model(torch.rand(2, 3, *hw))
    assert y.shape == (2, 3, 4 * hw[0], 4 * hw[1]) and torch.isfinite(y).all()


def test_padding_equals_official_within_one_mirror():
    """Padding inside forward equals padding the input the official way first and cropping the output."""
    model = HAT(**HAT_REF["config"]).eval()
    model.load_state_dict({**HAT_REF["state_dict"], **HAT_REF["perturbed_update"]})
    x = torch.rand(1, 3, 13, 11)
    padded = torch.nn.functional.pad(x, (0, 5, 0, 3), mode="reflect")
    with torch.no_grad():
        assert torch.allclose(model(x), model(padded)[..., :52, :44], atol=1e-6)


@pytest.mark.parametrize("name", ["hat_tiny", "mambairv2_tiny"])
def test_extra_scales_share_the_main_head_and_all_get_gradients(name):
    torch.manual_seed(0)
    model = build_model(name, aux_scales=(2, 3)).train()
    x = torch.rand(2, 3, 16, 16)
    outs = model.forward_multiscale(x)
    assert {s: tuple(o.shape) for s, o in outs.items()} == {4: (2, 3, 64, 64), 3: (2, 3, 48, 48), 2: (2, 3, 32, 32)}
    sum(o.square().mean() for o in outs.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    # the router of a MambaIRv2 layer gets gradient through the straight-through Gumbel estimator
    assert no_grad == []
    plain = build_model(name)
    assert set(plain.state_dict()) == {k for k in model.state_dict() if not k.startswith("aux_upsample.")}
    # the authors' heads: only the upsampler differs per scale (one conv_before_upsample, one conv_last)
    assert {k for k in model.state_dict() if k.startswith("aux_upsample.")} == {
        "aux_upsample.x2.0.weight", "aux_upsample.x2.0.bias", "aux_upsample.x3.0.weight", "aux_upsample.x3.0.bias"}
    assert tuple(model.aux_upsample["x3"][0].weight.shape)[:2] == (9 * model.conv_last.in_channels,
                                                                  model.conv_last.in_channels)
    model.eval()
    if hasattr(model, "routing"):
        model.routing = "argmax"
    with torch.no_grad():
        outs = model.forward_multiscale(x)
        feat, h, w = model._body(x)
        shared = model.conv_before_upsample(feat)
        for s, up in ((2, model.aux_upsample["x2"]), (3, model.aux_upsample["x3"])):
            expected = model.conv_last(up(shared)) / model.img_range + model.mean
            assert torch.equal(outs[s], expected[..., : h * s, : w * s])
        assert torch.equal(outs[4], model(x))


def test_load_official_into_aux_model_reports_heads(tmp_path):
    path = tmp_path / "official.pth"
    torch.save({"params_ema": HAT_REF["state_dict"]}, path)
    model = HAT(**HAT_REF["config"], aux_scales=(2, 3))
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint \(\d+\): aux_upsample\.x2"):
        load_weights(model, path)
    report = load_weights(model, path, allow_missing=("aux_upsample.",))
    assert report.container == "params_ema" and report.missing_allowed[0].startswith("aux_upsample.x2.")
    assert "left at init: aux_upsample.x2, aux_upsample.x3" in report.describe()
    assert torch.equal(model.conv_first.weight, HAT_REF["state_dict"]["conv_first.weight"].float())


def test_loader_unwraps_and_strips(tmp_path):
    from safetensors.torch import save_file

    sd = {k: v.float() if v.is_floating_point() else v for k, v in MAMBA_REF["state_dict"].items()}
    torch.save({"params": {f"module._orig_mod.{k}": v for k, v in sd.items()}}, tmp_path / "a.pth")
    save_file(sd, str(tmp_path / "b.safetensors"))
    for name, container in (("a.pth", "params"), ("b.safetensors", None)):
        model = MambaIRv2(**MAMBA_REF["config"])
        report = load_weights(model, tmp_path / name)
        assert report.container == container and report.loaded == len(sd)
        assert torch.equal(model.conv_last.bias, sd["conv_last.bias"])


def test_wrong_checkpoint_messages(tmp_path):
    torch.save({"params_ema": HAT_REF["state_dict"]}, tmp_path / "hat.pth")
    with pytest.raises(CheckpointError, match=r"does not fit MambaIRv2(.|\n)*not in the model"):
        load_weights(MambaIRv2(**MAMBA_REF["config"]), tmp_path / "hat.pth")
    bigger = HAT(**{**HAT_REF["config"], "embed_dim": 32})
    with pytest.raises(CheckpointError, match=r"shape mismatches(.|\n)*conv_first.weight: checkpoint \(30, 3, 3, 3\)"):
        load_weights(bigger, tmp_path / "hat.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth: not a readable checkpoint"):
        load_weights(bigger, tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        load_weights(bigger, tmp_path / "none.pth")


def test_presets_are_plain_data():
    for name, (arch, kwargs) in PRESETS.items():
        assert arch in ("hat", "mambairv2", "mambairv2light") and all(isinstance(k, str) for k in kwargs)


@pytest.mark.parametrize("name", ["hat_tiny", "mambairv2_tiny"])
def test_load_model_gives_the_same_model_from_preset_metadata_or_weights(name, tmp_path):
    """The one loader of a trained model: a training stage's export (with auxiliary heads) loads the same from
    its preset, from its metadata, and from the weights alone (architecture detected)."""
    import json

    from smt.models import load_model
    from smt.models.presets import preset
    from smt.train.checkpoint import save_safetensors

    torch.manual_seed(0)
    trained = build_model(name, aux_scales=(2, 3))
    arch, kwargs = preset(name)
    with_meta, bare = tmp_path / "with_meta.safetensors", tmp_path / "bare.safetensors"
    save_safetensors(trained.state_dict(), with_meta, {"arch": arch, "model_args": json.dumps({**kwargs,
                                                                                             "aux_scales": [2, 3]})})
    save_safetensors(trained.state_dict(), bare, {})
    x = torch.rand(1, 3, 12, 12)
    outs = []
    for net in (load_model(with_meta, name, routing="argmax"), load_model(with_meta, routing="argmax"),
                load_model(bare, routing="argmax")):
        assert not net.training and not any(k.startswith("aux_upsample.") for k in net.state_dict())  # main head only
        assert getattr(net, "routing", "argmax") == "argmax"
        with torch.no_grad():
            outs.append(net(x))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        load_model(tmp_path / "missing.safetensors", name)
