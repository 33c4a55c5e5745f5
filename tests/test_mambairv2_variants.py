"""The official MambaIRv2 checkpoint families beyond classic x4 SR: parity with the official code per family
(``tests/fixtures/mambairv2_variants.pt``: lightweight SR ``pixelshuffledirect``, real-world SR ``nearest+conv``,
x1 restoration ``''`` and ``MambaIRv2Light``), strict loading of the official key names, argument checks."""
import pytest
import torch

from smt.models import MambaIRv2, MambaIRv2Light
from conftest import FIXTURES

REF = torch.load(FIXTURES / "mambairv2_variants.pt", weights_only=True)
CLASSES = {"MambaIRv2": MambaIRv2, "MambaIRv2Light": MambaIRv2Light}


def _model(variant: str, routing: str):
    entry = REF[variant]
    model = CLASSES[entry["class"]](**entry["config"], routing=routing).eval()
    feats = {}
    model.conv_after_body.register_forward_hook(lambda m, i, o: feats.__setitem__("v", o))
    return model, feats


@pytest.mark.parametrize("variant", REF["variants"])
@pytest.mark.parametrize("routing,key", [("gumbel", "seeded"), ("argmax", "argmax")])
@pytest.mark.parametrize("perturbed", ["", "_perturbed"])
def test_variant_matches_official_within_1e4(variant, routing, key, perturbed):
    entry = REF[variant]
    model, feats = _model(variant, routing)
    sd = {**entry["state_dict"], **entry["perturbed_update"]} if perturbed else entry["state_dict"]
    model.load_state_dict(sd, strict=True)  # official names, nothing missing or extra
    if routing == "gumbel":
        torch.manual_seed(REF["gumbel_seed"])
    with torch.no_grad():
        out = model(entry["input"])
    ref_out, ref_feat = entry[f"output_{key}{perturbed}"], entry[f"feat_{key}{perturbed}"]
    assert out.shape == ref_out.shape
    assert (out - ref_out).abs().max().item() < 1e-4
    feat = feats["v"]
    assert ((feat - ref_feat).abs().max() / max(1.0, ref_feat.abs().max().item())).item() < 1e-4


def test_variant_state_dicts_have_exactly_the_official_keys():
    for variant in REF["variants"]:
        model, _ = _model(variant, "argmax")
        assert set(model.state_dict()) == set(REF[variant]["state_dict"]), variant


@pytest.mark.parametrize("kwargs,words", [
    ({"upsampler": "pixelshuffle_x"}, "upsampler must be one of"),
    ({"upsampler": "nearest+conv", "upscale": 2}, "upscale 4 only"),
    ({"upsampler": "", "upscale": 4}, "needs upscale 1"),
    ({"upsampler": "pixelshuffledirect", "upscale": 4, "aux_scales": (2,)}, "aux_scales need"),
])
def test_invalid_upsampler_arguments_are_refused(kwargs, words):
    with pytest.raises(ValueError, match=words):
        MambaIRv2(embed_dim=12, depths=(1,), num_heads=(1,), window_size=4, inner_rank=4, num_tokens=4, **kwargs)
