"""Checks the three models share: given ids_keep, constructor arguments, configs, messages, damaged weight files."""

import json
import time

import pytest
import torch

from diffusers_masked import DeferredMaskDiTTransformer2DModel, MaskDiTTransformer2DModel, MDTv2Transformer2DModel
from diffusers_masked.models import masking
from diffusers_masked.models.modeling_common import SIZE_LIMITS
from testing_utils import TINY_MASKDIT

TINY_MDT = dict(sample_size=8, patch_size=2, in_channels=3, hidden_size=32, num_layers=4, num_decoder_layers=2,
                num_attention_heads=2, num_classes=10)
TINY_DEFERRED = dict(DeferredMaskDiTTransformer2DModel.preset_config("Debug/2"), sample_size=8, in_channels=3,
                     caption_channels=None, num_classes=10)
MODELS = {
    "maskdit": (MaskDiTTransformer2DModel, TINY_MASKDIT),
    "mdt": (MDTv2Transformer2DModel, TINY_MDT),
    "deferred": (DeferredMaskDiTTransformer2DModel, TINY_DEFERRED),
}
NUM_TOKENS = 16  # 8x8 input, patch 2


def build(which, **overrides):
    cls, config = MODELS[which]
    torch.manual_seed(0)
    return cls(**dict(config, **overrides)).eval()


def inputs(batch=2):
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, 8, 8, generator=g), torch.rand(batch, generator=g), torch.tensor([1, 2][:batch])


@pytest.fixture
def value_checks():
    yield masking.set_ids_keep_value_checks
    masking.set_ids_keep_value_checks("auto")


# ------------------------------------------------------------------------------------------------------------------
# ids_keep
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", MODELS)
def test_ids_keep_for_another_batch_size_is_refused(which):
    model = build(which)
    x, t, y = inputs()
    one_row = torch.randperm(NUM_TOKENS)[:8][None]  # (1, K) for a batch of 2
    with pytest.raises(ValueError, match=r"batch=2.*got \(1, 8\)"):
        model(x, t, class_labels=y, ids_keep=one_row)


@pytest.mark.parametrize("which", MODELS)
@pytest.mark.parametrize(
    "ids, message",
    [
        (torch.zeros(2, 0, dtype=torch.long), "between 1 and 16"),
        (torch.tensor([[0, 1, 2, 16], [0, 1, 2, 3]]), r"ids in \[0, 16\]; token ids must be in \[0, 16\)"),
        (torch.tensor([[0, 1, 2, 3], [-1, 1, 2, 3]]), r"ids in \[-1, 3\]"),
        (torch.tensor([[0, 1, 2, 3], [5, 5, 2, 3]]), r"repeats a token id within a sample \(samples \[1\]\)"),
        (torch.tensor([[0.0, 1.0], [2.0, 3.0]]), "integer token ids"),
    ],
)
def test_bad_ids_keep_values_raise(which, ids, message):
    model = build(which)
    x, t, y = inputs()
    with pytest.raises(ValueError, match=message):
        model(x, t, class_labels=y, ids_keep=ids)


@pytest.mark.parametrize("which", MODELS)
def test_ids_keep_checks_run_under_compile_without_breaking_the_graph(which):
    model = build(which)
    x, t, y = inputs()
    ids = torch.stack([torch.randperm(NUM_TOKENS)[:10] for _ in range(2)])
    explanation = torch._dynamo.explain(model)(x, t, class_labels=y, ids_keep=ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    # The shape checks are free, so a compiled forward keeps them.
    with pytest.raises(ValueError, match="batch=2"):
        torch.compile(model, backend="eager")(x, t, class_labels=y, ids_keep=ids[:1])


def test_value_check_modes(value_checks):
    dup = torch.tensor([[1, 1], [2, 3]])
    with pytest.raises(ValueError, match="repeats"):
        masking.check_ids_keep(dup, 2, 4)
    value_checks("never")
    assert masking.check_ids_keep(dup, 2, 4).dtype == torch.long  # shapes only
    with pytest.raises(ValueError, match="between 1 and 4"):
        masking.check_ids_keep(dup[:, :0], 2, 4)  # free checks always run
    value_checks("always")
    with pytest.raises(ValueError, match="repeats"):
        masking.check_ids_keep(dup, 2, 4)
    assert masking.check_ids_keep(dup, 2, 4, check_values=False) is not None  # per-call override
    with pytest.raises(ValueError, match="one of"):
        value_checks("sometimes")


def test_auto_value_checks_skip_accelerator_training_steps(value_checks):
    # "auto" reads nothing back from a non-CPU device while autograd is on (a training step), so a duplicate there
    # passes; a meta tensor stands in for a GPU one (reading it back would fail).
    dup = torch.tensor([[1, 1], [2, 3]], device="meta")
    assert masking.check_ids_keep(dup, 2, 4).device.type == "meta"
    value_checks("never")
    with torch.no_grad():
        assert masking.check_ids_keep(dup, 2, 4).device.type == "meta"


# ------------------------------------------------------------------------------------------------------------------
# Constructor arguments and configs
# ------------------------------------------------------------------------------------------------------------------
BAD_ARGS = [
    (dict(num_layers=0), "num_layers must be >= "),
    (dict(num_layers=-2), "num_layers must be >= "),
    (dict(num_classes="10"), "num_classes must be an integer or None"),
    (dict(num_classes=0), "num_classes must be >= 1"),
    (dict(sample_size=30, patch_size=4), "sample_size=30 must be divisible by patch_size=4"),
    (dict(sample_size=8.0), "sample_size must be an integer"),
    (dict(in_channels=0), "in_channels must be >= 1"),
    (dict(class_dropout_prob=1.5), r"class_dropout_prob must be in \[0.0, 1.0\)"),
    (dict(num_layers=10**6), r"num_layers=1000000 is above the sanity limit SIZE_LIMITS\['layers'\]=1024"),
    (dict(hidden_size=10**7), r"hidden_size=10000000 is above"),
    (dict(sample_size=4096, patch_size=2), r"gives 4194304 tokens, above"),
]
HEAD_ARGS = {
    "maskdit": [(dict(num_attention_heads=0), "num_attention_heads must be >= 1"),
                (dict(num_attention_heads=5), "hidden_size=32 must be divisible by num_attention_heads=5"),
                (dict(decoder_num_attention_heads=3), "decoder_hidden_size=16 must be divisible")],
    "mdt": [(dict(num_attention_heads=0), "num_attention_heads must be >= 1"),
            (dict(num_attention_heads=5), "hidden_size=32 must be divisible by num_attention_heads=5")],
    "deferred": [(dict(attention_head_dim=0), "attention_head_dim must be >= 1"),
                 (dict(num_experts=-1), "num_experts must be >= 0"),
                 (dict(ff_ratios=(0.5, -1.0)), "ff_ratios must be in")],
}


@pytest.mark.parametrize("which", MODELS)
def test_bad_constructor_arguments_fail_fast_with_the_argument_named(which):
    cls, _ = MODELS[which]
    for overrides, message in BAD_ARGS + HEAD_ARGS[which]:
        start = time.perf_counter()
        with pytest.raises(ValueError, match=message) as err:
            build(which, **overrides)
        assert cls.__name__ in str(err.value)
        assert time.perf_counter() - start < 2.0, overrides  # before any weight is allocated


def test_size_limit_can_be_raised(monkeypatch):
    monkeypatch.setitem(SIZE_LIMITS, "layers", 1)
    with pytest.raises(ValueError, match=r"raise diffusers_masked.models.modeling_common.SIZE_LIMITS\['layers'\]"):
        build("maskdit")
    monkeypatch.setitem(SIZE_LIMITS, "layers", 2)
    assert len(build("maskdit").encoder_blocks) == 2


@pytest.mark.parametrize("which", MODELS)
def test_config_without_input_size_is_refused(which, tmp_path):
    cls, config = MODELS[which]
    for key in ("sample_size", "patch_size"):
        partial = {k: v for k, v in config.items() if k != key}
        with pytest.raises(ValueError, match=f"config lacks \\['{key}'\\]"):
            cls.from_config(partial)
    assert cls.from_config(dict(config)).config.sample_size == 8
    assert cls.from_config({k: v for k, v in config.items() if k != "sample_size"}, sample_size=8).num_tokens == 16
    build(which).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["patch_size"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="lacks \\['patch_size'\\]"):
        cls.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------------------------------
# Messages name the model and its conditioning
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "which, hint",
    [("maskdit", "e.g. 0.5 for training"), ("mdt", r"in \[0.3, 0.5\)"), ("deferred", "e.g. 0.75 for training")],
)
def test_mask_ratio_error_names_the_model(which, hint):
    model = build(which)
    x, t, y = inputs()
    with pytest.raises(ValueError, match=hint) as err:
        model(x, t, class_labels=y, mask_ratio=1.0)
    assert str(err.value).startswith(type(model).__name__) and "MaskDiT training" not in str(err.value)


def test_conditioning_named_right():
    x, t, y = inputs()
    text_model = build("deferred", caption_channels=32, num_classes=None)
    with pytest.raises(ValueError, match=r"text-conditioned \(caption_channels=32\).*encoder_hidden_states") as err:
        text_model(x, t, class_labels=y, encoder_hidden_states=torch.randn(2, 4, 32))
    assert "unconditional" not in str(err.value)
    for which in ("maskdit", "mdt"):
        uncond = build(which, num_classes=None)
        with pytest.raises(ValueError, match=r"unconditional \(num_classes=None\)") as err:
            uncond(x, t, encoder_hidden_states=torch.randn(2, 4, 32))
        assert "class-conditional" not in str(err.value)
        with pytest.raises(ValueError, match=r"class-conditional \(num_classes=10\).*takes class_labels"):
            build(which)(x, t, class_labels=y, encoder_hidden_states=torch.randn(2, 4, 32))


# ------------------------------------------------------------------------------------------------------------------
# Damaged weight files
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [20, 0.5])
def test_truncated_weights_say_why(tmp_path, keep):
    from diffusers import DiffusionPipeline, EDMEulerScheduler

    from diffusers_masked import MaskDiTPipeline

    MaskDiTPipeline(build("maskdit"), EDMEulerScheduler()).save_pretrained(tmp_path)
    weights = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    for load in (lambda: MaskDiTTransformer2DModel.from_pretrained(tmp_path / "transformer"),
                 lambda: DiffusionPipeline.from_pretrained(tmp_path)):
        with pytest.raises(OSError) as err:
            load()
        message = str(err.value)
        assert str(weights) in message and "SafetensorError" in message and "header" in message
        assert "download it again" in message and "save_pretrained" in message


def test_truncated_lora_says_why(tmp_path):
    from diffusers import EDMEulerScheduler
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from diffusers_masked import MaskDiTPipeline

    model = build("maskdit")
    model.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_v"]))
    MaskDiTPipeline.save_lora_weights(tmp_path, get_peft_model_state_dict(model))
    weights = tmp_path / "pytorch_lora_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    pipe = MaskDiTPipeline(build("maskdit"), EDMEulerScheduler())
    with pytest.raises(OSError, match="Could not load the LoRA weights from .*SafetensorError.*download it again"):
        pipe.load_lora_weights(tmp_path)


# ------------------------------------------------------------------------------------------------------------------
# One forward for every model: the mask as ids_keep or a TokenMask, routing honoured in any mode
# ------------------------------------------------------------------------------------------------------------------
def _routed_dit():
    from diffusers_masked import RoutedDiTTransformer2DModel

    torch.manual_seed(0)
    return RoutedDiTTransformer2DModel(sample_size=8, patch_size=2, in_channels=3, hidden_size=32, num_layers=4,
                                       num_attention_heads=4, num_classes=10)


def _randomized(which):
    from testing_utils import randomize

    model = _routed_dit() if which == "dit" else build(which, route_start=1, route_end=1)
    return randomize(model)


@pytest.mark.parametrize("which", [*MODELS, "dit"])
def test_explicit_routing_is_honoured_in_eval_and_training_mode_alike(which):
    # One rule for every model: route_ids / route_ratio given = routed, whatever the mode; nothing given = every token
    # through every block (what pipelines do). Before, MDTv2 and DeferredMaskDiT ignored routing in eval mode.
    model = _randomized(which)
    x, t, y = inputs()
    route = masking.random_route_ids(2, NUM_TOKENS, 0.5, generator=torch.Generator().manual_seed(1))
    outputs = {}
    with torch.no_grad():
        for mode in ("train", "eval"):
            model.train(mode == "train")
            outputs[mode] = [model(x, t, class_labels=y).sample, model(x, t, class_labels=y, route_ids=route).sample,
                             model(x, t, class_labels=y, route_ratio=0.5,
                                   generator=torch.Generator().manual_seed(1)).sample]
    for train_out, eval_out in zip(outputs["train"], outputs["eval"]):
        assert torch.equal(train_out, eval_out)
    plain, routed, drawn = outputs["eval"]
    assert torch.equal(routed, drawn)  # the drawn route is random_route_ids' with the same generator
    assert not torch.allclose(plain, routed)


@pytest.mark.parametrize("which", MODELS)
def test_mask_given_as_token_mask_ids_keep_or_ratio_and_generator_is_the_same(which):
    from diffusers_masked.models import TokenMask

    model = _randomized(which)
    x, t, y = inputs()
    token_mask = masking.random_token_mask(2, NUM_TOKENS, 0.5, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        by_mask = model(x, t, class_labels=y, ids_keep=token_mask)
        by_ids = model(x, t, class_labels=y, ids_keep=token_mask.ids_keep)
        by_ratio = model(x, t, class_labels=y, mask_ratio=0.5, generator=torch.Generator().manual_seed(3))
    for out in (by_ids, by_ratio):
        assert torch.equal(out.sample, by_mask.sample) and torch.equal(out.mask, by_mask.mask)
    assert torch.equal(by_mask.mask, token_mask.mask)
    bad = TokenMask(ids_keep=token_mask.ids_keep, ids_restore=token_mask.ids_restore[:, :4], mask=token_mask.mask)
    with pytest.raises(ValueError, match=r"TokenMask.ids_restore must have shape \(batch=2, tokens=16\)"):
        model(x, t, class_labels=y, ids_keep=bad)


def test_the_dit_refuses_any_mask_and_points_to_routing():
    model = _routed_dit()
    x, t, y = inputs()
    token_mask = masking.random_token_mask(2, NUM_TOKENS, 0.5)
    for kwargs in (dict(ids_keep=token_mask), dict(ids_keep=token_mask.ids_keep), dict(mask_ratio=0.5)):
        with pytest.raises(ValueError, match="does not mask.*route_ratio"):
            model(x, t, class_labels=y, **kwargs)


# ------------------------------------------------------------------------------------------------------------------
# Training settings left the model config; old configs keep loading
# ------------------------------------------------------------------------------------------------------------------
def test_old_deferred_config_with_train_mask_ratio_still_loads(tmp_path, caplog):
    # Configs saved before the mask ratio became a training setting carry "train_mask_ratio": they load, with a note,
    # and give the same model.
    old = dict(TINY_DEFERRED, train_mask_ratio=0.75, _class_name="DeferredMaskDiTTransformer2DModel",
               _diffusers_version="0.42.1")
    with caplog.at_level("WARNING"):
        model = DeferredMaskDiTTransformer2DModel.from_config(old)
    assert "train_mask_ratio" not in model.config and "training setting" in caplog.text
    assert DeferredMaskDiTTransformer2DModel.default_mask_ratio == 0.75

    reference = build("deferred")
    reference.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "train_mask_ratio" not in saved
    saved["train_mask_ratio"] = 0.5
    (tmp_path / "config.json").write_text(json.dumps(saved))
    caplog.clear()
    with caplog.at_level("WARNING"):
        loaded = DeferredMaskDiTTransformer2DModel.from_pretrained(tmp_path)
    assert "train_mask_ratio=0.5" in caplog.text and "not expected" not in caplog.text
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t, class_labels=y).sample, reference(x, t, class_labels=y).sample)
    with pytest.raises(TypeError, match="train_mask_ratio"):
        DeferredMaskDiTTransformer2DModel(**TINY_DEFERRED, train_mask_ratio=0.75)
