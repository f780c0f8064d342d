import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, EDMEulerScheduler
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image

from diffusers_masked import MaskDiTPipeline, MaskDiTTransformer2DModel
from testing_utils import TINY_MASKDIT, randomize

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def lora_model(seed=0):
    torch.manual_seed(seed)
    model = randomize(MaskDiTTransformer2DModel(**TINY_MASKDIT)).eval()
    x, lab = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    base = model(x, 0.3, class_labels=lab).sample
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model, x, lab, base


def test_save_load_disable_fuse(tmp_path):
    model, x, lab, base = lora_model()
    with_lora = model(x, 0.3, class_labels=lab).sample
    assert not torch.allclose(with_lora, base, atol=1e-4)
    MaskDiTPipeline.save_lora_weights(tmp_path, get_peft_model_state_dict(model),
                                      transformer_lora_adapter_metadata=model.peft_config["default"].to_dict())
    assert (tmp_path / "pytorch_lora_weights.safetensors").exists()

    torch.manual_seed(0)
    fresh = randomize(MaskDiTTransformer2DModel(**TINY_MASKDIT)).eval()
    pipe = MaskDiTPipeline(fresh, EDMEulerScheduler())
    pipe.load_lora_weights(tmp_path, adapter_name="style")
    assert torch.equal(pipe.transformer(x, 0.3, class_labels=lab).sample, with_lora)
    pipe.transformer.disable_adapters()
    assert torch.equal(pipe.transformer(x, 0.3, class_labels=lab).sample, base)
    pipe.transformer.enable_adapters()
    pipe.fuse_lora()
    assert (pipe.transformer(x, 0.3, class_labels=lab).sample - with_lora).abs().max() < 1e-5
    pipe.unfuse_lora()
    pipe.set_adapters(["style"], [0.5])
    half = pipe.transformer(x, 0.3, class_labels=lab).sample
    assert not torch.allclose(half, with_lora, atol=1e-5) and not torch.allclose(half, base, atol=1e-5)
    pipe.unload_lora_weights()
    assert (pipe.transformer(x, 0.3, class_labels=lab).sample - base).abs().max() < 1e-6


def test_masked_training_forward_with_adapter():
    model, x, lab, _ = lora_model()
    model.train()
    out = model(x, 0.3, class_labels=lab, mask_ratio=0.5)
    out.sample.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora" in n}
    assert grads and all(g is not None for g in grads.values())


def test_lora_for_another_model_names_the_modules(tmp_path):
    model, *_ = lora_model()
    MaskDiTPipeline.save_lora_weights(tmp_path, get_peft_model_state_dict(model))
    other = MaskDiTTransformer2DModel(**{**TINY_MASKDIT, "hidden_size": 64})
    with pytest.raises(ValueError, match=r"encoder_blocks\.0\.attn1\.to_q"):
        MaskDiTPipeline(other, EDMEulerScheduler()).load_lora_weights(tmp_path)
    state = {k.replace("encoder_blocks", "blocks"): v for k, v in get_peft_model_state_dict(model).items()}
    with pytest.raises(ValueError, match="modules not in this"):
        MaskDiTPipeline(randomize(MaskDiTTransformer2DModel(**TINY_MASKDIT)), EDMEulerScheduler()).load_lora_weights(
            {f"transformer.{k}": v for k, v in state.items()})
    with pytest.raises(ValueError, match="Not a LoRA"):
        MaskDiTPipeline(other, EDMEulerScheduler()).load_lora_weights({"transformer.x.weight": torch.zeros(1)})
