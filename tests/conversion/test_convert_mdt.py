"""Official MDTv2 / MDT v1 -> MDTv2Transformer2DModel: exact equivalence on fixtures made by the official code."""

from __future__ import annotations

import json
import os
import runpy
import sys

import pytest
import torch
from safetensors.torch import load_file

from diffusers_masked.conversion import ConversionError
from diffusers_masked.conversion.mdt import (
    config_from_official_state_dict,
    convert_mdt_checkpoint,
    convert_mdt_state_dict,
    load_mdt_transformer,
    mdt_scheduler,
)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "mdt")
TOL = 1e-5


def _load(suffix):
    sd = load_file(os.path.join(FIXTURE, f"official_state_dict{suffix}.safetensors"))
    io = load_file(os.path.join(FIXTURE, f"io{suffix}.safetensors"))
    cfg = json.load(open(os.path.join(FIXTURE, f"config{suffix}.json")))
    return sd, io, cfg


@pytest.fixture(scope="module", params=["", "_v1"], ids=["v2", "v1"])
def case(request):
    sd, io, cfg = _load(request.param)
    return sd, io, cfg, load_mdt_transformer(sd)


def test_config_read_from_shapes(case):
    sd, _, cfg, model = case
    c = model.config
    assert c.sample_size == cfg["input_size"] and c.hidden_size == cfg["hidden_size"]
    assert c.num_layers == cfg["depth"] and c.num_decoder_layers == cfg["decode_layer"]
    assert c.num_attention_heads == cfg["num_heads"] and c.num_classes == cfg["num_classes"] and c.out_channels == 8
    assert c.long_skip_connections == (cfg["class"] == "MDTv2")


def test_unmasked_inference_matches_official(case):
    _, io, _, model = case
    with torch.no_grad():
        out = model(io["x"], io["timestep"], class_labels=io["class_labels"])
    assert io["out_eval"].abs().mean() > 0.01
    assert (out.sample - io["out_eval"]).abs().max().item() <= TOL


def test_masked_training_forward_matches_official(case):
    _, io, _, model = case
    with torch.no_grad():
        out = model(io["x"], io["timestep"], class_labels=io["class_labels"], ids_keep=io["ids_keep"])
    assert torch.equal(out.mask, io["mask"].bool())
    assert (io["out_train_masked"] - io["out_eval"]).abs().max() > 1e-2  # masking changes the output
    assert (out.sample - io["out_train_masked"]).abs().max().item() <= TOL


@pytest.fixture(scope="module")
def v2():
    return _load("")


def _expect_error(sd, config, *needles):
    with pytest.raises(ConversionError) as err:
        convert_mdt_state_dict(sd, config)
    for n in needles:
        assert n in str(err.value), str(err.value)


def test_missing_extra_and_wrong_shape_keys_are_listed(v2):
    sd0 = v2[0]
    config = config_from_official_state_dict(sd0)
    sd = dict(sd0)
    del sd["de_blocks.1.skip_linear.bias"], sd["decoder_pos_embed"]
    _expect_error(sd, config, "missing (2)", "de_blocks.1.skip_linear.bias", "decoder_pos_embed")
    sd = dict(sd0)
    sd["en_inblocks.0.attn.q_norm.weight"] = torch.ones(8)
    sd["ema_decay"] = torch.tensor(0.9999)
    _expect_error(sd, config, "unmapped (2)", "en_inblocks.0.attn.q_norm.weight", "ema_decay")
    sd = dict(sd0)
    sd["en_outblocks.0.mlp.fc2.weight"] = torch.zeros(16, 60)
    sd["sideblocks.0.attn.rel_pos_bias.relative_position_bias_table"] = torch.zeros(52, 3)
    _expect_error(
        sd, config, "shape mismatch (2)", "encoder_out_blocks.0.ff.net.2.weight: converted (16, 60) vs model (16, 64)",
        "side_interpolater.block.rel_pos_bias.relative_position_bias_table",
    )


def test_nonstandard_relative_index_is_refused(v2):
    sd = dict(v2[0])
    idx = sd["en_inblocks.0.attn.rel_pos_bias.relative_position_index"].clone()
    sd["en_inblocks.0.attn.rel_pos_bias.relative_position_index"] = idx.t().contiguous()
    _expect_error(sd, config_from_official_state_dict(v2[0]), "relative_position_index")


def test_v1_decode_layer_is_a_choice(v2):
    sd1, io1, _ = _load("_v1")
    with pytest.raises(ConversionError, match="even number"):
        config_from_official_state_dict(sd1, decode_layer=3)
    with pytest.raises(ConversionError, match="de_blocks"):
        config_from_official_state_dict(v2[0], decode_layer=3)


def test_scheduler_is_the_official_diffusion():
    import numpy as np

    s = mdt_scheduler()
    assert s.config.variance_type == "learned_range" and s.config.num_train_timesteps == 1000
    assert np.allclose(s.betas.double().numpy(), np.linspace(1e-4, 0.02, 1000), atol=1e-9)
    s.set_timesteps(250)
    assert np.array_equal(s.timesteps.numpy(), np.linspace(0, 999, 250).round()[::-1].astype(np.int64))


def test_checkpoint_file_to_pipeline_folder_and_cli(v2, tmp_path, monkeypatch, capsys):
    sd, io, _ = v2
    ckpt = tmp_path / "mdt_v2.pt"
    torch.save(dict(sd), ckpt)  # the released files are flat state dicts
    out_dir = tmp_path / "pipe"
    script = os.path.join(REPO, "scripts", "convert_mdt_to_diffusers.py")
    monkeypatch.setattr(sys, "argv", [script, "--checkpoint_path", str(ckpt), "--output_dir", str(out_dir)])
    runpy.run_path(script, run_name="__main__")
    assert "MDT v2" in capsys.readouterr().out

    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(out_dir)
    assert type(pipe).__name__ == "MDTv2Pipeline" and type(pipe.scheduler).__name__ == "DDPMScheduler"
    with torch.no_grad():
        out = pipe.transformer(io["x"], io["timestep"], class_labels=io["class_labels"]).sample
    assert (out - io["out_eval"]).abs().max().item() <= TOL
    latents = pipe(class_labels=[1], num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()
    # Function API with an EMA container and explicit names.
    torch.save({"ema": dict(sd), "model": {k: v + 1 for k, v in sd.items()}}, tmp_path / "c.pt")
    pipe2, info = convert_mdt_checkpoint(tmp_path / "c.pt", id2label={i: f"c{i}" for i in range(10)})
    assert info["source"] == "ema" and pipe2.id2label[2] == "c2"
