"""Shared fixtures: tiny diffusers transformers (the oracle) saved with save_pretrained."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# The suite compiles thousands of small programs and runs each a few times: skipping LLVM's optimisation passes
# (XLA's own HLO passes still run) makes it about a third faster on a CPU. Subprocesses inherit the setting; an
# XLA_FLAGS that already names the level is left alone.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def perturb_(module, seed: int) -> None:
    """Add noise to every parameter and buffer so no weight keeps a symmetric init (norm weights = 1, zero
    biases): a swapped or misplaced tensor then always changes the output."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if not t.is_floating_point():  # e.g. CLIP's position_ids
                continue
            t.add_(0.05 * torch.randn(t.shape, generator=g, dtype=t.dtype))


# Tiny configs as in diffusers' own tests, heads 2-4, head_dim 8-16.
SD3_TINY = dict(sample_size=32, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64,
                out_channels=4, pos_embed_max_size=96)
SD35_TINY = dict(SD3_TINY, dual_attention_layers=(0,), qk_norm="rms_norm")
FLUX_TINY = dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
TINY = {
    "sd3": ("SD3Transformer2DModel", SD3_TINY),
    "sd35": ("SD3Transformer2DModel", SD35_TINY),
    "flux_dev": ("FluxTransformer2DModel", dict(FLUX_TINY, guidance_embeds=True)),
    "flux_schnell": ("FluxTransformer2DModel", dict(FLUX_TINY, guidance_embeds=False)),
}


def build_diffusers(name: str, seed: int = 0):
    import diffusers
    import torch

    cls_name, cfg = TINY[name]
    torch.manual_seed(seed)
    model = getattr(diffusers, cls_name)(**cfg).eval()
    perturb_(model, seed + 1)
    return model


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory):
    """{name: (diffusers model, folder written by save_pretrained)} for every tiny config."""
    out = {}
    for name in TINY:
        model = build_diffusers(name)
        folder = tmp_path_factory.mktemp(name) / "transformer"
        model.save_pretrained(folder, safe_serialization=True)
        out[name] = (model, str(folder))
    return out


@pytest.fixture(scope="session")
def tiny_pipes(tmp_path_factory):
    """dfa2_jax.tiny.tiny_pipelines(seed=0), built once per test process ({"sd3": ..., "flux": ...}; a test that
    changes weights restores them)."""
    from dfa2_jax.tiny import tiny_pipelines

    return tiny_pipelines(str(tmp_path_factory.mktemp("tiny")), seed=0)


def inputs_for(model, name: str, batch: int = 2, seed: int = 0, height: int = 16, width: int = 12,
               text_len: int = 7) -> dict[str, np.ndarray]:
    """Random diffusers-layout forward inputs (non-square latent, text length not a power of two)."""
    rng = np.random.default_rng(seed)
    cfg = model.config
    if name.startswith("sd3"):
        return dict(
            hidden_states=rng.standard_normal((batch, cfg.in_channels, height, width), np.float32),
            encoder_hidden_states=rng.standard_normal((batch, text_len, cfg.joint_attention_dim), np.float32),
            pooled_projections=rng.standard_normal((batch, cfg.pooled_projection_dim), np.float32),
            timestep=np.array([999.0, 431.5][:batch], np.float32),
        )
    gh, gw = height // 2, width // 2
    img_ids = np.zeros((gh, gw, 3), np.float32)
    img_ids[..., 1] = np.arange(gh)[:, None]
    img_ids[..., 2] = np.arange(gw)[None, :]
    d = dict(
        hidden_states=rng.standard_normal((batch, gh * gw, cfg.in_channels), np.float32),
        encoder_hidden_states=rng.standard_normal((batch, text_len, cfg.joint_attention_dim), np.float32),
        pooled_projections=rng.standard_normal((batch, cfg.pooled_projection_dim), np.float32),
        timestep=np.array([1.0, 0.3517][:batch], np.float32),
        img_ids=img_ids.reshape(-1, 3),
        txt_ids=np.zeros((text_len, 3), np.float32),
    )
    if cfg.guidance_embeds:
        d["guidance"] = np.full((batch,), 3.5, np.float32)
    return d


def diffusers_forward(model, inputs: dict[str, np.ndarray]) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}, return_dict=False)[0]
    return out.numpy()


def max_rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


LATENT_REL = 1e-4  # final latents: max |ours − diffusers| / max |diffusers| (float32, CPU)
PSNR_MIN = 40.0  # decoded images, dB (uint8 rounding dominates)


def psnr01(a, b) -> float:
    """PSNR in dB of two images in [0, 1]."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return 10 * np.log10(1.0 / max(mse, 1e-20))


def diffusers_outputs(folder, family: str, prompts, latents, kw) -> tuple[np.ndarray, np.ndarray]:
    """(final latents, float images in [0, 1]) of diffusers' own pipeline (StableDiffusion3Pipeline or
    FluxPipeline) on a saved folder, from the given initial ``latents``; ``kw``: the call's other arguments."""
    import diffusers
    import torch

    cls = diffusers.StableDiffusion3Pipeline if family == "sd3" else diffusers.FluxPipeline
    pipe = cls.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        lat = pipe(prompts, latents=torch.from_numpy(latents), output_type="latent", **kw).images.numpy()
        img = pipe(prompts, latents=torch.from_numpy(latents), output_type="np", **kw).images
    return lat, img


def assert_pipeline_output_matches(out, ref_latents, ref_images, label: str) -> None:
    """Our pipeline's output (final latents + PIL images) equals diffusers' (latents, float images in [0, 1])."""
    err = max_rel_err(out.latents, ref_latents)
    assert err <= LATENT_REL, f"{label}: final latents max relative error {err:.2e}"
    img = np.stack([np.asarray(im, np.float32) / 255.0 for im in out.images])
    assert img.shape == np.asarray(ref_images).shape, f"{label}: images {img.shape} vs {np.asarray(ref_images).shape}"
    psnr = psnr01(img, ref_images)
    assert psnr >= PSNR_MIN, f"{label}: decoded image PSNR {psnr:.1f} dB"


def assert_flux_shares_sd3_encoders(world: str) -> None:
    """The shipped FLUX-style testbed of ``world`` was trained with ``scripts/train_testbed.py --reuse`` on the
    SD3-style one: its VAE, T5 encoder and tokenizers are the same files, and its CLIP (FLUX's pooled text) is the
    SD3 CLIP-L tower less the text projection."""
    from safetensors.numpy import load_file

    from dfa2_jax.testbed import testbed_path

    flux, sd3 = testbed_path("flux", world), testbed_path("sd3", world)
    for a, b, name in (("vae", "vae", "diffusion_pytorch_model.safetensors"),
                       ("text_encoder_2", "text_encoder_3", "model.safetensors"),
                       ("tokenizer", "tokenizer", "tokenizer.json"), ("tokenizer_2", "tokenizer_3", "tokenizer.json")):
        with open(os.path.join(flux, a, name), "rb") as fa, open(os.path.join(sd3, b, name), "rb") as fb:
            assert fa.read() == fb.read(), f"{flux}/{a}/{name} differs from {sd3}/{b}/{name}"
    clip, clip_l = ({k.removeprefix("text_model."): v
                     for k, v in load_file(os.path.join(d, "text_encoder", "model.safetensors")).items()}
                    for d in (flux, sd3))
    assert set(clip) == set(clip_l) - {"text_projection.weight"}
    assert all(np.array_equal(clip[k], clip_l[k]) for k in clip)
