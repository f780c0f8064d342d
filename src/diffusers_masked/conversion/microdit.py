"""Official MicroDiT (SonyResearch/micro_diffusion, ``micro_diffusion/models/dit.py``) checkpoints ->
`DeferredMaskDiTTransformer2DModel`.

The released files (``ckpts/dit_*.pt``, all ``MicroDiT_XL_2`` at 512 px) are flat ``DiT`` state dicts; a full
``LatentDiffusion`` state dict (``dit.*`` next to ``vae.*`` / ``text_encoder.*``), ``{'ema': ...}`` / ``{'model': ...}``
containers (EMA first) and Composer checkpoints (``{'state': {'model': ...}}``) are accepted too. Mapping
(official -> ours), per block ``blocks.i`` -> ``transformer_blocks.i`` and ``patch_mixer.j`` -> ``patch_mixer_blocks.j``:

| official | ours |
|---|---|
| ``x_embedder.proj`` / ``t_embedder.mlp.0``, ``.2`` | ``patch_embed.proj`` / ``time_embed.timestep_embedder.linear_1``, ``linear_2`` |
| ``y_embedder.y_proj.fc1`` / ``norm`` / ``fc2`` | ``caption_projection.linear_1`` / ``norm`` / ``linear_2`` |
| ``y_emb_preprocess.*`` (the caption block) | ``caption_refiner.0.*`` (``attn.qkv`` split into ``attn.to_q/k/v``, ``attn.proj`` -> ``attn.to_out.0``) |
| ``pooled_y_emb_process.fc1`` / ``norm`` / ``fc2`` | ``caption_pooled_projection.linear_1`` / ``norm`` / ``linear_2`` |
| ``patch_mixer_map_xin`` / ``_xout`` / ``_y`` (LayerNorm, Linear) | ``patch_mixer_proj_in`` / ``_proj_out`` / ``patch_mixer_caption_proj`` |
| ``*.attn.qkv`` (rows q, k, v) / ``attn.proj`` | ``attn1.to_q`` / ``to_k`` / ``to_v`` / ``attn1.to_out.0`` |
| ``*.cross_attn.q_linear`` / ``kv_linear`` (rows k, v) / ``proj`` | ``attn2.to_q`` / ``to_k`` + ``to_v`` / ``attn2.to_out.0`` |
| ``*.norm1`` / ``norm2`` / ``norm3`` / ``adaLN_modulation.1`` | ``norm1`` / ``norm2`` / ``norm3`` / ``adaln_modulation`` |
| dense ``*.mlp.w1`` (SiLU gate) / ``w2`` (value) / ``w3`` | ``ff.net.0.proj`` = ``cat([w2, w1])`` (our SwiGLU chunks [value, gate]) / ``ff.net.2`` |
| MoE ``*.mlp.gate`` / ``w1`` (E, in, out) / ``w2`` (E, in, out) | ``ff.router`` / ``ff.experts.up_proj`` / ``down_proj`` (same layout, copied) |
| ``final_layer.norm_final`` / ``adaLN_modulation.1`` / ``linear`` | ``final_layer.norm_out`` / ``adaln_modulation`` / ``proj_out`` |
| ``pos_embed`` (fixed sin-cos buffer) | dropped after checking it equals our table (its interpolation scale is detected) |
| ``mask_token`` (zero buffer) | dropped after checking it is zero (our model fills masked outputs with zeros) |

Not stored in the state dict and therefore arguments: the attention head width (``attention_head_dim``; default
64 for width 1024 = XL, 32 for width 512 = Tiny) and the MoE capacity factor (``expert_capacity``, default 2.0 as
both presets). Layer-wise widths, MoE placement, expert count, caption width and resolution are read from shapes.

The network predicts EDM's raw F with ``timestep = c_noise = ln(sigma) / 4``; `microdit_scheduler` gives the
`EDMEulerScheduler` whose preconditioning is the official one (``sigma_data=0.9``). Official conditioning: the
DFN5B OpenCLIP ViT-H/14 text tower's 77 tokens after ``ln_final`` (padding included, no attention mask); the
unconditional caption is all zeros.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..models.layers import sincos_pos_embed_2d
from ..models.transformer_deferred_maskdit import (
    DeferredMaskDiTTransformer2DModel,
    attention_width,
    ff_width,
    is_moe_block,
    layerwise_block_widths,
)
from .common import (
    ConversionError,
    KeyTracker,
    StateDict,
    check_against_model,
    extract_state_dict,
    load_checkpoint_file,
    model_shapes,
    raise_if_problems,
    save_converted_pipeline,
    split_qkv,
)

#: Official presets: backbone width -> attention head width (MicroDiT_XL_2, MicroDiT_Tiny_2).
MICRODIT_HEAD_DIM_BY_WIDTH = {1024: 64, 512: 32}
#: Capacity factor of both official presets (not stored in checkpoints).
MICRODIT_EXPERT_CAPACITY = 2.0
#: EDM constants of the official LatentDiffusion (sigma_data hard-coded to 0.9).
MICRODIT_EDM = dict(sigma_min=0.002, sigma_max=80.0, sigma_data=0.9, rho=7.0)
#: Layer-wise scaling of both presets (np.linspace end points) and the patch-mixer MLP ratios seen in the code.
_PRESET_ATTENTION_RATIOS = (0.5, 1.0)
_PRESET_FF_RATIOS = (0.5, 4.0)
_MIXER_MLP_RATIO_CANDIDATES = (4.0, 1.0, 2.0)
_MULTIPLE_OF_CANDIDATES = (256, 128, 64, 32, 16, 8, 4, 2, 1)
_POS_SCALE_CANDIDATES = (1.0, 2.0, 4.0, 0.5, 3.0, 8.0)
#: Parts of a full LatentDiffusion state dict that are not the DiT (not converted, reported in ``info``).
_NON_DIT_PREFIXES = ("vae.", "text_encoder.")
#: Linear layers that carry a bias only when the official model was built with ``use_bias=True``.
_USE_BIAS_LAYERS = (
    "attn.qkv.", "attn.proj.", "cross_attn.q_linear.", "cross_attn.kv_linear.", "cross_attn.proj.",
    "mlp.w1.", "mlp.w2.", "mlp.w3.", "patch_mixer_map_xin.1.", "patch_mixer_map_xout.1.", "patch_mixer_map_y.1.",
)


def _count(sd: StateDict, prefix: str) -> int:
    ids = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    if ids and ids != set(range(len(ids))):
        raise ConversionError(f"{prefix}* block indices are not contiguous: {sorted(ids)}.")
    return len(ids)


def select_dit_state_dict(sd: StateDict) -> Tuple[StateDict, List[str]]:
    """The DiT part of a state dict: strips the ``dit.`` prefix of a full ``LatentDiffusion`` state dict and sets
    aside its ``vae.*`` / ``text_encoder.*`` keys (returned as the second value). Other keys are kept as they are,
    so the converter reports them as unmapped."""
    if not any(k.startswith("dit.") for k in sd):
        return dict(sd), []
    dit: StateDict = {}
    ignored: List[str] = []
    for k, v in sd.items():
        if k.startswith("dit."):
            dit[k[len("dit."):]] = v
        elif k.startswith(_NON_DIT_PREFIXES):
            ignored.append(k)
        else:
            dit[k] = v
    return dit, ignored


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------
def _observed_widths(sd: StateDict, prefix: str, n: int) -> Tuple[List[int], List[int], List[bool]]:
    """Per block: self-attention width, MLP hidden width (dense SwiGLU or expert), MoE or not."""
    att, ff, moe = [], [], []
    for i in range(n):
        p = f"{prefix}{i}"
        if f"{p}.attn.qkv.weight" not in sd:
            raise ConversionError(f"{p}.attn.qkv.weight is missing: cannot read the block's attention width.")
        att.append(sd[f"{p}.attn.qkv.weight"].shape[0] // 3)
        if f"{p}.mlp.gate.weight" in sd:
            if f"{p}.mlp.w1" not in sd:
                raise ConversionError(f"{p}.mlp.w1 is missing: cannot read the expert width.")
            ff.append(sd[f"{p}.mlp.w1"].shape[2])
            moe.append(True)
        else:
            if f"{p}.mlp.w1.weight" not in sd:
                raise ConversionError(f"{p}.mlp.w1.weight is missing: cannot read the MLP width.")
            ff.append(sd[f"{p}.mlp.w1.weight"].shape[0])
            moe.append(False)
    return att, ff, moe


def _exact_attention_ratio(dim: int, width: int, head_dim: int) -> float:
    # A ratio whose truncation gives exactly ``width`` (a multiple of 2 * head_dim); ``width == dim`` <=> ratio 1.
    ratio = 1.0 if width == dim else (width + 0.5) / dim
    if attention_width(dim, ratio, head_dim) != width:
        raise ConversionError(
            f"Self-attention width {width} of a {dim}-wide block is not a multiple of 2 * attention_head_dim "
            f"({2 * head_dim}); the official rounding cannot produce it. Check --attention_head_dim."
        )
    return ratio


def _exact_ff_ratio(dim: int, width: int, multiple_of: int, moe: bool) -> float:
    # Dense SwiGLU keeps int(2 * int(dim * r) / 3): pick int(dim * r) = ceil(3 * width / 2) so that equals width.
    requested = width if moe else math.ceil(3 * width / 2)
    ratio = (requested + 0.5) / dim
    if ff_width(dim, ratio, multiple_of, moe) != width:
        raise ConversionError(f"Cannot express an MLP width of {width} for a {dim}-wide block.")
    return ratio


def _experts_every_n(moe_backbone: Sequence[bool], moe_mixer: Sequence[bool], num_experts: int) -> int:
    for n in range(1, max(len(moe_backbone), len(moe_mixer)) + 2):
        if [is_moe_block(i, len(moe_backbone), num_experts, n, False) for i in range(len(moe_backbone))] == list(
            moe_backbone
        ) and [is_moe_block(i, len(moe_mixer), num_experts, n, True) for i in range(len(moe_mixer))] == list(moe_mixer):
            return n
    raise ConversionError(
        "The MoE blocks of this checkpoint (backbone "
        f"{[i for i, m in enumerate(moe_backbone) if m]}, patch-mixer {[i for i, m in enumerate(moe_mixer) if m]}) "
        "do not follow the official every-n-th-block placement that DeferredMaskDiTTransformer2DModel implements."
    )


def _detect_pos_scale(table: torch.Tensor, dim: int, grid: int) -> Optional[float]:
    for scale in _POS_SCALE_CANDIDATES:
        ref = sincos_pos_embed_2d(dim, grid, scale)
        if tuple(ref.shape) == tuple(table.shape) and (table.float() - ref).abs().max().item() <= 1e-4:
            return scale
    return None


def config_from_official_state_dict(
    official_sd: StateDict,
    attention_head_dim: Optional[int] = None,
    expert_capacity: float = MICRODIT_EXPERT_CAPACITY,
    pos_interpolation_scale: Optional[float] = None,
) -> Dict[str, Any]:
    """`DeferredMaskDiTTransformer2DModel` config that matches an official MicroDiT ``DiT`` state dict.

    Widths, depths, MoE placement, expert count, caption width, resolution and the position-table scale are read
    from the tensors. ``attention_head_dim`` defaults to the official preset for the width (1024 -> 64, 512 -> 32)
    and ``expert_capacity`` to the presets' 2.0: neither is stored in the checkpoint. The layer-wise ratios are the
    presets' ``(0.5, 1.0)`` / ``(0.5, 4.0)`` when they reproduce every width, else exact per-block values.
    """
    sd, _ = select_dit_state_dict(official_sd)
    for key in ("x_embedder.proj.weight", "y_embedder.y_proj.fc1.weight", "pos_embed"):
        if key not in sd:
            raise ConversionError(
                f"Not an official MicroDiT DiT state dict: {key!r} is missing (first keys: {sorted(sd)[:8]})."
            )
    biased = sorted(k for k in sd if k.endswith(".bias") and any(s in k for s in _USE_BIAS_LAYERS))
    if biased:
        raise ConversionError(
            "This MicroDiT checkpoint was built with use_bias=True (biases on attention / MLP / mixer-map linears, "
            f"e.g. {biased[:3]}); DeferredMaskDiTTransformer2DModel implements the presets' use_bias=False only."
        )
    w = sd["x_embedder.proj.weight"]
    hidden, in_channels, patch = w.shape[0], w.shape[1], w.shape[2]
    n_tokens = sd["pos_embed"].shape[1]
    grid = int(round(math.sqrt(n_tokens)))
    if grid * grid != n_tokens:
        raise ConversionError(f"pos_embed has {n_tokens} tokens, not a square grid.")
    if attention_head_dim is None:
        if hidden not in MICRODIT_HEAD_DIM_BY_WIDTH:
            raise ConversionError(
                f"Backbone width {hidden} is not an official preset width ({sorted(MICRODIT_HEAD_DIM_BY_WIDTH)}); "
                "pass attention_head_dim (CLI: --attention_head_dim) explicitly."
            )
        attention_head_dim = MICRODIT_HEAD_DIM_BY_WIDTH[hidden]
    if pos_interpolation_scale is None:
        pos_interpolation_scale = _detect_pos_scale(sd["pos_embed"], hidden, grid)
        if pos_interpolation_scale is None:
            raise ConversionError(
                f"pos_embed is not the fixed 2-D sin-cos table for any interpolation scale in {_POS_SCALE_CANDIDATES}; "
                "pass pos_interpolation_scale (CLI: --pos_interpolation_scale) if it is another one."
            )

    num_layers = _count(sd, "blocks.")
    mixer_layers = _count(sd, "patch_mixer.")
    if mixer_layers == 0 and any(k.startswith("patch_mixer_map_") for k in sd):
        raise ConversionError(
            "patch_mixer_depth=0 with patch_mixer_dim != dim (mixer maps but no mixer blocks): not expressible; "
            "DeferredMaskDiTTransformer2DModel maps to the mixer width only when it has mixer blocks."
        )
    mixer_dim = sd["patch_mixer.0.norm1.weight"].shape[0] if mixer_layers else hidden
    att, ff, moe = _observed_widths(sd, "blocks.", num_layers)
    m_att, m_ff, m_moe = _observed_widths(sd, "patch_mixer.", mixer_layers)
    gates = [k for k in sd if k.endswith(".mlp.gate.weight")]
    num_experts = sd[gates[0]].shape[0] if gates else 0
    experts_every_n = _experts_every_n(moe, m_moe, num_experts) if gates else 2
    refiner_ff = sd["y_emb_preprocess.mlp.w1.weight"].shape[0] if "y_emb_preprocess.mlp.w1.weight" in sd else None
    if len(set(m_att)) > 1:
        raise ConversionError(f"Patch-mixer blocks of different attention widths {m_att}: the official mixer has one ratio.")
    out_dim = sd["final_layer.linear.weight"].shape[0] if "final_layer.linear.weight" in sd else patch * patch * in_channels

    base = dict(
        sample_size=grid * patch,
        patch_size=patch,
        in_channels=in_channels,
        out_channels=out_dim // (patch * patch),
        hidden_size=hidden,
        num_layers=num_layers,
        attention_head_dim=attention_head_dim,
        patch_mixer_layers=mixer_layers,
        patch_mixer_hidden_size=mixer_dim,
        patch_mixer_attention_ratio=(
            _exact_attention_ratio(mixer_dim, m_att[0], attention_head_dim) if mixer_layers else 1.0
        ),
        num_experts=num_experts,
        expert_capacity=float(expert_capacity),
        experts_every_n=experts_every_n,
        caption_channels=sd["y_embedder.y_proj.fc1.weight"].shape[1],
        num_caption_refiner_layers=1,
        num_classes=None,
        mask_strategy="deferred",
        timestep_frequency_dim=sd["t_embedder.mlp.0.weight"].shape[1] if "t_embedder.mlp.0.weight" in sd else 512,
        pos_interpolation_scale=float(pos_interpolation_scale),
        attention_bias=False,
        norm_eps=1e-6,
    )
    all_ff = ff + m_ff + ([refiner_ff] if refiner_ff else [])
    multiples = [m for m in _MULTIPLE_OF_CANDIDATES if all(f % m == 0 for f in all_ff)]
    observed = (att, ff, moe, m_att, m_ff, m_moe, refiner_ff)

    # 1) The presets' linspace ratios, as few parameters as possible in the saved config.
    for m in multiples:
        for mixer_mlp in _MIXER_MLP_RATIO_CANDIDATES:
            cfg = dict(base, attention_ratios=_PRESET_ATTENTION_RATIOS, ff_ratios=_PRESET_FF_RATIOS,
                       ff_multiple_of=m, patch_mixer_mlp_ratio=mixer_mlp, caption_refiner_mlp_ratio=4.0)
            if _widths_of(cfg) == observed:
                return cfg
    # 2) Exact per-block ratios (any official multipliers); the largest rounding multiple that divides every width.
    m = multiples[0]
    cfg = dict(
        base,
        attention_ratios=[_exact_attention_ratio(hidden, a, attention_head_dim) for a in att],
        ff_ratios=[_exact_ff_ratio(hidden, f, m, e) for f, e in zip(ff, moe)],
        ff_multiple_of=m,
        patch_mixer_mlp_ratio=[_exact_ff_ratio(mixer_dim, f, m, e) for f, e in zip(m_ff, m_moe)] or 1.0,
        caption_refiner_mlp_ratio=(
            4.0 if refiner_ff is None or ff_width(hidden, 4.0, m, False) == refiner_ff
            else _exact_ff_ratio(hidden, refiner_ff, m, False)
        ),
    )
    if _widths_of(cfg) != observed:
        raise ConversionError(f"Could not reproduce the block widths of this checkpoint: {observed}.")
    return cfg


def _widths_of(cfg: Mapping[str, Any]) -> tuple:
    common = dict(ff_multiple_of=cfg["ff_multiple_of"], num_experts=cfg["num_experts"],
                  experts_every_n=cfg["experts_every_n"])
    bb = layerwise_block_widths(cfg["hidden_size"], cfg["num_layers"], cfg["attention_head_dim"],
                                cfg["attention_ratios"], cfg["ff_ratios"], **common)
    mx = layerwise_block_widths(cfg["patch_mixer_hidden_size"], cfg["patch_mixer_layers"], cfg["attention_head_dim"],
                                cfg["patch_mixer_attention_ratio"], cfg["patch_mixer_mlp_ratio"], is_patch_mixer=True,
                                **common)
    refiner = ff_width(cfg["hidden_size"], cfg["caption_refiner_mlp_ratio"], cfg["ff_multiple_of"], moe=False)
    return (
        [w.attention_dim for w in bb], [w.ff_inner_dim for w in bb], [w.is_moe for w in bb],
        [w.attention_dim for w in mx], [w.ff_inner_dim for w in mx], [w.is_moe for w in mx], refiner,
    )


# ----------------------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------------------
def _copy(t: KeyTracker, out: StateDict, pairs: Sequence[Tuple[str, str]], params: Sequence[str] = ("weight",)) -> None:
    for src, dst in pairs:
        for p in params:
            v = t.get(f"{src}.{p}")
            if v is not None:
                out[f"{dst}.{p}"] = v


def _convert_swiglu(t: KeyTracker, src: str, dst: str, out: StateDict) -> None:
    gate, value, down = t.get(f"{src}.w1.weight"), t.get(f"{src}.w2.weight"), t.get(f"{src}.w3.weight")
    if gate is not None and value is not None:
        # Official: w3(silu(w1 x) * w2 x). Ours: one Linear whose output chunks are [value, gate].
        out[f"{dst}.net.0.proj.weight"] = torch.cat([value, gate], dim=0)
    if down is not None:
        out[f"{dst}.net.2.weight"] = down


def _convert_self_attention(t: KeyTracker, src: str, dst: str, out: StateDict) -> None:
    qkv = t.get(f"{src}.qkv.weight")
    if qkv is not None:
        q, k, v, *_ = split_qkv(qkv, None)
        out[f"{dst}.to_q.weight"], out[f"{dst}.to_k.weight"], out[f"{dst}.to_v.weight"] = q, k, v
    _copy(t, out, [(f"{src}.proj", f"{dst}.to_out.0")])


def _convert_block(t: KeyTracker, src: str, dst: str, out: StateDict) -> None:
    _copy(t, out, [(f"{src}.norm{i}", f"{dst}.norm{i}") for i in (1, 2, 3)])
    _convert_self_attention(t, f"{src}.attn", f"{dst}.attn1", out)
    _copy(t, out, [(f"{src}.cross_attn.q_linear", f"{dst}.attn2.to_q"), (f"{src}.cross_attn.proj", f"{dst}.attn2.to_out.0")])
    kv = t.get(f"{src}.cross_attn.kv_linear.weight")
    if kv is not None:
        if kv.shape[0] % 2:
            raise ConversionError(f"{src}.cross_attn.kv_linear.weight has {kv.shape[0]} rows, not a multiple of 2.")
        out[f"{dst}.attn2.to_k.weight"], out[f"{dst}.attn2.to_v.weight"] = kv.chunk(2, dim=0)
    _copy(t, out, [(f"{src}.adaLN_modulation.1", f"{dst}.adaln_modulation")], ("weight", "bias"))
    if t.has(f"{src}.mlp.gate.weight"):  # expert-choice MoE: (E, in, out) weights, the layout of our experts
        _copy(t, out, [(f"{src}.mlp.gate", f"{dst}.ff.router")])
        for s, d in (("w1", "up_proj"), ("w2", "down_proj")):
            v = t.get(f"{src}.mlp.{s}")
            if v is not None:
                out[f"{dst}.ff.experts.{d}"] = v
    else:
        _convert_swiglu(t, f"{src}.mlp", f"{dst}.ff", out)


def convert_microdit_state_dict(official_sd: StateDict, config: Optional[Dict[str, Any]] = None) -> StateDict:
    """Map an official MicroDiT ``DiT`` state dict to `DeferredMaskDiTTransformer2DModel` keys.

    Raises `ConversionError` listing every missing official key, every official key left unmapped, a position
    table that is not the fixed sin-cos one, a non-zero ``mask_token``, and every shape that does not fit the model
    built from ``config`` (default: `config_from_official_state_dict`)."""
    sd, _ = select_dit_state_dict(official_sd)
    config = dict(config) if config is not None else config_from_official_state_dict(sd)
    t = KeyTracker(sd)
    out: StateDict = {}
    problems: List[str] = []

    _copy(t, out, [("x_embedder.proj", "patch_embed.proj")], ("weight", "bias"))
    _copy(t, out, [("t_embedder.mlp.0", "time_embed.timestep_embedder.linear_1"),
                   ("t_embedder.mlp.2", "time_embed.timestep_embedder.linear_2")], ("weight", "bias"))
    for src, dst in (("y_embedder.y_proj", "caption_projection"), ("pooled_y_emb_process", "caption_pooled_projection")):
        _copy(t, out, [(f"{src}.fc1", f"{dst}.linear_1"), (f"{src}.fc2", f"{dst}.linear_2")], ("weight", "bias"))
        _copy(t, out, [(f"{src}.norm", f"{dst}.norm")])
    _copy(t, out, [("y_emb_preprocess.norm1", "caption_refiner.0.norm1"), ("y_emb_preprocess.norm2", "caption_refiner.0.norm2")])
    _convert_self_attention(t, "y_emb_preprocess.attn", "caption_refiner.0.attn", out)
    _convert_swiglu(t, "y_emb_preprocess.mlp", "caption_refiner.0.ff", out)
    if config["patch_mixer_layers"] and config["patch_mixer_hidden_size"] != config["hidden_size"]:
        for src, dst in (("patch_mixer_map_xin", "patch_mixer_proj_in"), ("patch_mixer_map_xout", "patch_mixer_proj_out"),
                         ("patch_mixer_map_y", "patch_mixer_caption_proj")):
            _copy(t, out, [(f"{src}.0", f"{dst}.0"), (f"{src}.1", f"{dst}.1")])
    for j in range(config["patch_mixer_layers"]):
        _convert_block(t, f"patch_mixer.{j}", f"patch_mixer_blocks.{j}", out)
    for i in range(config["num_layers"]):
        _convert_block(t, f"blocks.{i}", f"transformer_blocks.{i}", out)
    _copy(t, out, [("final_layer.norm_final", "final_layer.norm_out")])
    _copy(t, out, [("final_layer.adaLN_modulation.1", "final_layer.adaln_modulation"),
                   ("final_layer.linear", "final_layer.proj_out")], ("weight", "bias"))

    grid = config["sample_size"] // config["patch_size"]
    pos = t.get("pos_embed")
    if pos is not None:
        ref = sincos_pos_embed_2d(config["hidden_size"], grid, config["pos_interpolation_scale"])
        if tuple(pos.shape) != tuple(ref.shape):
            problems.append(f"pos_embed: shape {tuple(pos.shape)} vs sin-cos table {tuple(ref.shape)}")
        elif (pos.float() - ref).abs().max().item() > 1e-4:
            problems.append(
                f"pos_embed: differs from the fixed 2-D sin-cos table with interpolation scale "
                f"{config['pos_interpolation_scale']} (max diff {(pos.float() - ref).abs().max().item():.3g}); "
                "our model only has fixed sin-cos positions"
            )
    mask_token = t.get("mask_token")
    if mask_token is not None and bool(mask_token.ne(0).any()):
        problems.append("mask_token: not zero; our model predicts exactly 0 at masked positions, as the official buffer")

    raise_if_problems("MicroDiT", missing=t.missing, unmapped=t.unused(), incompatible=problems)
    check_against_model(out, model_shapes(DeferredMaskDiTTransformer2DModel, config), "DeferredMaskDiTTransformer2DModel")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Loading, scheduler, pipeline
# ----------------------------------------------------------------------------------------------------------------
def load_microdit_state_dict(
    path: Union[str, os.PathLike], prefer_ema: bool = True
) -> Tuple[StateDict, Dict[str, Any]]:
    """Load a MicroDiT checkpoint file -> ``(dit_state_dict, info)``.

    Accepts a flat ``DiT`` state dict (the release), a ``LatentDiffusion`` state dict (``dit.*`` keys; ``vae.*`` and
    ``text_encoder.*`` are set aside and listed in ``info["ignored"]``), ``{'ema' / 'model': ...}`` containers (EMA
    first) and Composer checkpoints (``{'state': {'model': ...}}``). Floating tensors are returned in float32."""
    obj = load_checkpoint_file(path)
    composer = isinstance(obj, Mapping) and isinstance(obj.get("state"), Mapping) and "model" in obj["state"]
    sd, source = extract_state_dict(obj["state"] if composer else obj, prefer_ema=prefer_ema)
    if composer:
        source = f"state.{source}"
    sd, ignored = select_dit_state_dict(sd)
    info: Dict[str, Any] = {"source": source, "ignored": ignored}
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, info


def microdit_scheduler(**overrides: Any):
    """`EDMEulerScheduler` with the official EDM constants (sigma 0.002..80, Karras rho 7, ``sigma_data=0.9``,
    the network predicting F: ``prediction_type="epsilon"``).

    The official sampler is EDM's 2nd-order Heun (30 steps, last step Euler); diffusers' EDM schedulers are Euler
    and DPM-Solver++ (`EDMDPMSolverMultistepScheduler`) on the same sigmas and preconditioning."""
    from diffusers import EDMEulerScheduler

    kwargs = dict(MICRODIT_EDM, sigma_schedule="karras", prediction_type="epsilon")
    kwargs.update(overrides)
    return EDMEulerScheduler(**kwargs)


def load_microdit_transformer(
    official_sd: StateDict,
    attention_head_dim: Optional[int] = None,
    expert_capacity: float = MICRODIT_EXPERT_CAPACITY,
    pos_interpolation_scale: Optional[float] = None,
) -> DeferredMaskDiTTransformer2DModel:
    """Official state dict -> a loaded, eval-mode `DeferredMaskDiTTransformer2DModel` (strict load)."""
    config = config_from_official_state_dict(official_sd, attention_head_dim, expert_capacity, pos_interpolation_scale)
    converted = convert_microdit_state_dict(official_sd, config)
    model = DeferredMaskDiTTransformer2DModel(**config)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def load_local_text_encoder(path: Union[str, os.PathLike], tokenizer_path: Optional[Union[str, os.PathLike]] = None):
    """(text_encoder, tokenizer) from a local transformers folder (nothing is downloaded).

    A full CLIP folder (``model_type == "clip"``) gives its text tower (`CLIPTextModel`); any other folder loads with
    `AutoModel`. The pipeline uses the encoder's ``last_hidden_state``: for the official conditioning that is the
    DFN5B CLIP ViT-H/14 text tower after its final LayerNorm (1024 wide)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--text_encoder must be a local transformers folder; {path!r} is not one.")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if getattr(config, "model_type", None) in ("clip", "clip_text_model"):
        encoder = CLIPTextModel.from_pretrained(path, local_files_only=True)
    else:
        encoder = AutoModel.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer_path or path), local_files_only=True)
    return encoder.eval(), tokenizer


def convert_microdit_checkpoint(
    checkpoint_path: Union[str, os.PathLike],
    output_dir: Optional[Union[str, os.PathLike]] = None,
    vae_path: Optional[Union[str, os.PathLike]] = None,
    text_encoder_path: Optional[Union[str, os.PathLike]] = None,
    tokenizer_path: Optional[Union[str, os.PathLike]] = None,
    use_ema: bool = True,
    attention_head_dim: Optional[int] = None,
    expert_capacity: float = MICRODIT_EXPERT_CAPACITY,
    pos_interpolation_scale: Optional[float] = None,
    torch_dtype: Optional[torch.dtype] = None,
):
    """Convert an official MicroDiT checkpoint file into a `DeferredMaskDiTPipeline` (saved to ``output_dir`` if
    given). The text encoder is optional (``text_encoder_path``: a local transformers folder whose hidden size equals
    the checkpoint's caption width); without one the pipeline takes ``prompt_embeds``. Returns ``(pipeline, info)``."""
    from ..pipelines.pipeline_deferred_maskdit import DeferredMaskDiTPipeline

    sd, info = load_microdit_state_dict(checkpoint_path, prefer_ema=use_ema)
    transformer = load_microdit_transformer(sd, attention_head_dim, expert_capacity, pos_interpolation_scale)
    text_encoder = tokenizer = None
    if text_encoder_path is not None:
        text_encoder, tokenizer = load_local_text_encoder(text_encoder_path, tokenizer_path)
        width = getattr(text_encoder.config, "hidden_size", None)
        if width != transformer.config.caption_channels:
            raise ValueError(
                f"The text encoder at {os.fspath(text_encoder_path)!r} is {width} wide but this checkpoint expects "
                f"{transformer.config.caption_channels}-wide caption tokens (official: DFN5B CLIP ViT-H/14, 1024)."
            )
    scheduler = microdit_scheduler()
    extra = dict(text_encoder=text_encoder, tokenizer=tokenizer)
    if output_dir is None:
        return DeferredMaskDiTPipeline(transformer=transformer, scheduler=scheduler, vae=None, **extra), info
    pipe = save_converted_pipeline(
        DeferredMaskDiTPipeline, output_dir, transformer, scheduler, vae_path, None, torch_dtype=torch_dtype, **extra
    )
    return pipe, info
