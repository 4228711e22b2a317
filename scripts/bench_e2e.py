"""End-to-end speed: seconds per image of the whole denoising loop, diffusers vs ours dense vs ours with plans.

Full-size architectures with random bf16 weights (no checkpoint), batch 1, one GPU:

| case | model | resolution | steps | transformer batch |
|---|---|---|---|---|
| flux-1024 | FLUX.1-dev (57 attention sites, 24 heads × 128) | 1024² (4096 + 512 tokens) | 28 | 1 (guidance 3.5) |
| flux-2048 | FLUX.1-dev | 2048² (16384 + 512 tokens) | 28 | 1 |
| flux-2048-50 | FLUX.1-dev (costly; only when asked for) | 2048² | 50 | 1 |
| sd3-1024 | SD3-medium (24 sites, 24 heads × 64) | 1024² (4096 + 333 tokens) | 28 | 2 (CFG 7.0) |

What is timed is the transformer loop only: latents in, final latents out. Random text embeddings (T5 [B, T,
4096] and pooled CLIP) stand in for the text encoders and are identical on every side (one numpy seed, cast to
bf16); the VAE decode is excluded everywhere. The weights are random on both sides (different generators:
the images are noise; only time and memory are compared).

Variants per case:
(a) diffusers + PyTorch eager, bf16, cuDNN SDPA backend (``FluxTransformer2DModel`` / ``SD3Transformer2DModel``
    built from our config's diffusers dict; the pipeline's loop body: CFG batch doubling and combination for
    SD3, ``FlowMatchEulerDiscreteScheduler.step``). In its own subprocess (its peak memory is its own). The loop
    body is timed per iteration (median of ``--torch-step-iters`` iterations after 2 warm-up iterations,
    device-synchronised); then, if the time left allows (``--torch-mode auto``, the default) the real
    ``steps``-iteration loop is run ``--runs`` times and its median is the figure ("loop"); otherwise the
    figure is median iteration × steps ("step×N"). The table says which.
(a') the same with the transformer under ``torch.compile`` (``--torch-compile-mode``, default "default"), in its
    own subprocess: the first loop-body iteration compiles (its "compile s" = first iteration − median
    iteration), then the same per-iteration timing and loops as (a).
(b) ours dense: ``dfa2_jax.sample.denoise`` without a plan (one jitted ``lax.scan``, cuDNN flash attention).
(c) ours with three plans removing ~43%, ~56% and ~68% of the attention FLOPs (kept 0.57 / 0.44 / 0.32,
    counted in the arrow kernel's 128×64 tiles by ``dfa2_jax.plan.flops.plan_stats``); the compressed heads run
    what ``--attention-impl`` names (default "auto": the Pallas arrow kernel on a GPU, Mosaic GPU on Hopper; the
    jnp reference on a CPU); the META line says which implementation ran. The plan arrays and the initial
    head caches are built once (``dfa2_jax.sample.plan_inputs``, its host time reported as "setup") and the
    compiled sampler (``run_sampler``, what ``denoise`` calls) is timed; ``denoise`` itself redoes that
    setup (an ``eval_shape`` trace of the model) on every call.
(d) ours with every attention replaced by a cheap stand-in (q + k + v, element-wise: keeps every projection,
    norm and RoPE live so XLA cannot drop them) — the non-attention time of (b). Attention share of (b):
    a = 1 − t(d) / t(b). Amdahl bound of a plan over (b): 1 / ((1 − a) + a · kept), the speedup if the kept
    attention ran at cuDNN's dense rate and the rest were unchanged.

Timing protocol: every JAX variant is called once (that call compiles: compile s = first call − steady) then
timed ``--runs`` times (default 2; median) with fresh latents drawn outside the timed region. Time-aware: the
whole run keeps to ``--budget-s`` (default 540 s). The budget is split between cases in proportion to their
estimated H100 cost; within a case the JAX worker keeps a reserve for the diffusers workers, and a variant gets
more than one timed run only if the rest of the case still fits (the table's "runs" column says how many
were timed). A worker past its deadline is killed and the rows it printed so far are kept.

Memory: one JAX subprocess per case builds the weights once and runs (b), (c) and (d) in that order; the
reported peak is ``memory_stats()["peak_bytes_in_use"]`` after each variant — a process high-water mark that
cannot be reset. The plans carry head caches, so they need more than (b) and come after it; a variant whose
run did not raise the mark is shown as "≤ X" (its own peak is at most that). The first call's compilation
(XLA autotuning scratch) counts in the mark as well. torch: ``max_memory_allocated`` after
``reset_peak_memory_stats`` (weights included on both sides).

Expected wall time on one H100 (estimates from docs/PERFORMANCE.md's step and compile times): flux-2048 ≈ 10 min
with torch.compile (7–7.5 without), flux-1024 ≈ 5 min, sd3-1024 ≈ 2.5 min; flux-2048-50 needs ~14 min at
``--runs 2``. Within a shorter ``--budget-s`` variants get one timed run and the diffusers rows "step×N".

Plans: :func:`dfa2_jax.benchmarking.synthetic_plan` (deterministic, seed 0; no calibration: the weights are
random): step 0 full, full heads thinning out and cached heads growing along the steps, the kept fraction hit by
bisection; the three plans of a case share one ``RuntimeSpec`` and one compiled sampler.

    python3 scripts/bench_e2e.py --cases flux-2048 --out runs/e2e       # one GPU
    python3 scripts/bench_e2e.py --smoke --out /tmp/e2e                 # CPU, tiny configs, every code path

Prints one JSON line per measurement, a markdown table last; ``--out DIR`` writes DIR/e2e.json and the
workers' logs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import time

from dfa2_jax.benchmarking import CASES, PLAN_REMOVED, Case, amdahl_bound


@dataclasses.dataclass(frozen=True)
class Estimate:
    """H100 estimates (s), used only to split the budget: the JAX worker (--runs 2), a diffusers worker's minimum
    (import, weights, warm-up, per-step timing; with torch.compile its compile too) and its real loops (--runs
    of them)."""

    jax: float
    torch_min: float
    torch_loop: float
    compile_min: float  # the torch.compile worker's minimum (torch.compile: 74 s FLUX 1024², 106 s 2048²)

    def total(self, frameworks) -> float:
        return (self.jax * ("jax" in frameworks) + (self.torch_min + self.torch_loop) * ("torch" in frameworks)
                + (self.compile_min + self.torch_loop) * ("torch-compile" in frameworks))

    def later_min(self, fw: str, frameworks) -> float:
        """What the workers after ``fw`` in this case need at the least (their per-step figure)."""
        later = _later(fw, frameworks)
        return self.torch_min * ("torch" in later) + self.compile_min * ("torch-compile" in later)

    def reserve(self, fw: str, frameworks) -> float:
        """What the workers after ``fw`` in this case need for their figures (real loops included)."""
        return self.later_min(fw, frameworks) + self.torch_loop * sum(f in _later(fw, frameworks)
                                                                      for f in ("torch", "torch-compile"))


def _later(fw: str, frameworks) -> list[str]:
    order = [f for f in FRAMEWORKS if f in frameworks]
    return order[order.index(fw) + 1:]


ESTIMATES = {
    "flux-1024": Estimate(155, 25, 11, 100),
    "flux-2048": Estimate(350, 30, 50, 140),
    "sd3-1024": Estimate(70, 15, 3, 60),
    "flux-2048-50": Estimate(540, 30, 50, 140),
}
SMOKE_ESTIMATE = Estimate(25, 10, 1, 60)
FRAMEWORKS = ("jax", "torch", "torch-compile")  # the order the workers of a case run in
TORCH_VARIANTS = {"torch": "diffusers", "torch-compile": "diffusers-compile"}


def _emit(kind: str, obj: dict) -> None:
    print(f"{kind} {json.dumps(obj)}", flush=True)


class Clock:
    def __init__(self, deadline: float):
        self.deadline = deadline

    def left(self) -> float:
        return self.deadline - time.time()


# ------------------------------------------------------------------------------------------- JAX worker
def _no_attention_sampler():
    import functools

    import jax
    from flax import nnx

    from dfa2_jax.benchmarking import NoAttention
    from dfa2_jax.sample import velocity
    from dfa2_jax.scheduler import euler_step

    @functools.partial(jax.jit, static_argnums=(0,), static_argnames=("family", "do_cfg"), donate_argnums=(2,))
    def run(graphdef, state, latents, cond, timesteps, sigmas, *, family, do_cfg):
        # dfa2_jax.sample.scan_sampler without a plan, with the stand-in runtime
        model = nnx.merge(graphdef, state)

        def step(x, xs):
            v = velocity(model, x, xs["t"], cond, family=family, do_cfg=do_cfg, runtime=NoAttention())
            return euler_step(x, v, xs["sigma"], xs["sigma_next"]), None

        x, _ = jax.lax.scan(step, latents, {"t": timesteps, "sigma": sigmas[:-1], "sigma_next": sigmas[1:]})
        return x

    return run


def run_jax(name: str, case: Case, args, clock: Clock) -> None:
    import jax
    import jax.numpy as jnp

    import dfa2_jax
    from dfa2_jax.benchmarking import TINY_BLOCKS, arrow_implementation, sampler_inputs, schedule, synthetic_plan
    from dfa2_jax.plan import model_info_for
    from dfa2_jax.plan.flops import DEFAULT_BLOCKS
    from dfa2_jax.runtime import RuntimeSpec
    from dfa2_jax.sample import PlanArrays, denoise, plan_inputs, run_sampler, split_plan_inputs

    cfg = case.config
    dtype = jnp.dtype(args.dtype)
    dev = jax.devices()[0]
    impl_arg = args.attention_impl

    def mem():
        return dev.memory_stats() or {}

    # Plans first (host only): nothing on the device depends on them.
    t0 = time.perf_counter()
    info = model_info_for(cfg, case.text_tokens)
    n_img = case.image_tokens
    # Smoke shapes (64 image tokens, 3 steps) cannot reach the targets in 128×64 tiles: 16×16 tiles, best effort.
    blocks = TINY_BLOCKS if case.tiny else DEFAULT_BLOCKS
    plans = [(removed, *synthetic_plan(info, case.steps, n_img, removed, seed=args.seed, blocks=blocks,
                                       strict=not case.tiny))
             for removed in PLAN_REMOVED]
    plan_build_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    tr = dfa2_jax.random_transformer(cfg, dtype=args.dtype, seed=args.seed)
    jax.block_until_ready(tr.state)
    init_s = time.perf_counter() - t0
    weights_b = mem().get("bytes_in_use")

    family, do_cfg = case.family, case.do_cfg
    lat0, cond = sampler_inputs(cfg, res=case.res, text_len=case.text_tokens, dtype=dtype, seed=args.seed,
                                guidance=case.guidance)
    ts, sig = (jnp.asarray(a) for a in schedule(family, case.steps, n_img))
    # What the plans' compressed heads run (the kernel's operands: [model batch, S, H, D]).
    q = jax.ShapeDtypeStruct((2 if do_cfg else 1, n_img + case.text_tokens, cfg.num_attention_heads,
                              cfg.attention_head_dim), dtype)
    impl = arrow_implementation(impl_arg, q)
    tuned = None
    if impl == "triton":
        from pallas_kernels.tuning import tuned_config

        tuned = tuned_config(q.shape, dtype, case.text_tokens, family == "flux")
    _emit("META", {"case": name, "framework": "jax", "device": dev.device_kind, "platform": dev.platform,
                   "version": f"jax {jax.__version__}", "init_s": init_s, "plan_build_s": plan_build_s,
                   "weights_gib": weights_b / 2**30 if weights_b else None, "params_b": tr.num_params() / 1e9,
                   "attention_impl": impl_arg, "arrow_impl": impl,
                   "arrow_tuned_config": None if tuned is None else dataclasses.asdict(tuned),
                   "n_img": n_img, "text_tokens": case.text_tokens, "steps": case.steps,
                   "plans": [{"removed_target": r, "kept": s["attention_flops_kept"],
                              "method_counts": s["method_counts"],
                              "lambda": p.calibration["lambda"]} for r, p, s in plans]})

    def fresh():
        out = jnp.array(lat0, copy=True)  # the samplers donate their latents buffer
        return jax.block_until_ready(out)

    # Variants in order: dense, the plans (more memory: head caches), the stand-in (its peak is not reported).
    variants = [("dense", None, None)] + [(f"plan-{round(100 * r)}", r, (p, s)) for r, p, s in plans] + \
               [("no-attention", None, None)]
    est = {"compile": None, "run": None}  # from the dense variant, for the time policy
    compiled_specs: set = set()
    stand_in = _no_attention_sampler()

    def need(names) -> float:
        """Time the variants ``names`` still need at least (first call + one timed run each), from the dense
        figures (an upper bound for the plans); a plan whose structure is compiled already, or will be by an
        earlier one of ``names``, needs no compile."""
        if est["run"] is None:
            return 0.0
        compiled, total = set(compiled_specs), 0.0
        for v in names:
            spec = specs.get(v)
            total += (0.0 if spec is not None and spec in compiled else est["compile"]) + 2 * est["run"]
            if spec is not None:
                compiled.add(spec)
        return total

    specs = {}
    for vname, removed, plan in variants:
        if plan is not None:
            specs[vname] = RuntimeSpec.from_codes(plan[0].to_arrays(n_img)[0], cfg=do_cfg, impl=impl_arg)
    for vi, (vname, removed, plan) in enumerate(variants):
        rest = [v for v, _, _ in variants[vi + 1:]]
        if clock.left() < need([vname]):
            _emit("SKIP", {"case": name, "framework": "jax", "variant": vname,
                           "why": f"{clock.left():.0f} s left, needs ~{need([vname]):.0f} s"})
            continue
        setup_s, spec_shared = None, False
        if vname == "dense":
            def fn(z):
                return denoise(tr.graphdef, tr.state, z, cond, ts, sig, family=family, do_cfg=do_cfg)
        elif plan is not None:
            t0 = time.perf_counter()
            pa = PlanArrays(*plan[0].to_arrays(n_img))
            spec, plan_in = plan_inputs(tr.graphdef, tr.state, lat0, cond, ts, pa, family=family, do_cfg=do_cfg,
                                        attention_impl=impl_arg)
            jax.block_until_ready(plan_in)
            setup_s = time.perf_counter() - t0
            spec_shared = spec in compiled_specs

            # The sampler donates the plan's initial carried state: each call gets fresh zeros (a memset of the
            # head caches, inside the timed region: milliseconds against seconds).
            arrays, state0 = split_plan_inputs(plan_in)
            tmpl = jax.tree.map(lambda a: (a.shape, a.dtype, a.sharding), state0)

            def fn(z, spec=spec, arrays=arrays, tmpl=tmpl):
                fresh_state = jax.tree.map(lambda t: jax.device_put(jnp.zeros(t[0], t[1]), t[2]), tmpl,
                                           is_leaf=lambda t: isinstance(t, tuple))
                return run_sampler(tr.graphdef, tr.state, z, cond, ts, sig, {**arrays, "state": fresh_state},
                                   family=family, do_cfg=do_cfg, report=False, spec=spec)
        else:
            def fn(z):
                return stand_in(tr.graphdef, tr.state, z, cond, ts, sig, family=family, do_cfg=do_cfg)
        peak_before = mem().get("peak_bytes_in_use")
        z = fresh()
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(z))
        first_s = time.perf_counter() - t0
        times = []
        while len(times) < args.runs:
            if times:
                if clock.left() - need(rest) < 1.1 * statistics.median(times):
                    break  # keep the time the later variants need
            z = fresh()
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn(z))
            times.append(time.perf_counter() - t0)
            if vname == "dense":  # the time policy's estimates for every later variant
                est.update(compile=max(first_s - statistics.median(times), 0.0), run=statistics.median(times))
        steady = statistics.median(times)
        if plan is not None:
            compiled_specs.add(spec)
        finite = bool(jnp.isfinite(out.astype(jnp.float32)).all())
        del out
        peak = mem().get("peak_bytes_in_use")
        row = {"case": name, "framework": "jax", "variant": vname, "s_per_image": steady, "runs": times,
               "first_s": first_s, "compile_s": first_s - steady, "finite": finite,
               "peak_gib": peak / 2**30 if peak else None,
               "peak_raised": bool(peak and (peak_before is None or peak > peak_before)),
               "setup_s": setup_s, "spec_shared": spec_shared}
        if plan is not None:
            row.update(removed_target=removed, kept=plan[1]["attention_flops_kept"],
                       method_counts=plan[1]["method_counts"])
            del plan_in, arrays, fn
        _emit("ROW", row)


# ----------------------------------------------------------------------------------------- torch worker
def run_torch(name: str, case: Case, args, clock: Clock, *, compiled: bool = False) -> None:
    """The diffusers loop (eager, or with the transformer under ``torch.compile`` when ``compiled``)."""
    import diffusers
    import numpy as np
    import torch

    from dfa2_jax.benchmarking import flux_ids, random_inputs
    from dfa2_jax.scheduler import calculate_shift

    if case.tiny:
        torch.set_num_threads(1)  # tiny matmuls on a shared CPU: thread wake-ups cost more than the work
    cfg = case.config
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    torch.manual_seed(args.seed)
    kw = {k: v for k, v in cfg.to_diffusers().items() if k != "_class_name"}
    cls = diffusers.FluxTransformer2DModel if case.family == "flux" else diffusers.SD3Transformer2DModel
    t0 = time.perf_counter()
    torch.set_default_dtype(dtype)
    with dev:
        model = cls(**kw).eval()
    torch.set_default_dtype(torch.float32)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    init_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    fw, variant = ("torch-compile", "diffusers-compile") if compiled else ("torch", "diffusers")
    if compiled:
        model = torch.compile(model, mode=args.torch_compile_mode)

    x = random_inputs(cfg, res=case.res, text_len=case.text_tokens, do_cfg=case.do_cfg, seed=args.seed)
    lat0 = torch.from_numpy(x["latents"]).to(dev, dtype)
    embeds = torch.from_numpy(x["prompt_embeds"]).to(dev, dtype)
    pooled = torch.from_numpy(x["pooled_projections"]).to(dev, dtype)
    n_img = case.image_tokens
    if case.family == "flux":
        sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                          max_shift=1.15, base_image_seq_len=256,
                                                          max_image_seq_len=4096)
        sched_kw = dict(sigmas=list(np.linspace(1.0, 1 / case.steps, case.steps)), mu=calculate_shift(n_img))
        txt, img = flux_ids(case.res, case.text_tokens)
        img_ids, txt_ids = torch.from_numpy(img).to(dev), torch.from_numpy(txt).to(dev)
        guidance = torch.full((1,), case.guidance, device=dev, dtype=torch.float32)

        def body(i, latents):  # diffusers FluxPipeline.__call__'s loop body
            t = sched.timesteps[i]
            timestep = t.expand(latents.shape[0]).to(latents.dtype)
            v = model(hidden_states=latents, timestep=timestep / 1000, guidance=guidance, pooled_projections=pooled,
                      encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
            return sched.step(v, t, latents, return_dict=False)[0]
    else:
        sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
        sched_kw = dict(num_inference_steps=case.steps)

        def body(i, latents):  # diffusers StableDiffusion3Pipeline.__call__'s loop body (CFG)
            t = sched.timesteps[i]
            model_in = torch.cat([latents] * 2)
            v = model(hidden_states=model_in, timestep=t.expand(model_in.shape[0]), encoder_hidden_states=embeds,
                      pooled_projections=pooled, return_dict=False)[0]
            uncond, text = v.chunk(2)
            v = uncond + case.guidance * (text - uncond)
            return sched.step(v, t, latents, return_dict=False)[0]

    def reset():
        sched.set_timesteps(device=dev, **sched_kw)
        return lat0.clone()

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        return out, time.perf_counter() - t0

    _emit("META", {"case": name, "framework": fw, "device": torch.cuda.get_device_name() if cuda else "cpu",
                   "version": f"torch {torch.__version__} diffusers {diffusers.__version__}", "init_s": init_s,
                   "params_b": sum(p.numel() for p in model.parameters()) / 1e9,
                   "compile_mode": args.torch_compile_mode if compiled else None})

    def report(step_s, step_times, first_s, loops, lat):
        # emitted after the per-step timing and again after every loop run: a kill keeps the latest figure
        _emit("ROW", {"case": name, "framework": fw, "variant": variant,
                      "s_per_image": statistics.median(loops) if loops else case.steps * step_s,
                      "mode": "loop" if loops else "step×N", "runs": loops, "step_s": step_s,
                      "step_iters": step_times, "first_step_s": first_s,
                      # eager: the first iteration's overhead (cuDNN plans, allocator); compiled: torch.compile
                      "compile_s": first_s - step_s,
                      "finite": bool(torch.isfinite(lat.float()).all()),
                      "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None})

    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        if cuda:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel([SDPBackend.CUDNN_ATTENTION]))
        lat = reset()  # warm-up: two iterations (the first one compiles under torch.compile)
        lat, first_s = timed(lambda: body(0, lat))
        lat = body(1, lat) if case.steps > 1 else lat
        lat = reset()
        step_times = []
        for i in range(min(args.torch_step_iters, case.steps)):
            lat, dt = timed(lambda i=i: body(i, lat))
            step_times.append(dt)
        step_s = statistics.median(step_times)
        loops = []
        report(step_s, step_times, first_s, loops, lat)

        def loop():
            z = lat0.clone()
            for i in range(case.steps):
                z = body(i, z)
            return z

        while args.torch_mode != "step" and len(loops) < args.runs:
            guess = statistics.median(loops) if loops else case.steps * step_s
            if (args.torch_mode == "auto" or loops) and clock.left() < 1.1 * guess + 2:
                break
            reset()
            lat, dt = timed(loop)
            loops.append(dt)
            report(step_s, step_times, first_s, loops, lat)


# ------------------------------------------------------------------------------------------------ parent
def _run_worker(cmd, env, soft_deadline: float, hard_deadline: float, log_path: str | None):
    """Run one worker (its own process group, so a kill takes its children too); on the hard deadline kill it and
    keep what it printed. -> (rc, records, stderr tail)."""
    proc = subprocess.Popen(cmd + ["--deadline", f"{soft_deadline:.3f}"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    timeout = max(hard_deadline - time.time(), 1.0)
    killed = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        killed = True
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    if log_path:
        with open(log_path, "w") as f:
            f.write(out + "\n--- stderr ---\n" + err)
    records = []
    for line in out.splitlines():
        kind, _, rest = line.partition(" ")
        if kind in ("ROW", "META", "SKIP", "DONE"):
            records.append((kind, json.loads(rest)))
            print(line, flush=True)
    done = any(kind == "DONE" for kind, _ in records)
    rc = 0 if done else "killed at its deadline" if killed else proc.returncode
    return rc, records, err[-3000:]


def _fmt(x, f=".2f", none="—"):
    return none if x is None else format(x, f)


def summarise(rows: list[dict]) -> dict:
    """Per-case derived figures: attention share of dense, speedups, Amdahl bounds."""
    by = {(r["framework"], r["variant"]): r for r in rows}
    dense, stand = by.get(("jax", "dense")), by.get(("jax", "no-attention"))
    eager, compiled = by.get(("torch", "diffusers")), by.get(("torch-compile", "diffusers-compile"))
    share = None
    if dense and stand:
        share = 1.0 - stand["s_per_image"] / dense["s_per_image"]
    bound_ok = share is not None and 0.0 <= share <= 1.0  # timing noise on tiny smoke shapes can leave [0, 1]
    for r in rows:
        stand_in = r["variant"] == "no-attention"  # a measuring device, not an image: no speedups

        def vs(base):
            return base["s_per_image"] / r["s_per_image"] if base and not stand_in else None

        r["speedup_vs_dense"] = vs(dense)
        r["speedup_vs_diffusers"] = vs(eager)
        r["speedup_vs_compiled"] = vs(compiled)
        r["amdahl_bound"] = amdahl_bound(share, r["kept"]) if bound_ok and "kept" in r else None
    return {"attention_share": share}


NOTES = [
    "transformer loop only (latents in, latents out): random text embeddings, identical on every side, stand in "
    "for the encoders; the VAE decode is excluded everywhere; random weights on both sides",
    "s/image: median of the timed runs after one compile run (the 'timed runs' column; fewer than --runs when the "
    "time budget was short)",
    "(a) [loop]: the real diffusers loop, median of its timed runs; [step×N]: median loop-body iteration (transformer "
    "+ CFG + scheduler step, device-synchronised) × steps. Its 'compile s' is eager's first-iteration overhead",
    "(a') the same loop with the transformer under torch.compile; its 'compile s' = first iteration − median "
    "iteration (the compile)",
    "compile s = first call − steady; '(shared)': the plan has the structure (RuntimeSpec) of an earlier plan and "
    "reuses its compiled sampler",
    "JAX peaks: process high-water mark after each variant, weights included ('≤': the variant did not raise it, "
    "its own peak is at most that); torch: max_memory_allocated, weights included",
    "attention share of (b) = 1 − t(d)/t(b), (d) = every attention replaced by q + k + v (element-wise)",
    "Amdahl bound vs (b) = 1/((1 − share) + share·kept), kept = attention FLOPs kept in 128×64 kernel tiles",
]
SMOKE_NOTE = ("smoke: tiny configs on CPU, timings meaningless; 3 steps and 64 image tokens cannot reach the "
              "plan targets (16×16 tiles, best effort: the kept column is what the plan keeps)")


def _speedup(v) -> str:
    return "—" if v is None else f"{v:.3f}×"


def table(results: dict) -> str:
    head = ("| case | variant | attn FLOPs kept | s/image | timed runs | compile s | vs (b) dense | vs (a) diffusers "
            "| vs (a') torch.compile | Amdahl bound vs (b) | attn share of (b) | peak GiB |")
    lines = [head, "|" + "|".join(["---"] * 12) + "|"]
    for name, res in results.items():
        rows = res["rows"]
        order = [("torch", "diffusers"), ("torch-compile", "diffusers-compile"), ("jax", "dense")] + \
                [("jax", f"plan-{round(100 * r)}") for r in PLAN_REMOVED] + [("jax", "no-attention")]
        by = {(r["framework"], r["variant"]): r for r in rows}
        for key in order:
            r = by.get(key)
            if r is None:
                continue
            if key[0].startswith("torch"):
                label = (f"(a) diffusers eager, cuDNN SDPA [{r['mode']}]" if key[0] == "torch" else
                         f"(a') diffusers + torch.compile, cuDNN SDPA [{r['mode']}]")
                runs = str(len(r["runs"])) if r["runs"] else f"{len(r['step_iters'])} steps"
                kept = "1"
            elif key[1] == "dense":
                label, runs, kept = "(b) ours dense", str(len(r["runs"])), "1"
            elif key[1] == "no-attention":
                label, runs, kept = "(d) ours, attention → q+k+v", str(len(r["runs"])), "0"
            else:
                label = f"(c) ours, plan −{round(100 * r['removed_target'])}%"
                runs, kept = str(len(r["runs"])), f"{r['kept']:.3f}"
            peak = r.get("peak_gib")
            peak_s = "—" if peak is None else (f"{peak:.1f}" if r.get("peak_raised", True) else f"≤ {peak:.1f}")
            if key[1] == "no-attention":
                peak_s = "—"
            share = res["attention_share"] if key == ("jax", "dense") else None
            share_s = "—" if share is None else f"{100 * share:.1f}%"
            comp = _fmt(r["compile_s"], ".1f") + (" (shared)" if r.get("spec_shared") else "")
            lines.append(f"| {name} | {label} | {kept} | {r['s_per_image']:.3f} | {runs} | {comp} "
                         f"| {_speedup(r['speedup_vs_dense'])} | {_speedup(r['speedup_vs_diffusers'])} "
                         f"| {_speedup(r.get('speedup_vs_compiled'))} | {_speedup(r['amdahl_bound'])} "
                         f"| {share_s} | {peak_s} |")
        for s in res["skipped"]:
            lines.append(f"| {name} | {s} | | | | | | | | | | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=None,
                    help=f"comma list of {', '.join(CASES)} (default flux-2048; --smoke: flux-1024,sd3-1024)")
    ap.add_argument("--attention-impl", default="auto", choices=("auto", "xla", "triton", "mosaic_gpu", "interpret"),
                    help="how the plans' compressed heads run (dfa2_jax.sample.denoise's attention_impl)")
    ap.add_argument("--runs", type=int, default=2, help="timed runs per variant after the compile run (median)")
    ap.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget of the whole run")
    ap.add_argument("--torch-mode", choices=("auto", "loop", "step"), default="auto",
                    help="diffusers: real loop (loop), median iteration × steps (step), or loop if time allows")
    ap.add_argument("--torch-step-iters", type=int, default=5)
    ap.add_argument("--frameworks", default="jax,torch,torch-compile",
                    help="comma list of jax (ours), torch (diffusers eager), torch-compile (diffusers + torch.compile)")
    ap.add_argument("--torch-compile-mode", default="default",
                    help="torch.compile's mode for the torch-compile worker (e.g. max-autotune-no-cudagraphs)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny configs, 128², 3 steps (every code path)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="folder for e2e.json and the workers' logs")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dtype is None:
        args.dtype = "float32" if args.smoke else "bfloat16"
    if args.cases is None:  # --smoke: one FLUX (guidance embedding) and one SD3 (CFG) path
        args.cases = "flux-1024,sd3-1024" if args.smoke else "flux-2048"
    names = args.cases.split(",")
    for n in names:
        if n not in CASES:
            raise SystemExit(f"--cases: unknown case {n!r} (known: {', '.join(CASES)})")
    case_of = {n: CASES[n].smoke() if args.smoke else CASES[n] for n in names}
    est_of = {n: SMOKE_ESTIMATE if args.smoke else ESTIMATES[n] for n in names}
    frameworks = args.frameworks.split(",")
    for fw in frameworks:
        if fw not in FRAMEWORKS:
            raise SystemExit(f"--frameworks: unknown framework {fw!r} (known: {', '.join(FRAMEWORKS)})")

    if args.worker:
        fw, name = args.worker.split(":")
        clock = Clock(args.deadline or time.time() + 1e9)
        if fw == "jax":
            run_jax(name, case_of[name], args, clock)
        else:
            run_torch(name, case_of[name], args, clock, compiled=fw == "torch-compile")
        _emit("DONE", {"case": name, "framework": fw})  # a kill after this line lost nothing
        return

    start = time.time()
    deadline = start + args.budget_s
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # peak figures are the process's own use
    if args.smoke:
        env.setdefault("JAX_PLATFORMS", "cpu")
        env["CUDA_VISIBLE_DEVICES"] = ""
    base = [sys.executable, os.path.abspath(__file__), "--runs", str(args.runs), "--cases", args.cases,
            "--torch-mode", args.torch_mode, "--torch-step-iters", str(args.torch_step_iters), "--seed",
            str(args.seed), "--dtype", args.dtype, "--attention-impl", args.attention_impl,
            "--torch-compile-mode", args.torch_compile_mode, "--frameworks", args.frameworks] + \
        (["--smoke"] if args.smoke else [])
    results, metas, errors = {}, {}, []
    for i, name in enumerate(names):
        est = est_of[name]
        now = time.time()
        left = deadline - now
        share = left * est.total(frameworks) / sum(est_of[n].total(frameworks) for n in names[i:])
        case_deadline = now + share
        rows, skipped = [], []
        print(f"== {name}: {share:.0f} s of {left:.0f} s left", flush=True)
        for fw in FRAMEWORKS:
            if fw not in frameworks:
                continue
            # soft: the worker's own deadline, keeping what the later workers need for their figures; hard: it is
            # killed, keeping their minimum
            soft = case_deadline - est.reserve(fw, frameworks)
            if fw == "jax":
                hard = min(case_deadline - est.later_min(fw, frameworks), deadline + 15)
            else:
                hard = min(case_deadline - est.later_min(fw, frameworks) + 30, deadline + 20)
            if hard - time.time() < 5:
                skipped.append(f"{fw}: skipped (no time left)")
                continue
            log = os.path.join(args.out, f"log_{fw}_{name}.txt") if args.out else None
            rc, records, err = _run_worker(base + ["--worker", f"{fw}:{name}"], env, soft, hard, log)
            for kind, rec in records:
                if kind == "ROW":  # a later row of the same variant supersedes an earlier one
                    rows = [r for r in rows if (r["framework"], r["variant"]) != (rec["framework"], rec["variant"])]
                    rows.append(rec)
                elif kind == "META":
                    metas[f"{fw}:{name}"] = rec
                elif kind == "SKIP":
                    skipped.append(f"{fw} {rec['variant']}: skipped ({rec['why']})")
            if rc != 0:
                errors.append({"case": name, "framework": fw, "rc": rc, "stderr_tail": err})
                skipped.append(f"{fw}: worker {'was ' if isinstance(rc, str) else 'failed, rc '}{rc}")
                print(f"{fw}:{name} rc {rc}\n{err}", flush=True)
        results[name] = {"rows": rows, "skipped": skipped}
        results[name].update(summarise(rows))
    total = time.time() - start
    out = {"args": {k: v for k, v in vars(args).items() if k not in ("worker", "deadline")}, "total_s": total,
           "meta": metas, "results": results, "errors": errors,
           "notes": NOTES + ([SMOKE_NOTE] if args.smoke else [])}
    if args.out:
        with open(os.path.join(args.out, "e2e.json"), "w") as f:
            json.dump(out, f, indent=2)
    print(f"\ntotal {total:.0f} s (budget {args.budget_s:.0f} s)")
    for key, m in sorted(metas.items()):
        extra = f", torch.compile mode {m['compile_mode']}" if m.get("compile_mode") else ""
        if m["framework"] == "jax":
            extra = (f", attention_impl {m['attention_impl']} -> arrow impl {m['arrow_impl']} "
                     f"(Triton tuned config: {m['arrow_tuned_config'] or 'none'}), "
                     f"weights {_fmt(m['weights_gib'], '.1f')} GiB, plans built in {m['plan_build_s']:.1f} s")
        print(f"{key}: {m['device']}, {m['version']}, weights init {m['init_s']:.1f} s{extra}")
    for name, res in results.items():
        setups = [f"{r['variant']} {r['setup_s']:.1f} s" for r in res["rows"] if r.get("setup_s") is not None]
        if setups:
            print(f"{name}: plan setup (plan_inputs, once per plan; denoise() repeats it per call): "
                  + ", ".join(setups))
    for n in out["notes"]:
        print("note:", n)
    print()
    print(table(results))


if __name__ == "__main__":
    main()
