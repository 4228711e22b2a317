"""Text-to-image pipelines in JAX: SD3 / SD3.5 and FLUX.1, as diffusers' ``StableDiffusion3Pipeline`` and
``FluxPipeline`` run them (prompt encoding, latent preparation, schedule, guidance, VAE decode).

    >>> pipe = dfa2_jax.load_pipeline("/models/FLUX.1-dev", dtype="bfloat16")
    >>> out = pipe("a red fox in the snow", height=1024, width=1024, num_inference_steps=28, seed=0)
    >>> out.images[0].save("fox.png")

Components are (config, graphdef, state) triples; every model call is jitted with params as arguments.
The denoising loop is :func:`dfa2_jax.sample.denoise` (one ``lax.scan``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfa2_jax.models.configs import FluxConfig, SD3Config
from dfa2_jax.models.vae import VAEConfig, to_pil
from dfa2_jax.models.vae import decode as vae_decode
from dfa2_jax.runtime import check_attention_impl
from dfa2_jax.sample import PlanArrays, denoise, progress_hook
from dfa2_jax.scheduler import FlowMatchEulerConfig, calculate_shift, set_timesteps
from dfa2_jax.transformer import Transformer, flux_rope

logger = logging.getLogger("dfa2_jax")


@dataclasses.dataclass
class Encoder:
    """A loaded text encoder: ``kind`` "clip" | "t5", its config and nnx split."""

    kind: str
    config: Any
    graphdef: nnx.GraphDef
    state: nnx.State


@dataclasses.dataclass
class VAEDecoder:
    config: VAEConfig
    graphdef: nnx.GraphDef
    state: nnx.State


@dataclasses.dataclass
class Prepared:
    """A generation up to the denoising loop (what calibration and the sampler take)."""

    latents: jax.Array  # SD3 [B, C, h, w]; FLUX packed [B, N, 4C]
    cond: dict[str, Any]  # the sampler's conditioning (see dfa2_jax.sample.denoise)
    timesteps: np.ndarray
    sigmas: np.ndarray
    do_cfg: bool  # the model batch is [uncond; cond]: SD3's CFG or FLUX's true CFG
    n_img: int  # image tokens of the joint sequence
    text_len: int  # text tokens of the joint sequence
    size: tuple[int, int]  # (height, width) in pixels


@dataclasses.dataclass
class PipelineOutput:
    images: list  # PIL images (or [] when output_type="latent")
    latents: np.ndarray  # final latents before VAE decoding, diffusers' layout (SD3 [B,C,h,w]; FLUX [B,N,64])


@functools.partial(jax.jit, static_argnums=(0,))
def _clip_forward(graphdef, state, ids):
    out = nnx.merge(graphdef, state)(ids)
    return out.hidden_states[-2], out.pooled_output, out.text_embeds


@functools.partial(jax.jit, static_argnums=(0,))
def _t5_forward(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)


def _tokenize(tokenizer, prompts: list[str], max_length: int, name: str) -> np.ndarray:
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    add_special_tokens=True, return_tensors="np").input_ids
    untruncated = tokenizer(prompts, padding="longest", return_tensors="np").input_ids
    if untruncated.shape[-1] >= ids.shape[-1] and not np.array_equal(untruncated[:, :ids.shape[-1]], ids):
        removed = tokenizer.batch_decode(untruncated[:, max_length - 1: -1])
        logger.warning("The following part of your input was truncated because %s can only handle sequences up "
                       "to %d tokens: %s", name, max_length, removed)
    return ids.astype(np.int32)


class _Pipeline:
    family: str
    default_steps = 28

    def __init__(self, transformer: Transformer, vae: VAEDecoder, scheduler: FlowMatchEulerConfig,
                 tokenizers: dict[str, Any], encoders: dict[str, Encoder | None]):
        self.transformer = transformer
        self.vae = vae
        self.scheduler = scheduler
        self.tokenizers = tokenizers
        self.encoders = encoders

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.vae_scale_factor

    @property
    def dtype(self):
        return self.transformer.dtype

    def _sizes(self, d, height, width, num_inference_steps, max_sequence_length) -> tuple[int, int, int, int]:
        """The call's sizes, None taken from the defaults ``d`` (:func:`pipeline_defaults`), checked."""
        height = d.height if height is None else height
        width = d.width if width is None else width
        num_inference_steps = d.num_inference_steps if num_inference_steps is None else num_inference_steps
        max_sequence_length = d.max_sequence_length if max_sequence_length is None else max_sequence_length
        if height < 1 or width < 1 or num_inference_steps < 1:
            raise ValueError(f"height={height}, width={width} and num_inference_steps={num_inference_steps} must be "
                             ">= 1")
        self._check_size(height, width)
        return height, width, num_inference_steps, max_sequence_length

    def _check_size(self, height: int, width: int) -> None:
        mult = self.vae_scale_factor * 2  # 2x2 latent patches for both families
        if height % mult or width % mult:
            raise ValueError(f"height={height} and width={width} must be divisible by {mult} (VAE scale factor "
                             f"{self.vae_scale_factor} x patch 2)")

    def _clip(self, name: str, prompts: list[str]):
        enc, tok = self.encoders[name], self.tokenizers[name]
        ids = _tokenize(tok, prompts, getattr(tok, "model_max_length", 77) or 77, "CLIP")
        return _clip_forward(enc.graphdef, enc.state, jnp.asarray(ids))

    def _t5(self, name: str, prompts: list[str], max_sequence_length: int):
        enc, tok = self.encoders[name], self.tokenizers[name]
        ids = _tokenize(tok, prompts, max_sequence_length, "T5")
        return _t5_forward(enc.graphdef, enc.state, jnp.asarray(ids))

    def plan_arrays(self, plan, n_img: int, steps: int, do_cfg: bool) -> PlanArrays | None:
        """Validate ``plan`` (a Plan or a path) against this model, the step count and the image-token count,
        and turn it into the sampler's arrays. None stays None (dense)."""
        if plan is None:
            return None
        from dfa2_jax.plan import Plan, PlanError, model_info_for

        if not isinstance(plan, Plan):
            plan = Plan.load(plan)
        # Windows are fractions of N_img and text rows/columns are always kept, so the plan's text length is
        # informational: validate everything else against this model.
        info = model_info_for(self.transformer.config, plan.model.get("text_tokens"))
        plan.validate(info, n_img=n_img, cfg=do_cfg)
        if plan.steps != steps:
            raise PlanError(f"plan: steps = {plan.steps} but num_inference_steps = {steps}")
        return PlanArrays(*plan.to_arrays(n_img))

    def _run(self, latents, cond, timesteps, sigmas, do_cfg: bool, progress: bool, plan: PlanArrays | None = None,
             mesh=None, fsdp: bool = False, attention_impl: str = "auto"):
        tr = self.transformer
        x = jnp.array(latents, copy=True)  # the sampler donates its latents buffer
        sampler = denoise
        if mesh is not None:  # a Mesh, a spec such as "data=2,heads=4", "auto" or "none"
            from dfa2_jax.parallel.sharded import resolve_mesh, shard_denoise

            mesh = resolve_mesh(mesh, batch=x.shape[0], heads=tr.config.num_attention_heads, family=self.family,
                                do_cfg=do_cfg)
        if mesh is not None:
            sampler = functools.partial(shard_denoise, mesh, fsdp=fsdp, num_heads=tr.config.num_attention_heads)
        elif fsdp:
            raise ValueError("fsdp needs a mesh with a data axis")
        if not progress:
            return sampler(tr.graphdef, tr.state, x, cond, timesteps, sigmas, family=self.family, do_cfg=do_cfg,
                           plan=plan, attention_impl=attention_impl)
        from tqdm.auto import tqdm

        with tqdm(total=len(timesteps), desc="denoising", unit="step") as bar, \
                progress_hook(lambda i: bar.update(1)):
            out = sampler(tr.graphdef, tr.state, x, cond, timesteps, sigmas, family=self.family, do_cfg=do_cfg,
                          report=True, plan=plan, attention_impl=attention_impl)
            return jax.block_until_ready(out)

    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, *,
                 height: int | None = None, width: int | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, seed: int = 0, latents=None,
                 max_sequence_length: int | None = None, output_type: str = "pil", progress: bool = False,
                 plan=None, mesh=None, fsdp: bool = False, attention_impl: str = "auto") -> PipelineOutput:
        """Text to image as diffusers' pipeline. ``plan``: a :class:`dfa2_jax.plan.Plan` or plan file
        (head-wise compression); None = dense. ``output_type="latent"``: no VAE decoding. ``mesh``: run the
        sampler on a device mesh (:mod:`dfa2_jax.parallel.sharded`; a Mesh, "data=2,heads=4", "auto" = every local device
        on the data axis when the batch divides over them, or None = one device), ``fsdp``: params sharded over
        its data axis. ``attention_impl``: how a plan's compressed heads run ("auto", "xla", "triton",
        "mosaic_gpu", "interpret"; :func:`dfa2_jax.runtime.check_attention_impl`). Arguments left None (size,
        steps, guidance, T5 length) take the model folder's defaults (:func:`dfa2_jax.defaults.pipeline_defaults`:
        its ``dfa2_defaults.json``, else the family's)."""
        from dfa2_jax.defaults import pipeline_defaults

        check_attention_impl(attention_impl)
        if num_inference_steps is None:
            num_inference_steps = pipeline_defaults(self).num_inference_steps
        kw = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        prep = self.prepare(prompt, negative_prompt, height=height, width=width,
                            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed,
                            latents=latents, **kw)
        return self._generate(prep, num_inference_steps, output_type=output_type, progress=progress, plan=plan,
                              mesh=mesh, fsdp=fsdp, attention_impl=attention_impl)

    def _generate(self, prep: Prepared, num_inference_steps: int, *, output_type: str, progress: bool, plan, mesh,
                  fsdp: bool, attention_impl: str) -> PipelineOutput:
        """The denoising loop and decoding of a prepared generation (what ``__call__`` runs after ``prepare``)."""
        arrays = self.plan_arrays(plan, prep.n_img, num_inference_steps, prep.do_cfg)
        final = self._run(prep.latents, prep.cond, prep.timesteps, prep.sigmas, prep.do_cfg, progress, arrays,
                          mesh=mesh, fsdp=fsdp, attention_impl=attention_impl)
        final_np = np.asarray(final.astype(jnp.float32))
        images = [] if output_type == "latent" else self.to_images(final, prep)
        return PipelineOutput(images, final_np)

    def decode(self, latents_nchw) -> list:
        images = vae_decode(self.vae.graphdef, self.vae.state, jnp.asarray(latents_nchw))
        return to_pil(np.asarray(images, np.float32))


class SD3Pipeline(_Pipeline):
    """diffusers ``StableDiffusion3Pipeline``: CLIP-L + CLIP-G (+ T5, optional) text, CFG, SD3 schedule."""

    family = "sd3"
    default_guidance = 7.0

    def encode_prompt(self, prompts: list[str], max_sequence_length: int = 256):
        """-> prompt_embeds [B, 77 + T5 tokens, joint_dim], pooled [B, 2048-ish] (diffusers' encode_prompt)."""
        hid1, _, pooled1 = self._clip("text_encoder", prompts)
        hid2, _, pooled2 = self._clip("text_encoder_2", prompts)
        clip = jnp.concatenate([hid1, hid2], axis=-1)
        joint = self.transformer.config.joint_attention_dim
        if self.encoders.get("text_encoder_3") is not None:
            t5 = self._t5("text_encoder_3", prompts, max_sequence_length)
        else:
            t5 = jnp.zeros((len(prompts), max_sequence_length, joint), clip.dtype)  # as diffusers 0.42
        width = t5.shape[-1]  # CLIP zero-padded to the T5 width (cropped if wider, as torch's F.pad does)
        clip = jnp.pad(clip, ((0, 0), (0, 0), (0, max(width - clip.shape[-1], 0))))[..., :width]
        return jnp.concatenate([clip, t5.astype(clip.dtype)], axis=-2), jnp.concatenate([pooled1, pooled2], axis=-1)

    def prepare(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, *,
                height: int | None = None, width: int | None = None, num_inference_steps: int | None = None,
                guidance_scale: float | None = None, seed: int = 0, latents=None,
                max_sequence_length: int | None = None) -> Prepared:
        """Everything before the denoising loop: encoded prompts, initial latents, schedule. Arguments left None
        take the model folder's defaults (:func:`dfa2_jax.defaults.pipeline_defaults`)."""
        from dfa2_jax.defaults import pipeline_defaults

        cfg: SD3Config = self.transformer.config
        d = pipeline_defaults(self)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        height, width, num_inference_steps, max_sequence_length = self._sizes(
            d, height, width, num_inference_steps, max_sequence_length)
        g = (self.default_guidance if d.guidance_scale is None else d.guidance_scale) if guidance_scale is None \
            else float(guidance_scale)
        if not g >= 0:  # diffusers: > 1 turns CFG on; a negative scale is a mistake, not "off"
            raise ValueError(f"guidance_scale={g} must be >= 0 (> 1 turns classifier-free guidance on)")
        do_cfg = g > 1.0
        embeds, pooled = self.encode_prompt(prompts, max_sequence_length)
        if do_cfg:
            neg = negative_prompt if negative_prompt is not None else ""
            negs = [neg] * len(prompts) if isinstance(neg, str) else list(neg)
            if len(negs) != len(prompts):
                raise ValueError(f"{len(negs)} negative prompts for {len(prompts)} prompts")
            n_embeds, n_pooled = self.encode_prompt(negs, max_sequence_length)
            embeds, pooled = jnp.concatenate([n_embeds, embeds]), jnp.concatenate([n_pooled, pooled])
        shape = (len(prompts), cfg.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
        latents = jnp.asarray(latents)
        if latents.shape != shape:
            f = self.vae_scale_factor
            raise ValueError(f"latents have shape {tuple(latents.shape)}; expected {shape} ([B, C, H/{f}, W/{f}] for "
                             f"{height}x{width}, VAE scale factor {f})")
        latents = latents.astype(self.dtype)
        mu = None
        if self.scheduler.use_dynamic_shifting:  # SD3 pipeline: mu from the patch-grid sequence length
            p = cfg.patch_size
            mu = calculate_shift((shape[2] // p) * (shape[3] // p), self.scheduler.base_image_seq_len,
                                 self.scheduler.max_image_seq_len, self.scheduler.base_shift, self.scheduler.max_shift)
        timesteps, sigmas = set_timesteps(self.scheduler, num_inference_steps, mu=mu)
        cond = {"prompt_embeds": embeds.astype(self.dtype), "pooled_projections": pooled.astype(self.dtype),
                "guidance_scale": jnp.asarray(g, jnp.float32)}
        p = cfg.patch_size
        return Prepared(latents, cond, timesteps, sigmas, do_cfg, (shape[2] // p) * (shape[3] // p),
                        embeds.shape[1], (height, width))

    def to_images(self, final, prepared: Prepared) -> list:
        return self.decode(final)


def pack_latents(latents: np.ndarray) -> np.ndarray:
    """FLUX: [B, C, h, w] -> [B, (h/2)(w/2), 4C] (2x2 patches, channel-major within a patch)."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2),
                                                                                            c * 4)


def unpack_latents(latents, h: int, w: int):
    """FLUX: [B, N, 4C] -> [B, C, h, w] (h, w in latent pixels)."""
    b, _, c4 = latents.shape
    x = latents.reshape(b, h // 2, w // 2, c4 // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def flux_image_ids(h: int, w: int) -> np.ndarray:
    """[ (h/2)(w/2), 3 ] ids (0, row, col) of the packed latent grid, as diffusers."""
    ids = np.zeros((h // 2, w // 2, 3), np.float32)
    ids[..., 1] = np.arange(h // 2)[:, None]
    ids[..., 2] = np.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


class FluxPipeline(_Pipeline):
    """diffusers ``FluxPipeline``: CLIP-L pooled + T5 sequence, guidance embedding (dev) or none (schnell), true
    CFG with a negative prompt and ``true_cfg_scale`` > 1."""

    family = "flux"

    def encode_prompt(self, prompts: list[str], max_sequence_length: int = 512):
        _, pooled, _ = self._clip("text_encoder", prompts)
        t5 = self._t5("text_encoder_2", prompts, max_sequence_length)
        return t5, pooled

    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, *,
                 true_cfg_scale: float = 1.0, height: int | None = None, width: int | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None, seed: int = 0,
                 latents=None, max_sequence_length: int | None = None, output_type: str = "pil", progress: bool = False,
                 plan=None, mesh=None, fsdp: bool = False, attention_impl: str = "auto") -> PipelineOutput:
        """Text to image as diffusers' ``FluxPipeline``; ``negative_prompt`` with ``true_cfg_scale`` > 1 turns on
        true classifier-free guidance (see :meth:`prepare`). Everything else as :meth:`_Pipeline.__call__`."""
        from dfa2_jax.defaults import pipeline_defaults

        check_attention_impl(attention_impl)
        if num_inference_steps is None:
            num_inference_steps = pipeline_defaults(self).num_inference_steps
        kw = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        prep = self.prepare(prompt, negative_prompt, true_cfg_scale=true_cfg_scale, height=height, width=width,
                            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed,
                            latents=latents, **kw)
        return self._generate(prep, num_inference_steps, output_type=output_type, progress=progress, plan=plan,
                              mesh=mesh, fsdp=fsdp, attention_impl=attention_impl)

    def prepare(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, *,
                true_cfg_scale: float = 1.0, height: int | None = None, width: int | None = None,
                num_inference_steps: int | None = None, guidance_scale: float | None = None, seed: int = 0,
                latents=None, max_sequence_length: int | None = None) -> Prepared:
        """Everything before the denoising loop: encoded prompts, initial (packed) latents, schedule.

        True CFG as diffusers' ``FluxPipeline``: on when ``true_cfg_scale`` > 1 and a ``negative_prompt`` is given
        (one string for every prompt, or one per prompt); then v = v_neg + true_cfg_scale·(v_pos − v_neg), the
        guidance embedding (FLUX.1-dev) applied to both. diffusers runs the negative prompt as a second
        transformer pass; we run the doubled batch [negative; positive] in one pass, as SD3's CFG
        (``Prepared.do_cfg`` is then True, so ``cfg_share`` plan methods apply). Arguments left None take the
        model folder's defaults (:func:`dfa2_jax.defaults.pipeline_defaults`)."""
        from dfa2_jax.defaults import pipeline_defaults

        cfg: FluxConfig = self.transformer.config
        d = pipeline_defaults(self)
        true_cfg_scale = float(true_cfg_scale)
        if not np.isfinite(true_cfg_scale):
            raise ValueError(f"true_cfg_scale={true_cfg_scale} must be a finite number")
        if guidance_scale is not None and not cfg.guidance_embeds:
            raise ValueError("this FLUX model has no guidance embedding (FLUX.1-schnell): do not pass a guidance "
                             "scale")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        do_cfg = true_cfg_scale > 1.0 and negative_prompt is not None
        if negative_prompt is not None and not do_cfg:
            logger.warning("negative_prompt is ignored: true CFG needs true_cfg_scale > 1 (got %s)", true_cfg_scale)
        elif true_cfg_scale > 1.0 and not do_cfg:
            logger.warning("true_cfg_scale=%s is ignored: true CFG needs a negative_prompt", true_cfg_scale)
        height, width, num_inference_steps, max_sequence_length = self._sizes(
            d, height, width, num_inference_steps, max_sequence_length)
        embeds, pooled = self.encode_prompt(prompts, max_sequence_length)
        if do_cfg:
            negs = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negs) != len(prompts):
                raise ValueError(f"{len(negs)} negative prompts for {len(prompts)} prompts")
            n_embeds, n_pooled = self.encode_prompt(negs, max_sequence_length)
            embeds, pooled = jnp.concatenate([n_embeds, embeds]), jnp.concatenate([n_pooled, pooled])
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
        n = (h // 2) * (w // 2)
        shape = (len(prompts), n, cfg.in_channels)
        if latents is None:
            noise = jax.random.normal(jax.random.key(seed), (len(prompts), cfg.in_channels // 4, h, w), jnp.float32)
            latents = pack_latents(np.asarray(noise))
        latents = jnp.asarray(latents)
        if latents.shape != shape:
            f = self.vae_scale_factor
            raise ValueError(f"latents have shape {tuple(latents.shape)}; expected packed {shape} ([B, (H/{f}/2)·"
                             f"(W/{f}/2), {cfg.in_channels}] for {height}x{width}, VAE scale factor {f})")
        latents = latents.astype(self.dtype)
        sig = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        mu = calculate_shift(n, self.scheduler.base_image_seq_len, self.scheduler.max_image_seq_len,
                             self.scheduler.base_shift, self.scheduler.max_shift)
        timesteps, sigmas = set_timesteps(self.scheduler, num_inference_steps, sigmas=sig, mu=mu)
        txt_ids = np.zeros((embeds.shape[1], 3), np.float32)
        guidance = None
        if cfg.guidance_embeds:  # per model-batch row: [negative; positive] with true CFG
            g = (3.5 if d.guidance_scale is None else d.guidance_scale) if guidance_scale is None \
                else float(guidance_scale)
            if not g >= 0:
                raise ValueError(f"guidance_scale={g} must be >= 0")
            guidance = jnp.full((embeds.shape[0],), g, jnp.float32)
        cond = {"prompt_embeds": embeds.astype(self.dtype), "pooled_projections": pooled.astype(self.dtype),
                "rope": flux_rope(cfg, txt_ids, flux_image_ids(h, w)), "guidance": guidance}
        if do_cfg:
            cond["true_cfg_scale"] = jnp.asarray(true_cfg_scale, jnp.float32)
        return Prepared(latents, cond, timesteps, sigmas, do_cfg, n, embeds.shape[1], (height, width))

    def to_images(self, final, prepared: Prepared) -> list:
        height, width = prepared.size
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
        return self.decode(unpack_latents(final, h, w))


def load_pipeline(path: str | os.PathLike, *, dtype="float32", cache_dir=None) -> SD3Pipeline | FluxPipeline:
    """A diffusers pipeline folder (model_index.json, transformer/, vae/, text_encoder*/, tokenizer*/,
    scheduler/), or a Hugging Face repo id ``org/name[@revision]`` already in the local hub cache
    (:func:`converters.hf_cache.resolve_model_path`; nothing is downloaded) -> our SD3Pipeline or FluxPipeline."""
    from converters.hf_cache import resolve_model_path
    from converters.safetensors_io import CheckpointError
    from converters.text_encoders import load_clip, load_t5, load_tokenizer
    from converters.vae import load_vae_decoder
    from dfa2_jax.transformer import load_transformer

    root = resolve_model_path(path)
    if not os.path.isdir(root):
        raise CheckpointError(f"{root}: not a pipeline folder")
    for sub in ("transformer", "vae"):
        if not os.path.isdir(os.path.join(root, sub)):
            raise CheckpointError(f"{root}: missing {sub}/ folder (a diffusers pipeline folder has "
                                  "transformer/, vae/, text_encoder*/, tokenizer*/ and scheduler/)")
    transformer = load_transformer(os.path.join(root, "transformer"), dtype=dtype, cache_dir=cache_dir)
    vae = VAEDecoder(*load_vae_decoder(os.path.join(root, "vae"), dtype=dtype))
    sched_path = os.path.join(root, "scheduler", "scheduler_config.json")
    is_sd3 = isinstance(transformer.config, SD3Config)
    if os.path.isfile(sched_path):
        scheduler = FlowMatchEulerConfig.from_json(sched_path)
    else:
        scheduler = FlowMatchEulerConfig.sd3() if is_sd3 else (
            FlowMatchEulerConfig.flux_dev() if transformer.config.guidance_embeds else FlowMatchEulerConfig.flux_schnell())

    def enc(kind: str, name: str, required: bool = True):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            if required:
                raise CheckpointError(f"{root}: missing {name}/ folder")
            return None
        return Encoder(kind, *(load_clip if kind == "clip" else load_t5)(folder, dtype=dtype))

    def tok(name: str, required: bool = True):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            if required:
                raise CheckpointError(f"{root}: missing {name}/ folder")
            return None
        return load_tokenizer(folder)

    if is_sd3:
        encoders = {"text_encoder": enc("clip", "text_encoder"), "text_encoder_2": enc("clip", "text_encoder_2"),
                    "text_encoder_3": enc("t5", "text_encoder_3", required=False)}
        tokenizers = {"text_encoder": tok("tokenizer"), "text_encoder_2": tok("tokenizer_2"),
                      "text_encoder_3": tok("tokenizer_3", required=encoders["text_encoder_3"] is not None)}
        return SD3Pipeline(transformer, vae, scheduler, tokenizers, encoders)
    encoders = {"text_encoder": enc("clip", "text_encoder"), "text_encoder_2": enc("t5", "text_encoder_2")}
    tokenizers = {"text_encoder": tok("tokenizer"), "text_encoder_2": tok("tokenizer_2")}
    return FluxPipeline(transformer, vae, scheduler, tokenizers, encoders)
