"""Model presets as plain data: architecture name + constructor arguments (x4 SR unless noted).

The L/base/S values are those of the official option files (XPixelGroup/HAT ``options/test/HAT*_SRx4*.yml``,
csguoh/MambaIR ``options/test/mambairv2/test_MambaIRv2_SR*_x4.yml``; ``mambairv2_light`` from
``test_MambaIRv2_lightSR_x4.yml``, ``mambairv2_dn`` (colour denoising, x1) from ``test_MambaIRv2_ColorDN_*.yml``,
``mambairv2_car`` (grayscale JPEG artefact removal, x1) from ``test_MambaIRv2_CAR_*.yml``; other scales of a
family: ``build_model(name, upscale=2)``). The ``*_tiny`` variants are ours: small
enough to train for minutes on two CPU cores in the demo profile, same block structure.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

__all__ = ["PRESETS", "preset"]

_X4 = {"img_size": 64, "upscale": 4, "img_range": 1.0, "upsampler": "pixelshuffle", "resi_connection": "1conv"}
_HAT = {**_X4, "window_size": 16, "compress_ratio": 3, "squeeze_factor": 30, "conv_scale": 0.01,
        "overlap_ratio": 0.5, "mlp_ratio": 2.0}
_MAMBA = {**_X4, "d_state": 16, "window_size": 16, "inner_rank": 64, "num_tokens": 128,
          "convffn_kernel_size": 5, "mlp_ratio": 2.0}

PRESETS: Mapping[str, tuple[str, Mapping[str, Any]]] = MappingProxyType({
    # 40,846,575 parameters
    "hat_l": ("hat", {**_HAT, "embed_dim": 180, "depths": (6,) * 12, "num_heads": (6,) * 12}),
    "hat": ("hat", {**_HAT, "embed_dim": 180, "depths": (6,) * 6, "num_heads": (6,) * 6}),
    "hat_s": ("hat", {**_HAT, "embed_dim": 144, "depths": (6,) * 6, "num_heads": (6,) * 6,
                      "compress_ratio": 24, "squeeze_factor": 24}),
    # 34,238,235 parameters
    "mambairv2_l": ("mambairv2", {**_MAMBA, "embed_dim": 174, "depths": (6,) * 9, "num_heads": (6,) * 9}),
    "mambairv2": ("mambairv2", {**_MAMBA, "embed_dim": 174, "depths": (6,) * 6, "num_heads": (6,) * 6}),
    "mambairv2_s": ("mambairv2", {**_MAMBA, "embed_dim": 132, "depths": (4,) * 6, "num_heads": (4,) * 6}),
    # the other released MambaIRv2 families (csguoh/MambaIR options/test/mambairv2/*.yml)
    "mambairv2_light": ("mambairv2light", {**_MAMBA, "upsampler": "pixelshuffledirect", "embed_dim": 48,
                                           "d_state": 8, "depths": (5,) * 4, "num_heads": (4,) * 4,
                                           "inner_rank": 32, "num_tokens": 64, "mlp_ratio": 1.0}),
    "mambairv2_dn": ("mambairv2", {**_MAMBA, "img_size": 128, "upscale": 1, "upsampler": "", "embed_dim": 174,
                                   "depths": (6,) * 6, "num_heads": (6,) * 6}),
    "mambairv2_car": ("mambairv2", {**_MAMBA, "img_size": 126, "in_chans": 1, "upscale": 1, "upsampler": "",
                                    "embed_dim": 174, "depths": (6,) * 6, "num_heads": (6,) * 6}),
    # demo variants: window 8, two groups of two blocks
    "hat_tiny": ("hat", {**_HAT, "img_size": 32, "window_size": 8, "embed_dim": 32, "depths": (2, 2),
                         "num_heads": (2, 2), "squeeze_factor": 8, "drop_path_rate": 0.0, "num_feat": 32}),
    "mambairv2_tiny": ("mambairv2", {**_MAMBA, "img_size": 32, "window_size": 8, "embed_dim": 32, "d_state": 8,
                                     "depths": (2, 2), "num_heads": (2, 2), "inner_rank": 16, "num_tokens": 16,
                                     "num_feat": 32}),
})


def preset(name: str) -> tuple[str, dict[str, Any]]:
    """``(architecture, kwargs)`` of preset ``name`` (a fresh, mutable copy of the kwargs)."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r} (valid presets: {', '.join(PRESETS)})")
    arch, kwargs = PRESETS[name]
    return arch, dict(kwargs)
