"""Official MaskDiT (Anima-Lab/MaskDiT, ``models/maskdit.py``) checkpoints -> `MaskDiTTransformer2DModel`.

The official file stores ``{'model', 'ema', 'opt', 'args'}``; the sampling scripts use ``ema``, and so does this
converter. Keys carry the ``model.`` prefix of ``EDMPrecond``. Mapping (official -> ours):

| official | ours |
|---|---|
| ``x_embedder.proj`` | ``patch_embed.proj`` |
| ``t_embedder.mlp.0`` / ``.2`` | ``time_embed.timestep_embedder.linear_1`` / ``linear_2`` (sinusoid shift 0, cos first) |
| ``y_embedder.embedding_table.weight`` (D, K): bias-free Linear on a one-hot, null = all-zero one-hot | ``class_embed.embedding_table.weight`` (K+1, D) = [W^T; 0]: null id K has a zero row |
| ``blocks.i.attn.qkv`` (fused) | ``encoder_blocks.i.attn1.to_q`` / ``to_k`` / ``to_v`` |
| ``blocks.i.attn.proj`` / ``mlp.fc1`` / ``mlp.fc2`` / ``adaLN_modulation.1`` | ``attn1.to_out.0`` / ``ff.net.0.proj`` / ``ff.net.2`` / ``adaln_modulation`` |
| ``decoder_layer.adaLN_modulation.1`` / ``decoder_layer.linear`` | ``encoder_to_decoder.adaln_modulation`` / ``proj`` |
| ``decoder_blocks.i.*`` | ``decoder_blocks.i.*`` (as the encoder blocks) |
| ``final_layer.adaLN_modulation.1`` / ``final_layer.linear`` | ``final_layer.adaln_modulation`` / ``proj_out`` |
| ``mask_token`` (absent when ``mae_loss_coef == 0``: the official code then fills zeros) | ``mask_token`` (zeros then) |
| ``pos_embed`` / ``decoder_pos_embed`` (frozen sin-cos) | dropped after checking they equal our fixed tables |

The network predicts EDM's raw F with ``timestep = c_noise = ln(sigma) / 4``; `maskdit_scheduler` gives the
`EDMEulerScheduler` whose preconditioning is exactly the official ``EDMPrecond`` (sigma_data 0.5).
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, Optional, Union

import torch

from ..models.layers import sincos_pos_embed_2d
from ..models.transformer_maskdit import MaskDiTTransformer2DModel
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
    strip_prefix,
)

#: Official presets: encoder width -> heads (DiT-S/B/L/XL/H). The state dict does not store the head count.
MASKDIT_HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16, 1280: 16}
#: The official decoder is hard-coded to 16 heads.
MASKDIT_DECODER_HEADS = 16
#: EDM sampler settings of the official scripts (sample.py / eval_latent.py).
MASKDIT_EDM = dict(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0)

# Official features our model does not have: their keys make the converter refuse the checkpoint.
_UNSUPPORTED = {
    "cls_token": "pad_cls_token=True (a cls token in the encoder)",
    "cls_token_embedder.": "pad_cls_token=True (cls-token conditioning of the decoder)",
    "feat_embedder.": "ext_feature_dim > 0 (external feature conditioning)",
    "enc_feat_embedder.": "use_encoder_feat=True (encoder-feature conditioning)",
}


def _count_blocks(sd: StateDict, prefix: str) -> int:
    ids = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    if ids and ids != set(range(len(ids))):
        raise ConversionError(f"{prefix}* block indices are not contiguous: {sorted(ids)}.")
    return len(ids)


def _normalise(sd: StateDict) -> StateDict:
    return strip_prefix(sd, "model.")


def config_from_official_state_dict(
    official_sd: StateDict,
    num_attention_heads: Optional[int] = None,
    decoder_num_attention_heads: int = MASKDIT_DECODER_HEADS,
) -> Dict[str, Any]:
    """`MaskDiTTransformer2DModel` config that matches an official MaskDiT state dict.

    Sizes are read from tensor shapes. The head counts are not stored: ``num_attention_heads`` defaults to the
    official preset for the encoder width (S 6, B 12, L/XL/H 16) and the decoder uses the official 16 heads.
    """
    sd = _normalise(official_sd)
    found = sorted({desc for k in sd for p, desc in _UNSUPPORTED.items() if k.startswith(p)})
    if found:
        raise ConversionError(
            "This MaskDiT checkpoint uses features MaskDiTTransformer2DModel does not implement: " + "; ".join(found)
        )
    if "x_embedder.proj.weight" not in sd:
        raise ConversionError(
            "Not an official MaskDiT state dict: 'x_embedder.proj.weight' is missing "
            f"(first keys: {sorted(sd)[:8]})."
        )
    if "decoder_layer.linear.weight" not in sd:
        raise ConversionError(
            "This MaskDiT checkpoint has no decoder (use_decoder=False); MaskDiTTransformer2DModel always has the "
            "MAE-style decoder and cannot express a decoder-free DiT."
        )
    w = sd["x_embedder.proj.weight"]
    hidden, in_channels, patch = w.shape[0], w.shape[1], w.shape[2]
    if "pos_embed" not in sd:
        raise ConversionError("'pos_embed' is missing: it fixes the input size (needed to build the model).")
    n_tokens = sd["pos_embed"].shape[1]
    grid = int(round(math.sqrt(n_tokens)))
    if grid * grid != n_tokens:
        raise ConversionError(f"pos_embed has {n_tokens} tokens, not a square grid.")
    if num_attention_heads is None:
        if hidden not in MASKDIT_HEADS_BY_WIDTH:
            raise ConversionError(
                f"Encoder width {hidden} is not an official preset width ({sorted(MASKDIT_HEADS_BY_WIDTH)}); "
                "pass num_attention_heads (CLI: --num_attention_heads) explicitly."
            )
        num_attention_heads = MASKDIT_HEADS_BY_WIDTH[hidden]
    decoder_hidden = sd["decoder_layer.linear.weight"].shape[0]
    mlp_hidden = sd["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in sd else 4 * hidden
    out_dim = sd["final_layer.linear.weight"].shape[0] if "final_layer.linear.weight" in sd else patch * patch * in_channels
    out_channels = out_dim // (patch * patch)
    num_classes = sd["y_embedder.embedding_table.weight"].shape[1] if "y_embedder.embedding_table.weight" in sd else None
    return dict(
        sample_size=grid * patch,
        patch_size=patch,
        in_channels=in_channels,
        out_channels=out_channels,
        hidden_size=hidden,
        num_layers=_count_blocks(sd, "blocks."),
        num_attention_heads=num_attention_heads,
        decoder_hidden_size=decoder_hidden,
        num_decoder_layers=_count_blocks(sd, "decoder_blocks."),
        decoder_num_attention_heads=decoder_num_attention_heads,
        mlp_ratio=mlp_hidden / hidden,
        num_classes=num_classes,
        learn_sigma=out_channels == 2 * in_channels,
        norm_eps=1e-6,
    )


def _convert_block(t: KeyTracker, src: str, dst: str, out: StateDict) -> None:
    qkv_w, qkv_b = t.get(f"{src}.attn.qkv.weight"), t.get(f"{src}.attn.qkv.bias")
    if qkv_w is not None:
        q_w, k_w, v_w, q_b, k_b, v_b = split_qkv(qkv_w, qkv_b)
        for name, wt, bs in (("to_q", q_w, q_b), ("to_k", k_w, k_b), ("to_v", v_w, v_b)):
            out[f"{dst}.attn1.{name}.weight"] = wt
            if bs is not None:
                out[f"{dst}.attn1.{name}.bias"] = bs
    for s, d in (
        ("attn.proj", "attn1.to_out.0"),
        ("mlp.fc1", "ff.net.0.proj"),
        ("mlp.fc2", "ff.net.2"),
        ("adaLN_modulation.1", "adaln_modulation"),
    ):
        for p in ("weight", "bias"):
            v = t.get(f"{src}.{s}.{p}")
            if v is not None:
                out[f"{dst}.{d}.{p}"] = v


def _check_sincos(t: KeyTracker, key: str, dim: int, grid: int, problems: list) -> None:
    v = t.get(key)
    if v is None:
        return
    ref = sincos_pos_embed_2d(dim, grid)
    if tuple(v.shape) != tuple(ref.shape):
        problems.append(f"{key}: shape {tuple(v.shape)} vs sin-cos table {tuple(ref.shape)}")
    elif (v.float() - ref).abs().max().item() > 1e-4:
        problems.append(
            f"{key}: differs from the fixed 2-D sin-cos table (max diff "
            f"{(v.float() - ref).abs().max().item():.3g}); our model only has fixed sin-cos positions"
        )


def convert_maskdit_state_dict(official_sd: StateDict, config: Optional[Dict[str, Any]] = None) -> StateDict:
    """Map an official MaskDiT state dict (with or without the ``model.`` prefix) to
    `MaskDiTTransformer2DModel` keys.

    Raises `ConversionError` listing every missing official key, every official key left unmapped, every
    position table that is not the fixed sin-cos one, and every shape that does not fit the model built from
    ``config`` (default: `config_from_official_state_dict`).
    """
    sd = _normalise(official_sd)
    config = dict(config) if config is not None else config_from_official_state_dict(sd)
    t = KeyTracker(sd)
    out: StateDict = {}
    problems: list = []
    hidden, dec = config["hidden_size"], config["decoder_hidden_size"]
    grid = config["sample_size"] // config["patch_size"]

    for p in ("weight", "bias"):
        v = t.get(f"x_embedder.proj.{p}")
        if v is not None:
            out[f"patch_embed.proj.{p}"] = v
        for i, j in ((0, 1), (2, 2)):
            v = t.get(f"t_embedder.mlp.{i}.{p}")
            if v is not None:
                out[f"time_embed.timestep_embedder.linear_{j}.{p}"] = v
    if config.get("num_classes") is not None:
        w = t.get("y_embedder.embedding_table.weight")
        if w is not None:
            # One-hot @ W^T == Embedding rows; the official null class is the zero vector -> a zero row at id K.
            out["class_embed.embedding_table.weight"] = torch.cat([w.t(), w.new_zeros(1, w.shape[0])], dim=0)
    for i in range(config["num_layers"]):
        _convert_block(t, f"blocks.{i}", f"encoder_blocks.{i}", out)
    for i in range(config["num_decoder_layers"]):
        _convert_block(t, f"decoder_blocks.{i}", f"decoder_blocks.{i}", out)
    for s, d in (("decoder_layer.adaLN_modulation.1", "adaln_modulation"), ("decoder_layer.linear", "proj")):
        for p in ("weight", "bias"):
            v = t.get(f"{s}.{p}")
            if v is not None:
                out[f"encoder_to_decoder.{d}.{p}"] = v
    for s, d in (("final_layer.adaLN_modulation.1", "adaln_modulation"), ("final_layer.linear", "proj_out")):
        for p in ("weight", "bias"):
            v = t.get(f"{s}.{p}")
            if v is not None:
                out[f"final_layer.{d}.{p}"] = v
    if t.has("mask_token"):
        out["mask_token"] = t.get("mask_token")
    else:  # mae_loss_coef == 0: the official forward inserts zeros at masked places
        out["mask_token"] = torch.zeros(1, 1, dec)
    _check_sincos(t, "pos_embed", hidden, grid, problems)
    _check_sincos(t, "decoder_pos_embed", dec, grid, problems)

    raise_if_problems("MaskDiT", missing=t.missing, unmapped=t.unused(), incompatible=problems)
    check_against_model(out, model_shapes(MaskDiTTransformer2DModel, config), "MaskDiTTransformer2DModel")
    return out


def maskdit_scheduler(**overrides: Any):
    """`EDMEulerScheduler` configured as the official EDM sampler (sigma 0.002..80, rho 7, sigma_data 0.5).

    The official sampler is EDM's 2nd-order Heun (40 steps); diffusers' EDM schedulers are Euler
    (`EDMEulerScheduler`) and DPM-Solver++ (`EDMDPMSolverMultistepScheduler`, 2nd order); both use the same
    sigmas and preconditioning."""
    from diffusers import EDMEulerScheduler

    return EDMEulerScheduler(**{**MASKDIT_EDM, "prediction_type": "epsilon", **overrides})


def load_maskdit_transformer(
    official_sd: StateDict, num_attention_heads: Optional[int] = None, decoder_num_attention_heads: int = MASKDIT_DECODER_HEADS
) -> MaskDiTTransformer2DModel:
    """Official state dict -> a loaded, eval-mode `MaskDiTTransformer2DModel` (strict load)."""
    config = config_from_official_state_dict(official_sd, num_attention_heads, decoder_num_attention_heads)
    converted = convert_maskdit_state_dict(official_sd, config)
    model = MaskDiTTransformer2DModel(**config)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def convert_maskdit_checkpoint(
    checkpoint_path: Union[str, os.PathLike],
    output_dir: Optional[Union[str, os.PathLike]] = None,
    vae_path: Optional[Union[str, os.PathLike]] = None,
    id2label: Optional[Dict[int, str]] = None,
    use_ema: bool = True,
    num_attention_heads: Optional[int] = None,
    decoder_num_attention_heads: int = MASKDIT_DECODER_HEADS,
    torch_dtype: Optional[torch.dtype] = None,
):
    """Convert an official MaskDiT checkpoint file into a `MaskDiTPipeline` (saved to ``output_dir`` if given).

    ImageNet class names are attached when ``num_classes == 1000`` and a package that ships them is installed
    (or pass ``id2label``); otherwise the pipeline takes class ids only. Returns ``(pipeline, info)`` where
    ``info["source"]`` names the checkpoint entry converted ("ema", "model", ...).
    """
    from ..pipelines.pipeline_maskdit import MaskDiTPipeline

    sd, info = load_official_state_dict(checkpoint_path, prefer_ema=use_ema)
    transformer = load_maskdit_transformer(sd, num_attention_heads, decoder_num_attention_heads)
    if id2label is None and transformer.config.num_classes == 1000:
        id2label = imagenet_id2label()
    scheduler = maskdit_scheduler()
    if output_dir is None:
        return MaskDiTPipeline(transformer=transformer, scheduler=scheduler, vae=None, id2label=id2label), info
    pipe = save_converted_pipeline(
        MaskDiTPipeline, output_dir, transformer, scheduler, vae_path, id2label, torch_dtype=torch_dtype
    )
    return pipe, info
