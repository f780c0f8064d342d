import math

import pytest
import torch

from diffusers_masked.training.objectives import DDPMObjective, EDMObjective, build_objective, masked_mean, per_token
from diffusers_masked.training.recipe_maskdit import mae_loss, maskdit_loss
from testing_utils import TINY_MASKDIT, randomize


def test_edm_weight_and_preconditioning_against_hand_computed_values():
    obj = EDMObjective(sigma_data=0.5)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    expected = torch.tensor([(s * s + 0.25) / (s * 0.5) ** 2 for s in (0.1, 1.0, 10.0)])
    assert torch.allclose(obj.loss_weight(sigma), expected)
    assert torch.allclose(obj.loss_weight(torch.tensor([1.0])), torch.tensor([5.0]))  # (1 + .25) / .25
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 1, 4, 4)
    nb = obj.add_noise(x0, g)
    s = nb.level.view(-1, 1, 1, 1)
    assert torch.allclose(nb.noisy, x0 + s * nb.noise)
    assert torch.allclose(nb.model_input, nb.noisy / torch.sqrt(s**2 + 0.25))  # c_in
    assert torch.allclose(nb.timestep, torch.log(nb.level) / 4)  # c_noise
    f = torch.randn_like(x0)
    c_skip = 0.25 / (s**2 + 0.25)
    c_out = s * 0.5 / torch.sqrt(s**2 + 0.25)
    assert torch.allclose(obj.predict_x0(f, nb), c_skip * nb.noisy + c_out * f, atol=1e-6)
    w = obj.loss_weight(nb.level).view(-1, 1, 1, 1)
    assert torch.allclose(obj.per_element_loss(f, nb, x0), w * (c_skip * nb.noisy + c_out * f - x0) ** 2, atol=1e-5)


def test_edm_sigma_is_lognormal():
    obj = EDMObjective(p_mean=-1.2, p_std=1.2)
    nb = obj.add_noise(torch.zeros(20000, 1, 1, 1), torch.Generator().manual_seed(0))
    logs = torch.log(nb.level)
    assert abs(logs.mean().item() + 1.2) < 0.05 and abs(logs.std().item() - 1.2) < 0.05


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_ddpm_objective_targets(pred):
    obj = DDPMObjective(prediction_type=pred)
    x0 = torch.randn(3, 2, 4, 4)
    nb = obj.add_noise(x0, torch.Generator().manual_seed(0))
    a = obj.scheduler.alphas_cumprod[nb.level].view(-1, 1, 1, 1)
    assert torch.allclose(nb.noisy, a.sqrt() * x0 + (1 - a).sqrt() * nb.noise, atol=1e-5)
    target = nb.noise if pred == "epsilon" else a.sqrt() * nb.noise - (1 - a).sqrt() * x0
    assert obj.per_element_loss(target, nb, x0).abs().max() < 1e-6
    assert torch.allclose(obj.predict_x0(target, nb), x0, atol=1e-3)
    assert obj.inference_scheduler().config.prediction_type == pred


def test_build_objective_rejects_unknown():
    with pytest.raises(ValueError, match="Unknown objective"):
        build_objective("flow")


def test_mae_term_only_on_masked_tokens_and_dsm_only_on_kept():
    torch.manual_seed(0)
    noisy = torch.randn(1, 1, 4, 4)
    denoised = torch.randn(1, 1, 4, 4)
    mask = torch.tensor([[True, False, False, True]])  # 4 tokens of 2x2
    base = mae_loss(denoised, noisy, mask, 2)
    changed_kept = denoised.clone()
    changed_kept[:, :, 0:2, 2:4] += 3.0  # token 1 (kept)
    assert torch.allclose(mae_loss(changed_kept, noisy, mask, 2), base)
    changed_masked = denoised.clone()
    changed_masked[:, :, 0:2, 0:2] += 3.0  # token 0 (masked)
    assert not torch.allclose(mae_loss(changed_masked, noisy, mask, 2), base)
    # per-token mean + masked mean select exactly the kept tokens
    per_elem = torch.arange(16.0).view(1, 1, 4, 4)
    tok = per_token(per_elem, 2)
    assert tok.tolist() == [[2.5, 4.5, 10.5, 12.5]]
    assert masked_mean(tok, ~mask).item() == pytest.approx((4.5 + 10.5) / 2)


def test_maskdit_loss_ignores_masked_pixels_in_dsm():
    from diffusers_masked import MaskDiTTransformer2DModel

    torch.manual_seed(0)
    model = randomize(MaskDiTTransformer2DModel(**TINY_MASKDIT))
    obj = EDMObjective()
    x0 = torch.randn(2, 3, 8, 8)
    cond = {"class_labels": torch.tensor([1, 2])}
    l0, logs0 = maskdit_loss(model, obj, x0, cond, 0.5, 0.0, torch.Generator().manual_seed(0))
    assert set(logs0) == {"dsm"} and torch.isfinite(l0)
    l1, logs1 = maskdit_loss(model, obj, x0, cond, 0.5, 0.1, torch.Generator().manual_seed(0))
    assert set(logs1) == {"dsm", "mae"}
    assert l1.item() == pytest.approx(l0.item() + 0.1 * logs1["mae"].item(), rel=1e-5)
    lu, logsu = maskdit_loss(model, obj, x0, cond, 0.0, 0.1, torch.Generator().manual_seed(0))
    assert set(logsu) == {"dsm"}  # no MAE term without masking
    # The recipe declares the mask token unused in an unmasked step; it stays in the graph for DDP.
    from diffusers_masked.training import TrainContext, parse_args
    from diffusers_masked.training.recipe_maskdit import MaskDiTRecipe

    recipe = MaskDiTRecipe()
    ctx = TrainContext(parse_args(recipe, ["--mask_ratio", "0"]), generator=torch.Generator().manual_seed(0),
                       model=model, objective=obj)
    out = recipe.compute_loss(model, {"x0": x0, **cond}, ctx)
    assert list(out.unused) == [model.mask_token]
    out.for_backward().backward()
    assert model.mask_token.grad is not None
