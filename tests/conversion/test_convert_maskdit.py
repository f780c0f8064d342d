"""Official MaskDiT -> MaskDiTTransformer2DModel: exact equivalence on a fixture made by the official code."""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys

import pytest
import torch
from safetensors.torch import load_file

from diffusers_masked.conversion import ConversionError
from diffusers_masked.conversion.maskdit import (
    config_from_official_state_dict,
    convert_maskdit_checkpoint,
    convert_maskdit_state_dict,
    load_maskdit_transformer,
    maskdit_scheduler,
)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "maskdit")
HEADS = dict(num_attention_heads=4, decoder_num_attention_heads=2)  # the fixture's (non-preset) head counts
TOL = 1e-5


@pytest.fixture(scope="module")
def official_sd():
    return load_file(os.path.join(FIXTURE, "official_state_dict.safetensors"))


@pytest.fixture(scope="module")
def io():
    return load_file(os.path.join(FIXTURE, "io.safetensors"))


@pytest.fixture(scope="module")
def model(official_sd):
    return load_maskdit_transformer(official_sd, **HEADS)


def test_config_read_from_shapes(official_sd):
    cfg = config_from_official_state_dict(official_sd, **HEADS)
    fixture_cfg = json.load(open(os.path.join(FIXTURE, "config.json")))
    assert cfg["sample_size"] == fixture_cfg["input_size"]
    assert cfg["hidden_size"] == fixture_cfg["hidden_size"] and cfg["num_layers"] == fixture_cfg["depth"]
    assert cfg["decoder_hidden_size"] == fixture_cfg["decoder_hidden_size"]
    assert cfg["num_decoder_layers"] == fixture_cfg["decoder_depth"]
    assert cfg["num_classes"] == fixture_cfg["num_classes"] and cfg["out_channels"] == 4


def test_unmasked_inference_matches_official(model, io):
    with torch.no_grad():
        out = model(io["model_input"], io["c_noise"], class_labels=io["class_labels"])
    assert out.mask is None
    assert io["out_eval"].abs().mean() > 0.1  # non-trivial reference
    assert (out.sample - io["out_eval"]).abs().max().item() <= TOL


def test_null_class_is_the_zero_one_hot(model, official_sd):
    # Official null = all-zero one-hot through a bias-free Linear -> exactly zero; ours: zero row at id K.
    table = model.class_embed.embedding_table.weight
    k = model.config.num_classes
    assert torch.equal(table[k], torch.zeros_like(table[k]))
    assert torch.equal(table[:k], official_sd["model.y_embedder.embedding_table.weight"].t())


def test_masked_training_forward_matches_official(model, io):
    with torch.no_grad():
        out = model(io["model_input"], io["c_noise"], class_labels=io["class_labels"], ids_keep=io["ids_keep"])
    assert torch.equal(out.mask, io["mask"].bool())
    # The masked forward must differ from the unmasked one, else this test would prove nothing.
    assert (io["out_train_masked"] - io["out_eval"]).abs().max() > 1e-2
    assert (out.sample - io["out_train_masked"]).abs().max().item() <= TOL


def test_scheduler_preconditioning_matches_edmprecond(model, io):
    sched = maskdit_scheduler()
    assert sched.config.sigma_min == 0.002 and sched.config.sigma_max == 80.0 and sched.config.rho == 7.0
    sigma = io["sigma"].reshape(-1, 1, 1, 1)
    x = io["x"]
    assert torch.allclose(sched.precondition_inputs(x, sigma), io["model_input"], atol=1e-6)
    assert torch.allclose(sched.precondition_noise(io["sigma"]), io["c_noise"], atol=1e-6)
    with torch.no_grad():
        f = model(sched.precondition_inputs(x, sigma), sched.precondition_noise(io["sigma"]), class_labels=io["class_labels"]).sample
    denoised = sched.precondition_outputs(x, f, sigma)
    assert (denoised - io["denoised_eval"]).abs().max().item() <= TOL


def _expect_error(sd, *needles, config=None):
    with pytest.raises(ConversionError) as err:
        convert_maskdit_state_dict(sd, config or config_from_official_state_dict(sd, **HEADS))
    for n in needles:
        assert n in str(err.value), str(err.value)


def test_missing_key_is_listed(official_sd):
    sd = dict(official_sd)
    del sd["model.blocks.1.mlp.fc2.bias"]
    del sd["model.final_layer.linear.weight"]
    _expect_error(sd, "missing (2)", "blocks.1.mlp.fc2.bias", "final_layer.linear.weight")


def test_extra_key_is_listed(official_sd):
    sd = dict(official_sd)
    sd["model.blocks.0.attn.q_norm.weight"] = torch.ones(8)
    sd["model.something_new"] = torch.zeros(3)
    _expect_error(sd, "unmapped (2)", "blocks.0.attn.q_norm.weight", "something_new")


def test_wrong_shape_is_listed(official_sd):
    sd = dict(official_sd)
    sd["model.blocks.1.mlp.fc1.weight"] = torch.zeros(100, 32)
    sd["model.decoder_blocks.1.adaLN_modulation.1.bias"] = torch.zeros(7)
    config = config_from_official_state_dict(official_sd, **HEADS)
    _expect_error(
        sd, "shape mismatch (2)", "encoder_blocks.1.ff.net.0.proj.weight: converted (100, 32) vs model (128, 32)",
        "decoder_blocks.1.adaln_modulation.bias", config=config,
    )


def test_learned_position_table_is_refused(official_sd):
    sd = dict(official_sd)
    sd["model.pos_embed"] = sd["model.pos_embed"] + 0.1
    _expect_error(sd, "pos_embed", "sin-cos")


def test_unsupported_official_features_are_refused(official_sd):
    sd = dict(official_sd)
    sd["model.cls_token"] = torch.zeros(1, 1, 32)
    with pytest.raises(ConversionError, match="pad_cls_token"):
        config_from_official_state_dict(sd, **HEADS)
    sd = {k: v for k, v in official_sd.items() if "decoder" not in k}
    with pytest.raises(ConversionError, match="use_decoder=False"):
        config_from_official_state_dict(sd, **HEADS)


def test_missing_mask_token_means_zeros(official_sd, io):
    # mae_loss_coef == 0: no mask_token in the official model; its forward then inserts zeros.
    sd = {k: v for k, v in official_sd.items() if k != "model.mask_token"}
    conv = convert_maskdit_state_dict(sd, config_from_official_state_dict(sd, **HEADS))
    assert torch.equal(conv["mask_token"], torch.zeros(1, 1, 16))


def _official_container(official_sd, path):
    """The official training-checkpoint layout: {'model', 'ema', 'opt', 'args': argparse.Namespace}."""
    noisy = {k: v + 1.0 for k, v in official_sd.items()}  # 'model' differs: the converter must pick 'ema'
    torch.save({"model": noisy, "ema": dict(official_sd), "opt": {}, "args": argparse.Namespace(config="x.yaml")}, path)


def test_checkpoint_file_to_pipeline_folder(official_sd, io, tmp_path):
    ckpt = tmp_path / "0100000.pt"
    _official_container(official_sd, ckpt)
    out_dir = tmp_path / "pipe"
    id2label = {i: f"class {i}" for i in range(10)}
    pipe, info = convert_maskdit_checkpoint(ckpt, out_dir, id2label=id2label, **HEADS)
    assert info["source"] == "ema" and info["args"]["config"] == "x.yaml"

    from diffusers import DiffusionPipeline

    loaded = DiffusionPipeline.from_pretrained(out_dir)
    assert type(loaded).__name__ == "MaskDiTPipeline"
    assert type(loaded.scheduler).__name__ == "EDMEulerScheduler" and loaded.scheduler.config.sigma_data == 0.5
    assert loaded.id2label[3] == "class 3"
    with torch.no_grad():
        out = loaded.transformer(io["model_input"], io["c_noise"], class_labels=io["class_labels"]).sample
    assert (out - io["out_eval"]).abs().max().item() <= TOL
    images = loaded(class_labels=[1, 2], num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 4, 8, 8) and torch.isfinite(images).all()  # no VAE: latents out


def _run_cli(monkeypatch, capsys, *argv):
    script = os.path.join(REPO, "scripts", "convert_maskdit_to_diffusers.py")
    monkeypatch.setattr(sys, "argv", [script, *argv])
    runpy.run_path(script, run_name="__main__")
    return capsys.readouterr().out


def test_cli(official_sd, tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "ckpt.pt"
    _official_container(official_sd, ckpt)
    out_dir = tmp_path / "cli_out"
    heads = ["--num_attention_heads", "4", "--decoder_num_attention_heads", "2"]
    stdout = _run_cli(monkeypatch, capsys, "--checkpoint_path", str(ckpt), "--output_dir", str(out_dir), *heads)
    assert "ema weights" in stdout and "class names: no (ids only)" in stdout
    index = json.load(open(out_dir / "model_index.json"))
    assert index["_class_name"] == "MaskDiTPipeline"
    assert index["transformer"][0].startswith("diffusers_masked") and index["transformer"][1] == "MaskDiTTransformer2DModel"
    assert index["scheduler"][1] == "EDMEulerScheduler"
    assert os.path.isfile(out_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    # A broken checkpoint fails loudly with the key list and writes nothing.
    bad = dict(official_sd)
    del bad["model.t_embedder.mlp.0.bias"]
    torch.save({"ema": bad}, tmp_path / "bad.pt")
    with pytest.raises(ConversionError, match="t_embedder.mlp.0.bias"):
        _run_cli(monkeypatch, capsys, "--checkpoint_path", str(tmp_path / "bad.pt"), "--output_dir", str(tmp_path / "bad_out"), *heads)
    assert not (tmp_path / "bad_out").exists()
