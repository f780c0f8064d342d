import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusers_masked import MDTv2Pipeline, MDTv2Transformer2DModel
from diffusers_masked.training.config import ModelConfig, OptimConfig, TrainConfig
from diffusers_masked.training.context import TrainContext
from diffusers_masked.training.objectives import DDPMObjective, EDMObjective, NoisyBatch
from diffusers_masked.training.optimizers import Adan
from diffusers_masked.training.recipe_mdt import (
    LearnedVarianceVLB,
    MDTv2Config,
    MDTv2Recipe,
    mdtv2_loss,
    min_snr_weight,
)

REPO = Path(__file__).resolve().parents[2]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def tiny_model(**kwargs):
    model = MDTv2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=1, hidden_size=32, num_layers=4, num_decoder_layers=2,
        num_attention_heads=2, num_classes=3, **kwargs
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.05)
    return model


def context(objective="epsilon", mask_ratio=None, unmasked_finetune_steps=0, step=0, generator=None, model=None,
            **recipe):
    """What the trainer hands the recipe, for a 100-step run with MDTv2's flags ``recipe``."""
    config = TrainConfig(
        model=ModelConfig(objective=objective, mask_ratio=mask_ratio, unmasked_finetune_steps=unmasked_finetune_steps),
        optim=OptimConfig(max_train_steps=100, learning_rate=1e-3), recipe=MDTv2Config(**recipe))
    ctx = TrainContext(config, generator=generator, model=model, step=step)
    ctx.objective = MDTv2Recipe().build_objective(ctx)
    return ctx


class Spy(torch.nn.Module):
    """Records the calls the recipe makes to the model."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.calls = []

    @property
    def side_interpolater(self):
        return self.inner.side_interpolater

    @property
    def num_tokens(self):
        return self.inner.num_tokens

    def forward(self, x, t, **kwargs):
        ids_keep = kwargs.get("ids_keep")
        kept = None if ids_keep is None else ids_keep.shape[1]
        self.calls.append(dict(x=x.clone(), t=t.clone(), kept=kept, generator="generator" in kwargs))
        return self.inner(x, t, **kwargs)


def test_loss_has_both_branches_with_shared_t_and_independent_noise():
    objective = MDTv2Recipe().build_objective(context())
    assert isinstance(objective, DDPMObjective) and objective.learned_variance
    model = Spy(tiny_model())
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    cond = {"class_labels": torch.tensor([0, 1, 2, 3])}
    gen = torch.Generator().manual_seed(0)
    loss, logs = mdtv2_loss(model, objective, x0, cond, 0.4, generator=gen)
    # The masked branch gets its mask as ids_keep (16 tokens, 0.4 masked -> 10 kept); no generator reaches the
    # model, so a compiled forward stays one graph.
    assert [c["kept"] for c in model.calls] == [None, 10]
    assert not any(c["generator"] for c in model.calls)
    full, masked = model.calls
    assert torch.equal(full["t"], masked["t"])
    assert not torch.allclose(full["x"], masked["x"])
    torch.testing.assert_close(loss, logs["loss_full"] + logs["m_loss"])
    assert logs["m_loss"] > 0 and logs["loss_full"] > 0
    loss.backward()
    inner = model.inner
    assert inner.side_interpolater.mask_token.grad is not None
    assert all(p.grad is not None for p in inner.parameters())

    model.calls.clear()
    loss0, logs0 = mdtv2_loss(model, objective, x0, cond, 0.0, generator=torch.Generator().manual_seed(0))
    assert [c["kept"] for c in model.calls] == [None]
    assert "m_loss" not in logs0
    torch.testing.assert_close(loss0, logs0["loss_full"])


def test_mask_ratio_drawn_per_batch_in_range():
    recipe = MDTv2Recipe()
    gen = torch.Generator().manual_seed(0)
    ratios = [recipe.mask_ratio(context(mask_ratio_levels=0, step=s, generator=gen)) for s in range(100)]
    assert all(0.3 <= r < 0.5 for r in ratios)
    assert min(ratios) < 0.32 and max(ratios) > 0.48
    levels = {round(recipe.mask_ratio(context(mask_ratio_levels=4, step=s, generator=gen)), 6) for s in range(100)}
    assert levels == {0.325, 0.375, 0.425, 0.475}  # bin centres: few compiled shapes, same mean
    assert recipe.mask_ratio(context(mask_ratio=0.3, generator=gen)) == 0.3  # v1: fixed
    assert recipe.mask_ratio(context(no_masked_branch=True, generator=gen)) == 0.0
    assert recipe.mask_ratio(context(unmasked_finetune_steps=10, step=95, generator=gen)) == 0.0
    with pytest.raises(ValueError):
        recipe.mask_ratio(context(mask_ratio_range=[0.5, 0.3], generator=gen))


def test_mask_ratio_is_a_host_draw_keyed_by_step():
    # The ratio is a shape, so it is read on the host: drawing it from the run's (CUDA) generator would make every
    # step wait for the GPU. Keyed by (seed, step) it leaves the run's generator alone and repeats on resume.
    recipe = MDTv2Recipe()
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    first = [recipe.mask_ratio(context(mask_ratio_levels=0, step=s, generator=gen)) for s in range(5)]
    assert torch.equal(gen.get_state(), state)
    assert first == [recipe.mask_ratio(context(mask_ratio_levels=0, step=s)) for s in range(5)]
    assert len(set(first)) == 5


def test_min_snr_weight():
    objective = DDPMObjective(learned_variance=True)
    t = torch.tensor([0, 50, 100, 129, 131, 500, 999])
    w = min_snr_weight(objective, t, 5.0)
    a = objective.scheduler.alphas_cumprod[t].float()
    snr = a / (1 - a)
    torch.testing.assert_close(w, torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert w[0] == pytest.approx(5 * 1e-4 / (1 - 1e-4), rel=1e-3)
    assert torch.all(w[4:] == 1.0) and torch.all(w[:3] < 1.0)
    assert torch.all(min_snr_weight(objective, t, 0.0) == 1.0)


def test_vlb_zero_for_true_posterior_and_positive_otherwise():
    objective = DDPMObjective(learned_variance=True)
    vlb = LearnedVarianceVLB(objective)
    x0 = torch.rand(3, 1, 8, 8) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([10, 400, 999])
    noisy = objective.scheduler.add_noise(x0, noise, t)
    batch = NoisyBatch(model_input=noisy, timestep=t, noisy=noisy, noise=noise, level=t)
    # Exact noise and frac = 0 (posterior variance) -> p equals q -> KL = 0.
    exact = vlb(noise, -torch.ones_like(x0), batch, x0)
    torch.testing.assert_close(exact, torch.zeros(3), atol=1e-4, rtol=0)
    wrong = vlb(noise + 0.5, torch.ones_like(x0), batch, x0)
    assert torch.all(wrong > 1e-3)
    # Gradient reaches the variance values only (mean is detached).
    eps = (noise + 0.1).requires_grad_()
    v = torch.zeros_like(x0, requires_grad=True)
    vlb(eps, v, batch, x0).sum().backward()
    assert eps.grad is None and v.grad is not None and v.grad.abs().sum() > 0
    # t = 0 uses the discretised decoder NLL: finite and positive.
    t0 = torch.zeros(3, dtype=torch.long)
    noisy0 = objective.scheduler.add_noise(x0, noise, t0)
    b0 = NoisyBatch(model_input=noisy0, timestep=t0, noisy=noisy0, noise=noise, level=t0)
    nll = vlb(noise, torch.zeros_like(x0), b0, x0)
    assert torch.isfinite(nll).all() and torch.all(nll > 0)


def test_no_masked_branch_keeps_side_interpolater_in_graph():
    model = tiny_model()
    out = MDTv2Recipe().compute_loss(model, {"x0": torch.zeros(2, 1, 8, 8), "class_labels": torch.tensor([0, 1])},
                                     context(no_masked_branch=True, model=model))
    out.for_backward().backward()
    assert model.side_interpolater.mask_token.grad is not None


def test_unknown_objective_rejected():
    with pytest.raises(ValueError, match="epsilon"):
        MDTv2Recipe().build_objective(context(objective="x0"))


def test_edm_objective_trains_both_branches_without_a_learned_variance():
    ctx = context(objective="edm", edm_sigma_data=0.5)
    recipe = MDTv2Recipe()
    assert isinstance(ctx.objective, EDMObjective)
    assert recipe.model_overrides(ctx)["learn_sigma"] is False
    assert recipe.model_overrides(context())["learn_sigma"] is True
    model = Spy(tiny_model(learn_sigma=False))
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    cond = {"class_labels": torch.tensor([0, 1, 2, 0])}
    loss, logs = mdtv2_loss(model, ctx.objective, x0, cond, 0.4, generator=torch.Generator().manual_seed(0))
    assert [c["kept"] for c in model.calls] == [None, 10]
    full, masked = model.calls
    assert torch.equal(full["t"], masked["t"])  # the same sigma (as c_noise) in both branches ...
    assert not torch.allclose(full["x"], masked["x"])  # ... with fresh noise
    assert logs["vb"] == 0 and logs["m_vb"] == 0  # no VLB term: EDM's weighted error is the whole loss
    torch.testing.assert_close(loss, logs["loss_full"] + logs["m_loss"])
    # The loss is EDM's: the full branch's value equals the objective's own loss on that model output.
    noisy = ctx.objective.add_noise(x0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = ctx.objective.per_element_loss(model.inner(noisy.model_input, noisy.timestep, **cond).sample, noisy, x0)
    torch.testing.assert_close(logs["loss_full"], ref.flatten(1).mean(1).mean())
    loss.backward()
    assert model.inner.side_interpolater.mask_token.grad is not None
    with pytest.raises(ValueError, match="learned_variance"):
        mdtv2_loss(model, DDPMObjective(learned_variance=False), x0, cond, 0.4)


def test_adan_matches_hand_computation():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5))
    opt = Adan([p], lr=0.1, betas=(0.9, 0.8, 0.7), eps=1e-8)
    b1, b2, b3 = 0.9, 0.8, 0.7
    ref = p.detach().clone()
    m = v = n = torch.zeros(5)
    prev = None
    for k in range(1, 4):
        g = torch.randn(5)
        p.grad = g.clone()
        opt.step()
        d = torch.zeros(5) if prev is None else g - prev
        prev = g
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * d
        n = b3 * n + (1 - b3) * (g + b2 * d) ** 2
        upd = (m / (1 - b1**k) + b2 * v / (1 - b2**k)) / ((n / (1 - b3**k)).sqrt() + 1e-8)
        ref = ref - 0.1 * upd
        torch.testing.assert_close(p.detach(), ref)
    assert isinstance(MDTv2Recipe().build_optimizer([p], context(use_adan=True)), Adan)
    assert MDTv2Recipe().build_optimizer([p], context()) is None


@pytest.mark.slow  # a subprocess run of train_mdt.py: ~15-30 s on 2 cores
@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="needs apt-get install dataset-fashion-mnist")
def test_tiny_train_mdt_run_gives_loadable_pipeline(tmp_path):
    out = tmp_path / "mdt"
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(patch_size=7, hidden_size=32, num_layers=4, num_decoder_layers=2,
                                      num_attention_heads=2)))
    cmd = [sys.executable, str(REPO / "train_examples" / "train_mdt.py"), "--output_dir", str(out),
           "--model_config", str(config), "--max_train_samples", "32", "--train_batch_size", "16",
           "--max_train_steps", "2", "--checkpointing_steps", "2", "--validation_steps", "0",
           "--validation_inference_steps", "2", "--validation_images_per_class", "1", "--report_to", "none",
           "--use_ema", "--use_adan", "--lr_warmup_steps", "0"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "model_index.json").is_file() and (out / "README.md").is_file()
    card = (out / "README.md").read_text()
    assert "MDTv2" in card and "U[0.3, 0.5)" in card and "Adan" in card
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe, MDTv2Pipeline)
    assert pipe.scheduler.config.variance_type == "learned_range"
    assert pipe.scheduler.config.timestep_spacing == "linspace"
    assert pipe.transformer.config.out_channels is None or pipe.transformer.out_channels == 2
    images = pipe(class_labels=[0, 1], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 28, 28, 1)


def test_split_branch_backward_gives_the_joint_gradients():
    """--split_branch_backward back-propagates the full branch first (through `TrainContext.backward_part`): same
    loss, same gradients."""
    batch = {"x0": torch.rand(4, 1, 8, 8) * 2 - 1, "class_labels": torch.tensor([0, 1, 2, 3])}
    grads, losses = [], []
    for split in (False, True):
        model = tiny_model()
        calls = []
        ctx = context(mask_ratio=0.4, model=model, generator=torch.Generator().manual_seed(0))
        if split:
            def backward_part(compute):
                loss = compute()
                loss.backward()
                calls.append(float(loss.detach()))
                return loss.detach()

            ctx.backward_part = backward_part
        out = MDTv2Recipe().compute_loss(model, batch, ctx)
        loss, logs = out.loss, out.logs
        out.for_backward().backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        if split:
            assert calls == [pytest.approx(float(logs["loss_full"]))]
    torch.testing.assert_close(losses[0], losses[1])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="needs apt-get install dataset-fashion-mnist")
def test_trainer_split_branch_backward_trains_like_the_joint_run(tmp_path):
    from diffusers_masked.training import main

    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(patch_size=7, hidden_size=32, num_layers=4, num_decoder_layers=2,
                                      num_attention_heads=2)))
    results = []
    for split in (False, True):
        argv = ["--output_dir", str(tmp_path / f"run{split}"), "--model_config", str(config),
                "--max_train_samples", "32", "--train_batch_size", "8", "--max_train_steps", "3",
                "--checkpointing_steps", "3", "--validation_steps", "0", "--report_to", "none",
                "--logging_steps", "1", "--learning_rate", "1e-3", "--lr_warmup_steps", "0",
                "--fashion_mnist_dir", str(FASHION_MNIST)] + (["--split_branch_backward"] if split else ["--no-split_branch_backward"])
        results.append(main(MDTv2Recipe(), argv))
    assert results[1]["finished"]
    assert results[0]["final_loss"] == pytest.approx(results[1]["final_loss"], rel=1e-4)
    from safetensors.torch import load_file

    w = [load_file(tmp_path / f"run{s}" / "transformer" / "diffusion_pytorch_model.safetensors") for s in (False, True)]
    for key in w[0]:
        torch.testing.assert_close(w[0][key], w[1][key], atol=1e-5, rtol=1e-4, msg=key)


def test_identical_cpu_training_runs_end_bit_identical():
    """Two identical short MDTv2 runs (both branches, AdamW) end with the same weights and Adam moments, bit for bit.

    The masked branch's relative-position-bias lookup has > 32768 elements here, the size above which CPU
    advanced-indexing backward adds with float atomics across threads (what made the tables' moments drift)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))  # the drift needs more than one thread
    try:
        states = []
        for _ in range(2):
            torch.manual_seed(0)
            model = MDTv2Transformer2DModel(
                sample_size=16, patch_size=2, in_channels=1, hidden_size=16, num_layers=4, num_decoder_layers=2,
                num_attention_heads=2, num_classes=3,
            )
            objective = DDPMObjective(prediction_type="epsilon", learned_variance=True)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            gen, data = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
            for _ in range(3):
                x0 = torch.rand(8, 1, 16, 16, generator=data) * 2 - 1
                cond = {"class_labels": torch.randint(0, 3, (8,), generator=data)}
                loss, _ = mdtv2_loss(model, objective, x0, cond, 0.4, generator=gen)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            states.append({n: [p.detach().clone()] + [optimizer.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")]
                           for n, p in model.named_parameters()})
    finally:
        torch.set_num_threads(threads)
    differing = [n for n in states[0] if not all(torch.equal(x, y) for x, y in zip(states[0][n], states[1][n]))]
    assert not differing, f"runs differ in {differing}"


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="needs apt-get install dataset-fashion-mnist")
def test_trainer_edm_run_saves_an_edm_pipeline_that_samples(tmp_path):
    """--objective edm (the study's like-for-like MDTv2 row): both branches train with the EDM loss, the model has
    no learned variance, and the saved pipeline samples with the EDM scheduler of the run's constants."""
    from diffusers import DiffusionPipeline, EDMEulerScheduler

    from diffusers_masked.training import main

    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(patch_size=7, hidden_size=32, num_layers=4, num_decoder_layers=2,
                                      num_attention_heads=2)))
    out = tmp_path / "edm"
    result = main(MDTv2Recipe(), [
        "--output_dir", str(out), "--model_config", str(config), "--objective", "edm", "--edm_sigma_data", "0.6",
        "--max_train_samples", "32", "--train_batch_size", "8", "--max_train_steps", "3",
        "--checkpointing_steps", "3", "--validation_steps", "0", "--report_to", "none", "--logging_steps", "1",
        "--lr_warmup_steps", "0", "--fashion_mnist_dir", str(FASHION_MNIST)])
    assert result["finished"] and result["final_loss"] == result["final_loss"]  # not NaN
    pipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe, MDTv2Pipeline) and isinstance(pipe.scheduler, EDMEulerScheduler)
    assert pipe.scheduler.config.sigma_data == 0.6
    assert pipe.transformer.config.learn_sigma is False
    images = pipe(class_labels=[0, 1], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 28, 28, 1) and bool(torch.isfinite(torch.from_numpy(images)).all())
    card = (out / "README.md").read_text()
    assert "edm (EDM denoising loss, no learned variance)" in card and "learned-variance VLB" not in card
