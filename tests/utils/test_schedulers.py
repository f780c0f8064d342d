from diffusers import DDIMScheduler, DDPMScheduler, EDMEulerScheduler

from diffusers_masked.utils import build_scheduler, few_step_sampler_name
from diffusers_masked.utils.schedulers import FEW_STEP_DDPM_LIMIT


def test_few_step_sampler_replaces_only_ddpm_below_the_limit():
    ddpm = DDPMScheduler(variance_type="learned_range")
    assert few_step_sampler_name(ddpm, 25) == "DPMSolverMultistepScheduler"
    assert few_step_sampler_name(ddpm, FEW_STEP_DDPM_LIMIT - 1) == "DPMSolverMultistepScheduler"
    assert few_step_sampler_name(ddpm, FEW_STEP_DDPM_LIMIT) is None
    assert few_step_sampler_name(DDIMScheduler(), 25) is None
    assert few_step_sampler_name(EDMEulerScheduler(), 25) is None
    # The replacement keeps the saved noise schedule.
    dpm = build_scheduler(few_step_sampler_name(ddpm, 25), ddpm.config)
    assert dpm.config.beta_schedule == ddpm.config.beta_schedule and dpm.config.beta_end == ddpm.config.beta_end
