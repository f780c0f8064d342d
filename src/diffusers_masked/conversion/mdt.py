"""Official MDT / MDTv2 (sail-sg/MDT, ``masked_diffusion/models.py``) checkpoints -> `MDTv2Transformer2DModel`.

The released files (``mdt_xl2_v2_ckpt.pt``, ``mdt_xl2_v1_ckpt.pt``) are flat state dicts; ADM-style training
folders also hold ``ema_0.9999_*.pt`` (also flat). Mapping (official -> ours), per block group
``en_inblocks`` -> ``encoder_in_blocks``, ``en_outblocks`` -> ``encoder_out_blocks``, ``de_blocks`` ->
``decoder_blocks``, ``sideblocks.0`` -> ``side_interpolater.block`` (v1: ``blocks.i`` split into the encoder halves
and the last ``decode_layer`` decoder blocks):

| official | ours |
|---|---|
| ``x_embedder.proj`` / ``t_embedder.mlp.0``, ``.2`` / ``y_embedder.embedding_table`` (null id = num_classes) | ``patch_embed.proj`` / ``time_embed.timestep_embedder.linear_1``, ``linear_2`` / ``class_embed.embedding_table`` |
| ``pos_embed``, ``decoder_pos_embed`` (learned) | same names (copied) |
| ``mask_token`` | ``side_interpolater.mask_token`` |
| ``*.attn.qkv`` (fused) / ``attn.proj`` | ``attn1.to_q`` / ``to_k`` / ``to_v`` / ``attn1.to_out.0`` |
| ``*.attn.rel_pos_bias.relative_position_bias_table`` ((2G-1)^2 + 3, H) | ``rel_pos_bias.relative_position_bias_table`` ((2G-1)^2, H): the 3 never-indexed BEiT rows are dropped |
| ``*.attn.rel_pos_bias.relative_position_index`` (buffer) | dropped after checking it equals ours |
| ``*.mlp.fc1`` / ``fc2`` / ``adaLN_modulation.1`` / ``skip_linear`` | ``ff.net.0.proj`` / ``ff.net.2`` / ``adaln_modulation`` / ``skip_linear`` |
| ``final_layer.adaLN_modulation.1`` / ``final_layer.linear`` | ``final_layer.adaln_modulation`` / ``proj_out`` |

The network predicts epsilon and the learned-range variance for integer DDPM timesteps 0..999;
`mdt_scheduler` gives the matching `DDPMScheduler` (1000 linear betas 1e-4..0.02, ``variance_type="learned_range"``).
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, Optional, Union

import torch

from ..models.transformer_mdt import MDTv2Transformer2DModel, relative_position_index
from .common import (
    ConversionError,
    KeyTracker,
    StateDict,
    check_against_model,
    imagenet_id2label,
    load_official_state_dict,
    model_shapes,
    raise_if_problems,
    save_converted_pipeline,
    split_qkv,
)

#: MDT v1 checkpoints do not store the decoder depth; the released v1 XL/2 used 2.
MDT_V1_DECODE_LAYER = 2


def _count(sd: StateDict, prefix: str) -> int:
    ids = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    if ids and ids != set(range(len(ids))):
        raise ConversionError(f"{prefix}* block indices are not contiguous: {sorted(ids)}.")
    return len(ids)


def detect_mdt_version(sd: StateDict) -> str:
    """"v2" when the state dict has ``en_inblocks.*`` keys, "v1" when it has ``blocks.*`` keys."""
    if any(k.startswith("en_inblocks.") for k in sd):
        return "v2"
    if any(k.startswith("blocks.") for k in sd):
        return "v1"
    raise ConversionError(
        f"Not an official MDT state dict: neither 'en_inblocks.*' (MDTv2) nor 'blocks.*' (MDT v1) keys; first keys: "
        f"{sorted(sd)[:8]}."
    )


def _block_sources(sd: StateDict, version: str, decode_layer: Optional[int]) -> Dict[str, list]:
    """Our block group -> list of official block prefixes, in order."""
    if version == "v2":
        return {
            "encoder_in_blocks": [f"en_inblocks.{i}" for i in range(_count(sd, "en_inblocks."))],
            "encoder_out_blocks": [f"en_outblocks.{i}" for i in range(_count(sd, "en_outblocks."))],
            "decoder_blocks": [f"de_blocks.{i}" for i in range(_count(sd, "de_blocks."))],
        }
    depth = _count(sd, "blocks.")
    dl = MDT_V1_DECODE_LAYER if decode_layer is None else int(decode_layer)
    enc = depth - dl
    if dl < 1 or enc < 2 or enc % 2:
        raise ConversionError(
            f"MDT v1 checkpoint with {depth} blocks and decode_layer={dl}: MDTv2Transformer2DModel needs an even "
            "number (>= 2) of encoder blocks; pass the decode_layer the checkpoint was trained with."
        )
    half = enc // 2
    return {
        "encoder_in_blocks": [f"blocks.{i}" for i in range(half)],
        "encoder_out_blocks": [f"blocks.{i}" for i in range(half, enc)],
        "decoder_blocks": [f"blocks.{i}" for i in range(enc, depth)],
    }


def config_from_official_state_dict(official_sd: StateDict, decode_layer: Optional[int] = None) -> Dict[str, Any]:
    """`MDTv2Transformer2DModel` config matching an official MDT / MDTv2 state dict (sizes from tensor shapes).

    ``decode_layer`` is only needed for MDT v1 checkpoints (their keys do not tell it; default 2 = the release)."""
    sd = official_sd
    version = detect_mdt_version(sd)
    if version == "v2" and decode_layer is not None and int(decode_layer) != _count(sd, "de_blocks."):
        raise ConversionError(
            f"decode_layer={decode_layer} but this MDTv2 checkpoint has {_count(sd, 'de_blocks.')} de_blocks."
        )
    groups = _block_sources(sd, version, decode_layer)
    if version == "v2" and len(groups["encoder_in_blocks"]) != len(groups["encoder_out_blocks"]):
        raise ConversionError("MDTv2 checkpoint with different numbers of en_inblocks and en_outblocks.")
    first = groups["encoder_in_blocks"][0]
    for key in ("x_embedder.proj.weight", "pos_embed", f"{first}.attn.rel_pos_bias.relative_position_bias_table"):
        if key not in sd:
            raise ConversionError(f"Not an official MDT state dict: {key!r} is missing.")
    w = sd["x_embedder.proj.weight"]
    hidden, in_channels, patch = w.shape[0], w.shape[1], w.shape[2]
    n_tokens = sd["pos_embed"].shape[1]
    grid = int(round(math.sqrt(n_tokens)))
    if grid * grid != n_tokens:
        raise ConversionError(f"pos_embed has {n_tokens} tokens, not a square grid.")
    heads = sd[f"{first}.attn.rel_pos_bias.relative_position_bias_table"].shape[1]
    out_dim = sd["final_layer.linear.weight"].shape[0] if "final_layer.linear.weight" in sd else 2 * patch * patch * in_channels
    out_channels = out_dim // (patch * patch)
    num_classes = sd["y_embedder.embedding_table.weight"].shape[0] - 1 if "y_embedder.embedding_table.weight" in sd else None
    mlp_hidden = sd[f"{first}.mlp.fc1.weight"].shape[0] if f"{first}.mlp.fc1.weight" in sd else 4 * hidden
    n_dec = len(groups["decoder_blocks"])
    return dict(
        sample_size=grid * patch,
        patch_size=patch,
        in_channels=in_channels,
        out_channels=out_channels,
        hidden_size=hidden,
        num_layers=len(groups["encoder_in_blocks"]) + len(groups["encoder_out_blocks"]) + n_dec,
        num_decoder_layers=n_dec,
        num_attention_heads=heads,
        mlp_ratio=mlp_hidden / hidden,
        num_classes=num_classes,
        learn_sigma=out_channels == 2 * in_channels,
        long_skip_connections=version == "v2",
        dense_input_shortcut=version == "v2",
        norm_eps=1e-6,
    )


def _convert_block(t: KeyTracker, src: str, dst: str, out: StateDict, grid: int, problems: list) -> None:
    qkv_w, qkv_b = t.get(f"{src}.attn.qkv.weight"), t.get(f"{src}.attn.qkv.bias")
    if qkv_w is not None:
        q_w, k_w, v_w, q_b, k_b, v_b = split_qkv(qkv_w, qkv_b)
        for name, wt, bs in (("to_q", q_w, q_b), ("to_k", k_w, k_b), ("to_v", v_w, v_b)):
            out[f"{dst}.attn1.{name}.weight"] = wt
            if bs is not None:
                out[f"{dst}.attn1.{name}.bias"] = bs
    pairs = [
        ("attn.proj", "attn1.to_out.0"),
        ("mlp.fc1", "ff.net.0.proj"),
        ("mlp.fc2", "ff.net.2"),
        ("adaLN_modulation.1", "adaln_modulation"),
    ]
    if t.has(f"{src}.skip_linear.weight"):
        pairs.append(("skip_linear", "skip_linear"))
    for s, d in pairs:
        for p in ("weight", "bias"):
            v = t.get(f"{src}.{s}.{p}")
            if v is not None:
                out[f"{dst}.{d}.{p}"] = v
    n_offsets = (2 * grid - 1) ** 2
    table = t.get(f"{src}.attn.rel_pos_bias.relative_position_bias_table")
    if table is not None:
        if table.shape[0] == n_offsets + 3:  # BEiT's 3 cls-token rows: never indexed without a cls token
            table = table[:n_offsets]
        out[f"{dst}.rel_pos_bias.relative_position_bias_table"] = table
    key = f"{src}.attn.rel_pos_bias.relative_position_index"
    if t.has(key):
        idx = t.get(key)
        ref = relative_position_index(grid)
        if tuple(idx.shape) != tuple(ref.shape) or not torch.equal(idx.long(), ref):
            problems.append(f"{key}: not the standard 2-D relative index of a {grid}x{grid} grid")


def convert_mdt_state_dict(
    official_sd: StateDict, config: Optional[Dict[str, Any]] = None, decode_layer: Optional[int] = None
) -> StateDict:
    """Map an official MDT v1 / MDTv2 state dict to `MDTv2Transformer2DModel` keys.

    Raises `ConversionError` listing every missing official key, every official key left unmapped, every
    non-standard relative-position index, and every shape that does not fit the model built from ``config``
    (default: `config_from_official_state_dict`)."""
    sd = official_sd
    version = detect_mdt_version(sd)
    config = dict(config) if config is not None else config_from_official_state_dict(sd, decode_layer)
    grid = config["sample_size"] // config["patch_size"]
    if version == "v1":
        n_dec = config["num_decoder_layers"]
    else:
        n_dec = None
    groups = _block_sources(sd, version, n_dec if version == "v1" else None)
    t = KeyTracker(sd)
    out: StateDict = {}
    problems: list = []
    for p in ("weight", "bias"):
        v = t.get(f"x_embedder.proj.{p}")
        if v is not None:
            out[f"patch_embed.proj.{p}"] = v
        for i, j in ((0, 1), (2, 2)):
            v = t.get(f"t_embedder.mlp.{i}.{p}")
            if v is not None:
                out[f"time_embed.timestep_embedder.linear_{j}.{p}"] = v
    if config.get("num_classes") is not None:
        v = t.get("y_embedder.embedding_table.weight")
        if v is not None:
            out["class_embed.embedding_table.weight"] = v
    for name in ("pos_embed", "decoder_pos_embed"):
        v = t.get(name)
        if v is not None:
            out[name] = v
    v = t.get("mask_token")
    if v is not None:
        out["side_interpolater.mask_token"] = v
    for dst_group, sources in groups.items():
        for i, src in enumerate(sources):
            _convert_block(t, src, f"{dst_group}.{i}", out, grid, problems)
    _convert_block(t, "sideblocks.0", "side_interpolater.block", out, grid, problems)
    for s, d in (("final_layer.adaLN_modulation.1", "adaln_modulation"), ("final_layer.linear", "proj_out")):
        for p in ("weight", "bias"):
            v = t.get(f"{s}.{p}")
            if v is not None:
                out[f"final_layer.{d}.{p}"] = v
    raise_if_problems("MDT", missing=t.missing, unmapped=t.unused(), incompatible=problems)
    check_against_model(out, model_shapes(MDTv2Transformer2DModel, config), "MDTv2Transformer2DModel")
    return out


def mdt_scheduler(**overrides: Any):
    """`DDPMScheduler` of the official diffusion: 1000 steps, linear betas 1e-4..0.02, epsilon prediction,
    learned-range variance (guided-diffusion's ``learn_sigma``). The official FID runs respace to 250 steps
    (``num_inference_steps=250`` here; diffusers' ``timestep_spacing="linspace"`` reproduces the respacing)."""
    from diffusers import DDPMScheduler

    kwargs = dict(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=0.0001,
        beta_end=0.02,
        prediction_type="epsilon",
        variance_type="learned_range",
        clip_sample=False,
        timestep_spacing="linspace",
    )
    kwargs.update(overrides)
    return DDPMScheduler(**kwargs)


def load_mdt_transformer(official_sd: StateDict, decode_layer: Optional[int] = None) -> MDTv2Transformer2DModel:
    """Official state dict -> a loaded, eval-mode `MDTv2Transformer2DModel` (strict load)."""
    config = config_from_official_state_dict(official_sd, decode_layer)
    converted = convert_mdt_state_dict(official_sd, config)
    model = MDTv2Transformer2DModel(**config)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def convert_mdt_checkpoint(
    checkpoint_path: Union[str, os.PathLike],
    output_dir: Optional[Union[str, os.PathLike]] = None,
    vae_path: Optional[Union[str, os.PathLike]] = None,
    id2label: Optional[Dict[int, str]] = None,
    use_ema: bool = True,
    decode_layer: Optional[int] = None,
    torch_dtype: Optional[torch.dtype] = None,
):
    """Convert an official MDT / MDTv2 checkpoint file into an `MDTv2Pipeline` (saved to ``output_dir`` if given).
    Returns ``(pipeline, info)``."""
    from ..pipelines.pipeline_mdt import MDTv2Pipeline

    sd, info = load_official_state_dict(checkpoint_path, prefer_ema=use_ema)
    info["version"] = detect_mdt_version(sd)
    transformer = load_mdt_transformer(sd, decode_layer)
    if id2label is None and transformer.config.num_classes == 1000:
        id2label = imagenet_id2label()
    scheduler = mdt_scheduler()
    if output_dir is None:
        return MDTv2Pipeline(transformer=transformer, scheduler=scheduler, vae=None, id2label=id2label), info
    pipe = save_converted_pipeline(
        MDTv2Pipeline, output_dir, transformer, scheduler, vae_path, id2label, torch_dtype=torch_dtype
    )
    return pipe, info
