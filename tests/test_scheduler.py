"""Our flow-match Euler schedule equals diffusers' FlowMatchEulerDiscreteScheduler as the pipelines use it."""

from __future__ import annotations

import numpy as np
import pytest

from dfa2_jax.scheduler import FlowMatchEulerConfig, calculate_shift, euler_step, set_timesteps

TOL = 1e-6  # the bound; achieved: bitwise equal (float32) in every case below


def _diffusers(config: dict, steps: int, **kw):
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler(**config)
    s.set_timesteps(steps, **kw)
    return s.timesteps.numpy(), s.sigmas.numpy()


@pytest.mark.parametrize("steps", [4, 28, 50])
def test_sd3_static_shift(steps):
    ref_t, ref_s = _diffusers({"shift": 3.0}, steps)
    t, s = set_timesteps(FlowMatchEulerConfig.sd3(), steps)
    np.testing.assert_allclose(t, ref_t, rtol=0, atol=TOL * 1000)
    np.testing.assert_allclose(s, ref_s, rtol=0, atol=TOL)
    np.testing.assert_array_equal(s, ref_s)
    if steps == 28:  # diffusers shifts sigma_min twice: the last timestep is 8.93, not 1
        assert abs(t[-1] - 8.93) < 0.01


@pytest.mark.parametrize("steps", [4, 28, 50])
@pytest.mark.parametrize("resolution", [1024, 2048])
def test_flux_dynamic_shift(steps, resolution):
    seq = (resolution // 16) ** 2
    mu = calculate_shift(seq, 256, 4096, 0.5, 1.15)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    cfg = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
           "base_image_seq_len": 256, "max_image_seq_len": 4096}
    ref_t, ref_s = _diffusers(cfg, steps, sigmas=sigmas, mu=mu)
    t, s = set_timesteps(FlowMatchEulerConfig.from_dict(cfg), steps, sigmas=sigmas, mu=mu)
    np.testing.assert_array_equal(s, ref_s)
    np.testing.assert_allclose(t, ref_t, rtol=0, atol=TOL * 1000)


@pytest.mark.parametrize("steps", [1, 4, 28])
def test_flux_schnell(steps):
    sigmas = np.linspace(1.0, 1 / steps, steps)
    ref_t, ref_s = _diffusers({"shift": 1.0}, steps, sigmas=sigmas)
    t, s = set_timesteps(FlowMatchEulerConfig.flux_schnell(), steps, sigmas=sigmas)
    np.testing.assert_array_equal(s, ref_s)
    np.testing.assert_allclose(t, ref_t, rtol=0, atol=TOL * 1000)


def test_step_equals_diffusers():
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(4)
    rng = np.random.default_rng(0)
    x, v = rng.standard_normal((2, 4, 6, 5), np.float32), rng.standard_normal((2, 4, 6, 5), np.float32)
    ref = sched.step(torch.from_numpy(v), sched.timesteps[1], torch.from_numpy(x)).prev_sample.numpy()
    _, sig = set_timesteps(FlowMatchEulerConfig.sd3(), 4)
    out = np.asarray(euler_step(x, v, sig[1], sig[2]))
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


def test_config_errors():
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        FlowMatchEulerConfig.from_dict({"use_karras_sigmas": True})
    with pytest.raises(ValueError, match="not supported"):
        FlowMatchEulerConfig.from_dict({"_class_name": "DDIMScheduler"})
    with pytest.raises(ValueError, match="`mu` must be given"):
        set_timesteps(FlowMatchEulerConfig.flux_dev(), 4, sigmas=[1.0, 0.75, 0.5, 0.25])
