"""The architecture of a checkpoint from its state dict alone: family and constructor arguments.

Official ``.pth`` files carry weights only. Every argument that changes a tensor's name or shape is read back from
the keys and shapes: the family (HAT: ``overlap_attn``; MambaIRv2: ``assm.selectiveScan``; MambaIRv2Light: a
gated MLP, ``convffn1.sg``), ``in_chans`` and ``embed_dim`` (``conv_first``), ``depths`` (blocks per group),
``num_heads`` and ``window_size`` (the relative-position bias tables), the MLP ratios, HAT's compress/squeeze
factors and overlap ratio, MambaIRv2's ``d_state``/``inner_rank``/``num_tokens``/kernel size, ``resi_connection``,
and the head: ``upsampler`` and ``upscale``. Arguments that leave no trace in the weights (``img_size`` without
absolute position embedding, HAT's ``conv_scale``) keep the official release values. The extra upsamplers of
multi-scale training (ours: ``aux_upsample.*``; the authors' layouts are renamed to ours first,
:mod:`smt.models.layouts`) are not part of the architecture used for inference and are ignored.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

import torch

from smt.models.loading import CheckpointError

__all__ = ["detect_architecture", "EXPECTED"]

EXPECTED = ("a HAT or MambaIRv2 / MambaIRv2Light state dict (keys such as 'conv_first.weight', "
            "'layers.0.residual_group.blocks.0.attn.relative_position_bias_table' (HAT) or "
            "'layers.0.residual_group.layers.0.assm.selectiveScan.A_logs' (MambaIRv2))")


def _groups(state: Mapping[str, torch.Tensor], block: str) -> list[int]:
    """Blocks per residual group: ``layers.<i>.residual_group.<block>.<j>.`` keys."""
    pattern = re.compile(rf"^layers\.(\d+)\.residual_group\.{block}\.(\d+)\.")
    counts: dict[int, int] = {}
    for k in state:
        m = pattern.match(k)
        if m:
            i, j = int(m.group(1)), int(m.group(2))
            counts[i] = max(counts.get(i, 0), j + 1)
    if not counts or sorted(counts) != list(range(len(counts))):
        raise CheckpointError(f"no consecutive residual groups ('layers.<i>.residual_group.{block}.<j>.*')")
    return [counts[i] for i in range(len(counts))]


def _window(table: torch.Tensor) -> int:
    side = math.isqrt(table.shape[0])  # the bias table has (2 ws - 1)^2 rows
    if side * side != table.shape[0] or side % 2 == 0:
        raise CheckpointError(f"relative position bias table of {table.shape[0]} rows is not (2*ws-1)^2")
    return (side + 1) // 2


def _residual_groups(state: Mapping[str, torch.Tensor], block: str,
                     bias_table: str) -> tuple[tuple[int, ...], tuple[int, ...], int, str]:
    """``(depths, num_heads, window_size, b0)`` of a body of residual groups of ``<block>``s: blocks per group,
    heads per group and the window size from the relative-position bias table ``bias_table`` of each group's
    first block, and ``b0``, the key prefix of the first group's first block."""
    depths = _groups(state, block)
    first = [f"layers.{i}.residual_group.{block}.0." for i in range(len(depths))]
    heads = tuple(state[b + bias_table].shape[1] for b in first)
    return tuple(depths), heads, _window(state[first[0] + bias_table]), first[0]


def _head(state: Mapping[str, torch.Tensor], embed_dim: int, in_chans: int) -> dict[str, Any]:
    """``upsampler``, ``upscale`` (and ``num_feat`` where the head has one) from the head's tensors."""
    if "conv_up1.weight" in state:
        return {"upsampler": "nearest+conv", "upscale": 4, "num_feat": state["conv_up1.weight"].shape[0]}
    if "conv_before_upsample.0.weight" in state:
        num_feat = state["conv_before_upsample.0.weight"].shape[0]
        convs = sorted(int(m.group(1)) for k in state if (m := re.match(r"^upsample\.(\d+)\.weight$", k)))
        if not convs:
            raise CheckpointError("'conv_before_upsample' without 'upsample.<i>.weight'")
        ratio = state[f"upsample.{convs[0]}.weight"].shape[0] // num_feat
        scale = 3 if ratio == 9 else 2 ** len(convs)
        return {"upsampler": "pixelshuffle", "upscale": scale, "num_feat": num_feat}
    if "upsample.0.weight" in state:
        out = state["upsample.0.weight"].shape[0]
        scale = math.isqrt(out // in_chans)
        if scale * scale * in_chans != out:
            raise CheckpointError(f"'upsample.0.weight' has {out} output channels, not scale^2 * {in_chans}")
        return {"upsampler": "pixelshuffledirect", "upscale": scale}
    if "conv_last.weight" in state and state["conv_last.weight"].shape[1] == embed_dim:
        return {"upsampler": "", "upscale": 1}
    raise CheckpointError("no reconstruction head found (expected 'conv_before_upsample', 'upsample.0', "
                          "'conv_up1' or 'conv_last' keys)")


def _resi(state: Mapping[str, torch.Tensor]) -> str:
    return "3conv" if "conv_after_body.0.weight" in state else "1conv"


def detect_architecture(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> tuple[str, dict]:
    """``(arch, kwargs)`` for :data:`smt.models.ARCHITECTURES` from a (canonicalised) state dict; raises
    :class:`CheckpointError` saying what was expected when the keys fit no known architecture."""
    try:
        return _detect(state)
    except (CheckpointError, KeyError, IndexError) as exc:
        why = exc.args[0] if isinstance(exc, CheckpointError) else f"missing or malformed key {exc}"
        raise CheckpointError(f"{source}: cannot tell the architecture from the weights ({why}); expected "
                              f"{EXPECTED}. Pass --model PRESET for other checkpoints.") from None


def _detect(state: Mapping[str, torch.Tensor]) -> tuple[str, dict]:
    if "conv_first.weight" not in state:
        raise CheckpointError("no 'conv_first.weight'")
    embed_dim, in_chans = state["conv_first.weight"].shape[:2]
    common: dict[str, Any] = {"in_chans": in_chans, "embed_dim": embed_dim, "img_range": 1.0,
                              "patch_norm": "patch_embed.norm.weight" in state,
                              "resi_connection": _resi(state)}
    if "absolute_pos_embed" in state:
        common.update(ape=True, img_size=math.isqrt(state["absolute_pos_embed"].shape[1]))
    common.update(_head(state, embed_dim, in_chans))
    if any(".overlap_attn." in k for k in state):
        depths, heads, ws, b0 = _residual_groups(state, "blocks", "attn.relative_position_bias_table")
        oca_side = math.isqrt(state["layers.0.residual_group.overlap_attn.relative_position_bias_table"].shape[0])
        ows = oca_side + 1 - ws  # the OCA table has (ws + ows - 1)^2 rows
        return "hat", {**common, "depths": depths, "num_heads": heads, "window_size": ws,
                       "compress_ratio": embed_dim // state[b0 + "conv_block.cab.0.weight"].shape[0],
                       "squeeze_factor": embed_dim // state[b0 + "conv_block.cab.3.attention.1.weight"].shape[0],
                       "conv_scale": 0.01, "overlap_ratio": (ows - ws) / ws,
                       "mlp_ratio": state[b0 + "mlp.fc1.weight"].shape[0] / embed_dim,
                       "qkv_bias": b0 + "attn.qkv.bias" in state}
    if any(".assm.selectiveScan." in k for k in state):
        depths, heads, ws, b0 = _residual_groups(state, "layers", "win_mhsa.relative_position_bias_table")
        light = b0 + "convffn1.sg.norm.weight" in state
        kwargs = {**common, "depths": depths, "num_heads": heads, "window_size": ws,
                  "d_state": state[b0 + "embeddingA.weight"].shape[1],
                  "inner_rank": state[b0 + "embeddingA.weight"].shape[0],
                  "num_tokens": state[b0 + "assm.embeddingB.weight"].shape[0],
                  "mlp_ratio": state[b0 + "assm.in_proj.0.weight"].shape[0] / embed_dim,
                  "qkv_bias": b0 + "wqkv.bias" in state}
        if not light:
            kwargs["convffn_kernel_size"] = state[b0 + "convffn1.dwconv.depthwise_conv.0.weight"].shape[-1]
        return ("mambairv2light" if light else "mambairv2"), kwargs
    raise CheckpointError("neither HAT ('overlap_attn') nor MambaIRv2 ('assm.selectiveScan') blocks")
