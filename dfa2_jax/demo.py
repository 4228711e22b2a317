"""``dfa2 demo``: the whole loop (calibrate -> plan -> dense and compressed images -> comparison) on the CPU in
well under two minutes, with no checkpoint to fetch.

Default (``model="testbed"``): the SD3-style testbed pipeline shipped in ``dfa2_jax/assets/testbed_sd3``
(:func:`dfa2_jax.testbed.load_testbed`; 6 layers x 4 heads, 64x64 images, trained on the procedural world of
:mod:`dfa2_jax.testbed.world`), so the pictures are real samples and the testbed classifier scores how well they
follow their captions (prompt accuracy). A few held-out world captions calibrate a plan; other held-out
captions are generated dense and compressed from the same noise and compared (PSNR / SSIM, prompt accuracy,
attention FLOPs kept).

``model="tiny-random"``: the older demo on tiny SD3-style and FLUX-style pipelines built in code (random weights
from a fixed seed, tokenizers made offline; :func:`tiny_pipelines`). Its pictures are noise-like textures: it
shows the machinery of both families, not quality.
"""

from __future__ import annotations

import os
import tempfile
import time

from flax import nnx

from dfa2_jax.models.clip import CLIPTextConfig, CLIPTextModel
from dfa2_jax.models.configs import FluxConfig, SD3Config
from dfa2_jax.models.t5 import T5Config, T5EncoderModel
from dfa2_jax.models.vae import AutoencoderKLDecoder, VAEConfig
from dfa2_jax.pipeline import Encoder, FluxPipeline, SD3Pipeline, VAEDecoder
from dfa2_jax.scheduler import FlowMatchEulerConfig
from dfa2_jax.tiny_tokenizers import make_clip_tokenizer, make_t5_tokenizer
from dfa2_jax.transformer import random_transformer

T5_VOCAB = 1103
DEMO_PROMPTS = ("a small red circle at the top left and a blue square in the centre",
                "a green triangle on a grey background")


def _split(module) -> tuple:
    return nnx.split(module)


def _clip(tok, hidden: int, projection: bool, seed: int) -> Encoder:
    cfg = CLIPTextConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=2 * hidden, projection_dim=hidden,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.eos_token_id)
    graphdef, state = _split(CLIPTextModel(cfg, with_projection=projection, rngs=nnx.Rngs(seed)))
    return Encoder("clip", cfg, graphdef, state)


def _t5(d_model: int, seed: int) -> Encoder:
    cfg = T5Config(vocab_size=T5_VOCAB, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, feed_forward_proj="gated-gelu")
    graphdef, state = _split(T5EncoderModel(cfg, rngs=nnx.Rngs(seed)))
    return Encoder("t5", cfg, graphdef, state)


def _vae(shift: float, seed: int) -> VAEDecoder:
    cfg = VAEConfig(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                    latent_channels=4, norm_num_groups=8, scaling_factor=1.5, shift_factor=shift,
                    use_quant_conv=False, use_post_quant_conv=False)
    graphdef, state = _split(AutoencoderKLDecoder(cfg, rngs=nnx.Rngs(seed)))
    return VAEDecoder(cfg, graphdef, state)


def tiny_pipelines(workdir: str, seed: int = 0) -> dict[str, SD3Pipeline | FluxPipeline]:
    """{"sd3": SD3Pipeline, "flux": FluxPipeline} with tiny random components (float32)."""
    from converters.text_encoders import load_tokenizer

    make_clip_tokenizer(os.path.join(workdir, "tokenizer"))
    make_t5_tokenizer(os.path.join(workdir, "tokenizer_t5"), T5_VOCAB)
    clip_tok = load_tokenizer(os.path.join(workdir, "tokenizer"))
    t5_tok = load_tokenizer(os.path.join(workdir, "tokenizer_t5"))
    sd3_cfg = SD3Config(sample_size=16, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=16,
                        num_attention_heads=4, caption_projection_dim=64, joint_attention_dim=64,
                        pooled_projection_dim=64, out_channels=4, pos_embed_max_size=32, dual_attention_layers=(0,),
                        qk_norm="rms_norm")
    sd3 = SD3Pipeline(random_transformer(sd3_cfg, dtype="float32", seed=seed), _vae(0.06, seed + 1),
                      FlowMatchEulerConfig.sd3(),
                      {"text_encoder": clip_tok, "text_encoder_2": clip_tok, "text_encoder_3": t5_tok},
                      {"text_encoder": _clip(clip_tok, 32, True, seed + 2),
                       "text_encoder_2": _clip(clip_tok, 32, True, seed + 3), "text_encoder_3": _t5(64, seed + 4)})
    flux_cfg = FluxConfig(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                          num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32,
                          guidance_embeds=True, axes_dims_rope=(4, 4, 8))
    flux = FluxPipeline(random_transformer(flux_cfg, dtype="float32", seed=seed + 5), _vae(0.11, seed + 6),
                        FlowMatchEulerConfig.flux_dev(), {"text_encoder": clip_tok, "text_encoder_2": t5_tok},
                        {"text_encoder": _clip(clip_tok, 32, False, seed + 7), "text_encoder_2": _t5(32, seed + 8)})
    return {"sd3": sd3, "flux": flux}


def run_tiny_demo(out_dir: str = "demo_out", *, steps: int = 8, size: int = 64, seed: int = 0, delta: float = 0.3
                  ) -> list[str]:
    """The main job on the embedded tiny random pipelines: calibrate a plan (progressive RSE + CP-SAT), then dense and
    compressed images from the same noise, compared (PSNR / SSIM, attention FLOPs kept, times) with a grid PNG
    and a JSON report per family. Returns the files written."""
    from dfa2_jax.calibrate.calibrate import calibrate
    from dfa2_jax.evaluate import evaluate

    os.makedirs(out_dir, exist_ok=True)
    written = []
    candidates = {"sd3": "arrow:2,arrow:4,cache,cfg_share", "flux": "arrow:2,arrow:4,cache"}
    with tempfile.TemporaryDirectory() as work:
        pipes = tiny_pipelines(work, seed)
        for name, pipe in pipes.items():
            t0 = time.perf_counter()
            res = calibrate(pipe, list(DEMO_PROMPTS), resolution=size, steps=steps, delta=delta,
                            candidates=candidates[name], seed=seed, savings="exact", progress=False,
                            max_sequence_length=32)
            plan_path = os.path.join(out_dir, f"plan_{name}.json")
            res.plan.save(plan_path)
            s = res.summary
            print(f"{name}: calibrated in {time.perf_counter() - t0:.1f} s: attention FLOPs kept "
                  f"{s['attention_flops_kept']:.3f}, methods {s['method_counts']}, solver {s['solver_time_s']:.2f} s")
            report = evaluate(pipe, res.plan, list(DEMO_PROMPTS), seed=seed, height=size, width=size,
                              out_dir=os.path.join(out_dir, name), max_sequence_length=32, repeat=1)
            m = report["mean"]
            psnr = m["psnr"] if isinstance(m["psnr"], str) else f"{m['psnr']:.1f}"
            print(f"{name}: compressed vs dense over {len(DEMO_PROMPTS)} prompts: PSNR {psnr} dB, "
                  f"SSIM {m['ssim']:.3f}; report {report['report_path']}")
            written += [plan_path, report["report_path"], os.path.join(out_dir, name, "grid.png")]
    for p in written:
        print(p)
    return written


# ================================================================================================ testbed demo
MODELS = ("testbed", "tiny-random")
# 64 image tokens (8x8 patches of the 16x16 latent): arrow:k keeps a band of half-width 64 // (2k) = 16, 8, 4 image
# tokens, i.e. ±2 rows, ±1 row, ±half a row of the patch grid. The default arrow:8,16,32 would give 4, 2, 1.
TESTBED_CANDIDATES = "arrow:2,arrow:4,arrow:8,cache"
TESTBED_DELTA = 0.02  # about half of the attention FLOPs removed at 28 steps (docs/TESTBED.md, δ sweep)


def world_grid(renders, dense, compressed, labels: list[str]):
    """A PIL image, one row per caption: world render | dense | compressed, each row under a label band."""
    from PIL import Image, ImageDraw, ImageFont

    from dfa2_jax.evaluate import LABEL_H

    w, h = dense[0].size
    grid = Image.new("RGB", (3 * w, len(dense) * (h + LABEL_H)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, (r, d, c) in enumerate(zip(renders, dense, compressed)):
        y = i * (h + LABEL_H)
        draw.text((2, y + 1), labels[i], fill=(0, 0, 0), font=font)
        for j, im in enumerate((Image.fromarray(r).resize((w, h), Image.NEAREST), d, c)):
            grid.paste(im.convert("RGB"), (j * w, y + LABEL_H))
    return grid


def run_testbed_demo(out_dir: str = "demo_out", *, steps: int | None = None, seed: int = 0,
                     delta: float = TESTBED_DELTA, candidates: str = TESTBED_CANDIDATES,
                     calibration_prompts: int = 4, eval_prompts: int = 8, repeat: int = 2,
                     log=print) -> list[str]:
    """The main job on the shipped SD3-style testbed: calibrate a plan on ``calibration_prompts`` held-out world
    captions (``world.make_batch(0, n, "heldout")``), then generate ``eval_prompts`` other held-out captions
    (``world.make_batch(1, n, "heldout")``, calibration captions dropped) dense and compressed from the same noise
    and compare them (:func:`dfa2_jax.evaluate.evaluate`: PSNR / SSIM, prompt accuracy, attention FLOPs kept,
    times). ``steps``: default the testbed's 28. Writes ``plan.json``, ``plan.png`` (heat-map), ``report.json``,
    ``grid.png`` (dense | compressed), ``grid_world.png`` (world render | dense | compressed), the images and the
    two caption lists. Returns the main files written."""
    import dataclasses

    from dfa2_jax.calibrate.calibrate import calibrate
    from dfa2_jax.evaluate import evaluate, format_table, write_json_atomic
    from dfa2_jax.plan_cli import render_heatmap
    from dfa2_jax.testbed import load_testbed, world

    if calibration_prompts < 1 or eval_prompts < 1:
        raise ValueError(f"calibration_prompts={calibration_prompts} and eval_prompts={eval_prompts} must be >= 1")
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    pipe, settings = load_testbed()
    if steps is not None:
        settings = dataclasses.replace(settings, num_inference_steps=int(steps))
    log(f"testbed: loaded {pipe.transformer.config.diffusers_class} ({pipe.transformer.num_params() / 1e6:.2f} M "
        f"params) in {time.perf_counter() - t0:.1f} s; {settings.height}x{settings.width}, "
        f"{settings.num_inference_steps} steps, CFG {settings.guidance_scale:g}, T5 length "
        f"{settings.max_sequence_length}")
    _, cal, _ = world.make_batch(0, calibration_prompts, "heldout")
    _, ev, scenes = world.make_batch(1, eval_prompts + calibration_prompts, "heldout")
    keep = [i for i, c in enumerate(ev) if c not in set(cal)][:eval_prompts]
    ev, renders = [ev[i] for i in keep], world.render_batch([scenes[i] for i in keep])
    for name, caps in (("prompts_calibration.txt", cal), ("prompts_eval.txt", ev)):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write("\n".join(caps) + "\n")

    t0 = time.perf_counter()
    # savings="exact": at 64 image + 109 text tokens the kernel's 128x64 tiles would cover every arrow band whole,
    # so tile savings would credit arrow with nothing (only cache); the exact mask counts the pairs skipped.
    res = calibrate(pipe, cal, resolution=(settings.height, settings.width), steps=settings.num_inference_steps,
                    delta=delta, candidates=candidates, seed=seed, guidance_scale=settings.guidance_scale,
                    savings="exact", progress=False, max_sequence_length=settings.max_sequence_length)
    t_cal = time.perf_counter() - t0
    plan_path = os.path.join(out_dir, "plan.json")
    res.plan.save(plan_path)
    s = res.summary
    log(f"calibrated on {len(cal)} held-out captions in {t_cal:.1f} s (δ={delta:g}, candidates {candidates}): "
        f"attention FLOPs kept {s['attention_flops_kept']:.3f}, methods {s['method_counts']}")
    n_img = res.plan.calibration["image_tokens"]
    heat_path = os.path.join(out_dir, "plan.png")
    render_heatmap(res.plan, n_img, heat_path, title=f"testbed plan, delta={delta:g}: attention FLOPs kept")

    report = evaluate(pipe, res.plan, ev, seed=seed, height=settings.height, width=settings.width,
                      guidance_scale=settings.guidance_scale, max_sequence_length=settings.max_sequence_length,
                      out_dir=out_dir, repeat=repeat, model="dfa2_jax/assets/testbed_sd3 (shipped testbed)")
    pa = report["prompt_accuracy"]
    labels = [f"{i} acc {pa['dense'][i]:.2f} / {pa['compressed'][i]:.2f}" for i in range(len(ev))]
    world_path = os.path.join(out_dir, "grid_world.png")
    world_grid(renders, report["images"]["dense"], report["images"]["compressed"], labels).save(world_path)
    saved = {k: v for k, v in report.items() if k not in ("images", "report_path")}
    saved["plan"] = {**saved["plan"], "path": "plan.json"}
    saved["demo"] = {"calibration_captions": cal, "calibration": {**s, "delta": delta, "candidates": candidates},
                     "generation": dataclasses.asdict(settings), "grid_world": "grid_world.png",
                     "plan": "plan.json", "plan_heatmap": "plan.png"}
    write_json_atomic(report["report_path"], saved)
    log(format_table(saved))
    written = [plan_path, heat_path, report["report_path"], os.path.join(out_dir, "grid.png"), world_path]
    for p in written:
        log(p)
    return written


def run_demo(out_dir: str = "demo_out", *, model: str = "testbed", steps: int | None = None, size: int | None = None,
             seed: int = 0, delta: float | None = None, **testbed_kw) -> list[str]:
    """``dfa2 demo``: :func:`run_testbed_demo` (``model="testbed"``, default) or :func:`run_tiny_demo`
    (``model="tiny-random"``; ``steps`` default 8, ``size`` 64, ``delta`` 0.3). Returns the files written."""
    if model == "testbed":
        if size is not None and size != 64:
            raise ValueError(f"--size {size}: the testbed was trained at 64x64 only")
        return run_testbed_demo(out_dir, steps=steps, seed=seed, delta=TESTBED_DELTA if delta is None else delta,
                                **testbed_kw)
    if model == "tiny-random":
        if testbed_kw:
            raise ValueError(f"{sorted(testbed_kw)}: options of the testbed demo, not of --model tiny-random")
        return run_tiny_demo(out_dir, steps=8 if steps is None else steps, size=64 if size is None else size,
                             seed=seed, delta=0.3 if delta is None else delta)
    raise ValueError(f"--model {model!r}: expected one of {', '.join(MODELS)}")
