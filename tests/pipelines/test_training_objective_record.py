"""Trained pipelines record their training objective in model_index.json (the trainer's part of it)."""

import json
import os
from pathlib import Path

import pytest
from diffusers import DDPMScheduler, DiffusionPipeline, EDMEulerScheduler

FMNIST = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))


@pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").exists(), reason="apt-get install dataset-fashion-mnist")
@pytest.mark.parametrize("objective", ["edm", "v_prediction"])
def test_trained_pipeline_records_its_objective(tmp_path, caplog, objective):
    from diffusers_masked.training import main
    from diffusers_masked.training.recipe_maskdit import MaskDiTRecipe

    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(dict(patch_size=7, hidden_size=16, num_layers=1, num_attention_heads=2,
                                   decoder_hidden_size=16, num_decoder_layers=1, decoder_num_attention_heads=2)))
    out = tmp_path / "run"
    main(MaskDiTRecipe(), ["--output_dir", str(out), "--model_config", str(cfg), "--max_train_samples", "16",
                           "--train_batch_size", "8", "--max_train_steps", "1", "--checkpointing_steps", "100",
                           "--validation_steps", "0", "--validation_inference_steps", "1",
                           "--validation_images_per_class", "1", "--report_to", "none", "--objective", objective])
    record = json.loads((out / "model_index.json").read_text())["training_objective"]
    assert record["objective"] == objective
    wrong = EDMEulerScheduler() if objective != "edm" else DDPMScheduler()
    pipe = DiffusionPipeline.from_pretrained(out, scheduler=wrong)
    pipe.set_progress_bar_config(disable=True)
    with caplog.at_level("WARNING"):
        pipe([0], num_inference_steps=1, output_type="latent")
    assert "objective" in caplog.text and type(wrong).__name__ in caplog.text
