import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from diffusers_masked.training.recipe_maskdit import MaskDiTRecipe
from diffusers_masked.training.trainer import Trainer, main, parse_args
from test_trainer import needs_fmnist, tiny_args


@needs_fmnist
def test_lora_run_trains_only_the_adapter_and_loads_into_the_pipeline(tmp_path):
    main(MaskDiTRecipe(), tiny_args(tmp_path, out="base", max_train_steps=2))
    base = tmp_path / "base"
    # new concept: a folder of one class only ("Sneaker"), images upside down
    from diffusers_masked.data import load_fashion_mnist_arrays

    images, labels = load_fashion_mnist_arrays("test")
    (tmp_path / "concept" / "Sneaker").mkdir(parents=True)
    for i, img in enumerate(images[labels == 7][:16]):
        Image.fromarray(img[::-1]).save(tmp_path / "concept" / "Sneaker" / f"{i}.png")
    args = tiny_args(tmp_path, out="lora", pretrained_model_name_or_path=str(base), lora_rank=4,
                     train_data_dir=str(tmp_path / "concept"), max_train_steps=2, gradient_checkpointing=True)
    args += ["--mask_ratio", "0.5"]
    trainer = Trainer(MaskDiTRecipe(), parse_args(MaskDiTRecipe(), args))
    model = trainer.unwrapped_model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n for n in trainable)
    assert trainer.label_lookup.tolist() == [7]  # the folder "Sneaker" keeps the base model's id 7
    trainer.run()
    out = tmp_path / "lora"
    assert (out / "pytorch_lora_weights.safetensors").exists()
    assert not (out / "model_index.json").exists()
    assert (out / "sample_grid_before.png").exists() and (out / "sample_grid.png").exists()
    card = (out / "README.md").read_text()
    assert "LoRA" in card and "rank 4" in card
    # base weights bit-identical after the run
    ref = load_file(base / "transformer" / "diffusion_pytorch_model.safetensors")
    now = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora" not in k}
    for key, value in ref.items():
        assert torch.equal(now[key], value), key
    pipe = DiffusionPipeline.from_pretrained(base)
    before = pipe(["Sneaker"], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    pipe.load_lora_weights(out)
    after = pipe(["Sneaker"], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert after.shape == (1, 28, 28, 1) and not np.array_equal(before, after)


def test_lora_needs_a_base_model(capsys):
    with pytest.raises(SystemExit):
        parse_args(MaskDiTRecipe(), ["--lora_rank", "4"])
    assert "pretrained_model_name_or_path" in capsys.readouterr().err


@needs_fmnist
def test_lora_warns_about_use_ema_only_when_it_was_passed(tmp_path, caplog):
    main(MaskDiTRecipe(), tiny_args(tmp_path, out="base", max_train_steps=2))
    base = str(tmp_path / "base")
    for passed in (False, True):
        argv = tiny_args(tmp_path, out=f"lora-{passed}", pretrained_model_name_or_path=base, lora_rank=2)
        if not passed:
            argv.remove("--use_ema")  # MaskDiT's demo default still turns the EMA on
        args = parse_args(MaskDiTRecipe(), argv)
        assert args.optim.use_ema and ("use_ema" in args.explicit_flags) == passed
        caplog.clear()
        trainer = Trainer(MaskDiTRecipe(), args)
        trainer.lock.release()
        assert trainer.ema is None
        assert ("--use_ema is ignored" in caplog.text) == passed
