"""``dfa2 eval``: PSNR / SSIM (against scikit-image when installed, a slow direct implementation, recorded skimage
values and closed forms), prompts files, and dense-vs-compressed evaluation on the embedded tiny pipelines."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
from PIL import Image

from dfa2_jax.evaluate import (CLIP_FOLDERS, LABEL_H, EvalError, evaluate, format_table, gaussian_taps,
                               image_metrics, initial_noise, make_grid, metrics_status, psnr, read_prompts, ssim)
from dfa2_jax.plan import Plan, PlanError, model_info_for

H = W = 32
STEPS = 3
PROMPTS = ["a small red circle", "a green triangle on grey"]


# ============================================================================================ metrics
def slow_ssim(a, b, data_range=255.0, sigma=1.5):
    """Wang et al. 2004 computed window by window: a 2-D Gaussian of σ = 1.5 over an 11x11 window (radius 5),
    weighted mean / population variance / covariance of every window lying fully inside the image, averaged
    over those windows, then over channels."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    r = 5
    x = np.arange(-r, r + 1)
    g = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma ** 2))
    g /= g.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    per_channel = []
    for ch in range(a.shape[2]):
        vals = []
        for i in range(r, a.shape[0] - r):
            for j in range(r, a.shape[1] - r):
                pa, pb = a[i - r:i + r + 1, j - r:j + r + 1, ch], b[i - r:i + r + 1, j - r:j + r + 1, ch]
                ma, mb = (g * pa).sum(), (g * pb).sum()
                va, vb = (g * (pa - ma) ** 2).sum(), (g * (pb - mb) ** 2).sum()
                cov = (g * (pa - ma) * (pb - mb)).sum()
                vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
        per_channel.append(np.mean(vals))
    return float(np.mean(per_channel))


def _pair(shape, seed, spread=40):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-spread, spread + 1, shape), 0, 255).astype(np.uint8)
    return a, b


def _formula_pair():
    """A deterministic pair (no RNG) whose skimage 0.26 values are recorded below."""
    i, j, c = np.meshgrid(np.arange(24), np.arange(31), np.arange(3), indexing="ij")
    a = ((i * 7 + j * 13 + c * 50 + (i * j) % 17) % 256).astype(np.uint8)
    b = np.clip(a.astype(int) + ((i * i * 3 + j * 5 * (c + 1)) % 41 - 20), 0, 255).astype(np.uint8)
    return a, b


def test_gaussian_window_is_scipys_11_taps():
    w = gaussian_taps()
    assert len(w) == 11 and w.sum() == pytest.approx(1.0, abs=1e-15)
    x = np.arange(-5, 6)
    np.testing.assert_allclose(w, np.exp(-x ** 2 / 4.5) / np.exp(-x ** 2 / 4.5).sum(), rtol=1e-14)


@pytest.mark.parametrize("shape", [(11, 11, 3), (16, 23, 3), (20, 14)])
def test_ssim_matches_direct_implementation(shape):
    a, b = _pair(shape, seed=sum(shape))
    assert ssim(a, b) == pytest.approx(slow_ssim(a, b), abs=1e-12)
    assert ssim(a, b) < 1.0


def test_ssim_psnr_recorded_skimage_values():
    a, b = _formula_pair()  # skimage 0.26.0: structural_similarity(..., gaussian_weights=True, sigma=1.5,
    # use_sample_covariance=False, data_range=255, channel_axis=-1), peak_signal_noise_ratio(..., data_range=255)
    assert ssim(a, b) == pytest.approx(0.927717100788768, abs=1e-12)
    assert psnr(a, b) == pytest.approx(26.8604236251717, abs=1e-10)


def test_ssim_psnr_against_skimage_when_installed():
    metrics = pytest.importorskip("skimage.metrics")
    for shape, seed in (((32, 32, 3), 0), ((37, 53, 3), 1), ((11, 11, 3), 2)):
        a, b = _pair(shape, seed)
        want = metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                             data_range=255, channel_axis=-1)
        assert ssim(a, b) == pytest.approx(want, abs=1e-12)
        assert psnr(a, b) == pytest.approx(metrics.peak_signal_noise_ratio(a, b, data_range=255), abs=1e-10)


def test_identical_images():
    a, _ = _pair((24, 24, 3), 3)
    assert psnr(a, a) == math.inf
    assert ssim(a, a) == 1.0
    img = Image.fromarray(a)
    assert ssim(img, img.copy()) == 1.0  # PIL images are accepted


def test_constant_offset_closed_forms():
    a = np.full((16, 16, 3), 100, np.uint8)
    b = a + np.uint8(10)  # MSE 100
    assert psnr(a, b) == pytest.approx(10 * math.log10(255 ** 2 / 100), abs=1e-12)
    # constant images: no variance, SSIM = luminance term (2·μa·μb + C1) / (μa² + μb² + C1)
    c1 = (0.01 * 255) ** 2
    assert ssim(a, b) == pytest.approx((2 * 100 * 110 + c1) / (100 ** 2 + 110 ** 2 + c1), abs=1e-12)
    # an offset on a textured image: PSNR only sees the offset
    t, _ = _pair((20, 20, 3), 4)
    t = (t // 2).astype(np.uint8)
    assert psnr(t, t + np.uint8(3)) == pytest.approx(10 * math.log10(255 ** 2 / 9), abs=1e-12)
    assert psnr(t, t, data_range=1.0) == math.inf


def test_metric_input_errors():
    a = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="different shapes"):
        psnr(a, a[:8])
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(a[:10], a[:10])
    with pytest.raises(ValueError, match="HxW"):
        ssim(a[None], a[None])


# ============================================================================================ inputs / outputs
def test_read_prompts(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# header\n\n  a red fox  \n# skipped\n\t\nblue sky # not a comment\n", encoding="utf-8")
    assert read_prompts(f) == ["a red fox", "blue sky # not a comment"]
    e = tmp_path / "empty.txt"
    e.write_text("# only a comment\n\n   \n")
    with pytest.raises(ValueError, match="empty.txt: no prompts"):
        read_prompts(e)
    with pytest.raises(EvalError, match="no such prompts file"):
        read_prompts(tmp_path / "missing.txt")


def test_make_grid_size():
    d = [Image.new("RGB", (20, 12), (255, 0, 0))] * 3
    c = [Image.new("RGB", (20, 12), (0, 0, 255))] * 3
    g = make_grid(d, c)
    assert g.size == (40, 3 * (12 + LABEL_H))
    px = np.asarray(g)
    assert tuple(px[LABEL_H + 5, 5]) == (255, 0, 0) and tuple(px[LABEL_H + 5, 25]) == (0, 0, 255)


def write_random_lpips(metrics_dir, net: str = "alex", seed: int = 0) -> tuple[str, str]:
    """Random LPIPS weights of ``net`` under the metrics folder layout (dfa2_jax.metrics.lpips), written with our
    torch-free torch.save writer: the backbone (``features.*`` + a ``classifier`` stand-in) and the heads."""
    from flax import nnx

    from converters import common
    from converters.torch_pickle import save_torch_file
    from dfa2_jax.metrics.lpips import LPIPS, LPIPSConfig, lpips_files

    rng = np.random.default_rng(seed)
    abstract = nnx.eval_shape(lambda: LPIPS(LPIPSConfig.for_net(net), rngs=nnx.Rngs(0)))
    backbone, heads = {"classifier.1.bias": np.zeros(4, np.float32)}, {}
    for path, leaf in nnx.to_flat_state(nnx.state(abstract)):
        key = common.leaf_key(path)
        a = rng.normal(0, 0.05, common.torch_shape(str(path[-1]), leaf.shape)).astype(np.float32)
        if key.startswith("lin"):
            heads[key] = np.abs(a) * 20
        else:
            backbone[key] = a
    files = lpips_files(metrics_dir, net)
    (metrics_dir / "lpips" / "v0.1").mkdir(parents=True, exist_ok=True)
    save_torch_file(backbone, files[0])
    save_torch_file(heads, files[1])
    return files


def test_metrics_status(tmp_path, monkeypatch):
    monkeypatch.delenv("DFA2_METRICS_DIR", raising=False)
    s = metrics_status()
    assert s["lpips_files"] is None and s["clip_folder"] is None and "never downloaded" in s["lpips_skipped"]
    assert s["metrics_dir"] is None and "$DFA2_METRICS_DIR" in s["clip_score_skipped"]
    monkeypatch.setenv("DFA2_METRICS_DIR", str(tmp_path))
    s = metrics_status()
    alex, heads = tmp_path / "lpips" / "alexnet-owt-7be5be79.pth", tmp_path / "lpips" / "v0.1" / "alex.pth"
    assert s["metrics_dir"] == str(tmp_path)
    assert s["lpips_skipped"].startswith(f"missing {alex} and {heads} (LPIPS-alex")
    assert s["clip_score_skipped"].startswith(f"missing {tmp_path / CLIP_FOLDERS[0]} (or ")

    write_random_lpips(tmp_path)
    heads.unlink()
    s = metrics_status(tmp_path)
    assert s["lpips_files"] is None and s["lpips_skipped"].startswith(f"missing {heads} (")
    write_random_lpips(tmp_path)
    s = metrics_status(tmp_path)
    assert s["lpips_files"] == [str(alex), str(heads)] and s["lpips_skipped"] is None
    assert metrics_status(tmp_path, lpips_net="vgg")["lpips_skipped"].startswith(
        f"missing {tmp_path / 'lpips' / 'vgg16-397923af.pth'} and {tmp_path / 'lpips' / 'v0.1' / 'vgg.pth'}")

    clip = tmp_path / "clip-vit-base-patch32"  # any folder of CLIP_FOLDERS; it lacks every file
    clip.mkdir()
    s = metrics_status(tmp_path)
    assert s["clip_folder"] is None and s["clip_score_skipped"].startswith(f"missing {clip / 'config.json'} (")
    (clip / "config.json").write_text("{}")
    assert metrics_status(tmp_path)["clip_score_skipped"].startswith(f"missing {clip / 'model.safetensors'} (")
    (clip / "model.safetensors").write_bytes(b"")
    assert metrics_status(tmp_path)["clip_score_skipped"].startswith(f"missing {clip / 'vocab.json'} (")
    (clip / "tokenizer.json").write_text("{}")
    assert metrics_status(tmp_path)["clip_folder"] == str(clip)

    # files that are there but do not load: skipped with the loader's message, which names the file
    r = image_metrics(["x"], {"dense": [np.zeros((32, 32, 3), np.uint8)], "compressed": [np.zeros((32, 32, 3),
                                                                                              np.uint8)]}, tmp_path)
    assert r["lpips"]["per_image"] == [pytest.approx(0.0, abs=1e-9)]  # identical images
    assert r["clip_score"] is None and r["clip_score_skipped"].startswith("CLIP score: ") and \
        str(clip) in r["clip_score_skipped"]
    small = {"dense": [np.zeros((30, 30, 3), np.uint8)], "compressed": [np.zeros((30, 30, 3), np.uint8)]}
    assert "at least 31x31" in image_metrics(["x"], small, tmp_path)["lpips_skipped"]


# ============================================================================================ evaluate
@pytest.fixture(scope="module")
def tiny(tiny_pipes):
    return tiny_pipes


def random_plan(pipe, steps, methods, seed=0) -> Plan:
    info = model_info_for(pipe.transformer.config)
    rng = np.random.default_rng(seed)
    a = rng.integers(0, len(methods), (steps, len(info["layers"]), info["num_heads"]))
    a[0] = 0  # step 0 full
    return Plan(info, steps, methods, a)


def _strict_json(path):
    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    with open(path, encoding="utf-8") as f:
        return json.load(f, parse_constant=no_constants)


def test_evaluate_all_full_plan_is_dense(tiny, tmp_path):
    pipe = tiny["sd3"]
    plan = Plan.all_full(model_info_for(pipe.transformer.config), STEPS)
    r = evaluate(pipe, plan, PROMPTS, seed=5, height=H, width=W, batch_size=1, repeat=1, out_dir=tmp_path)
    for p in r["per_image"]:
        assert p["identical"] and p["psnr"] == math.inf and p["ssim"] == 1.0
    assert r["mean"] == {"psnr": math.inf, "ssim": 1.0}
    assert r["attention_flops_kept"]["tiles"] == 1.0 and r["attention_flops_kept"]["exact"] == 1.0
    assert r["steps"] == STEPS and r["timings"]["dense"]["steady_s"] is None
    rep = _strict_json(r["report_path"])
    assert rep["per_image"][0]["psnr"] == "inf" and rep["mean"]["psnr"] == "inf"
    # prompt i's noise is the pipeline's own draw for one prompt with seed + i
    one = pipe(PROMPTS[1], height=H, width=W, num_inference_steps=STEPS, seed=6)
    assert np.array_equal(np.asarray(one.images[0]), np.asarray(r["images"]["dense"][1]))


def test_evaluate_compressed_plan(tiny, tmp_path):
    pipe = tiny["sd3"]
    plan = random_plan(pipe, STEPS, ["full", "arrow:4", "cache"])
    plan_path = tmp_path / "plan.json"
    plan.save(plan_path)
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    out = tmp_path / "out"
    r = evaluate(pipe, str(plan_path), PROMPTS, seed=0, height=H, width=W, out_dir=out, metrics_dir=metrics,
                 model="tiny-sd3", batch_size=1)  # batch 1 everywhere: the tests share their compiled samplers
    assert len(r["per_image"]) == 2
    for p in r["per_image"]:
        assert math.isfinite(p["psnr"]) and p["psnr"] > 0 and 0 < p["ssim"] < 1 and not p["identical"]
    assert r["mean"]["psnr"] == pytest.approx(np.mean([p["psnr"] for p in r["per_image"]]))
    f = r["attention_flops_kept"]
    assert 0 < f["tiles"] < 1 and 0 < f["exact"] < 1 and f["blocks"] == [128, 64]
    assert r["image_tokens"] == 64 and r["text_tokens"] == 77 + 256  # 32 px / VAE 2 / patch 2 = 8x8
    t = r["timings"]
    assert t["dense"]["first_s"] > 0 and t["compressed"]["steady_s"] > 0 and t["speedup_steady"] > 0
    assert t["repeats_identical"] is True

    rep = _strict_json(out / "report.json")
    assert r["report_path"] == str(out / "report.json")
    for key in ("model", "plan", "prompts", "seed", "resolution", "steps", "per_image", "mean",
                "attention_flops_kept", "timings", "versions", "lpips", "lpips_skipped", "clip_score",
                "clip_score_skipped"):
        assert key in rep, key
    assert rep["model"]["name"] == "tiny-sd3" and rep["plan"]["path"] == str(plan_path)
    assert rep["prompts"] == PROMPTS and rep["resolution"] == [H, W] and rep["steps"] == STEPS
    assert rep["lpips"] is None and rep["lpips_skipped"].startswith(f"missing {metrics / 'lpips'}")
    assert rep["clip_score"] is None and rep["clip_score_skipped"].startswith(f"missing {metrics / CLIP_FOLDERS[0]}")
    assert rep["metrics_dir"] == str(metrics)
    assert set(rep["versions"]) >= {"jax", "dfa2_jax"}
    assert rep["per_image"][1]["ssim"] == pytest.approx(r["per_image"][1]["ssim"])
    assert not list(out.glob(".*.tmp"))

    grid = Image.open(out / "grid.png")
    assert grid.size == (2 * W, len(PROMPTS) * (H + LABEL_H))
    g = np.asarray(grid.convert("RGB"))
    for i in range(len(PROMPTS)):
        d, c = Image.open(out / f"dense_{i}.png"), Image.open(out / f"compressed_{i}.png")
        assert d.size == c.size == (W, H)
        y = i * (H + LABEL_H) + LABEL_H
        assert np.array_equal(g[y:y + H, :W], np.asarray(d.convert("RGB")))
        assert np.array_equal(g[y:y + H, W:], np.asarray(c.convert("RGB")))
        assert psnr(d, c) == pytest.approx(r["per_image"][i]["psnr"])
    text = format_table(r)
    assert "mean" in text and "FLOPs kept" in text and "lpips: skipped" in text


def test_evaluate_reports_lpips_and_clip_score(tiny, tmp_path):
    pytest.importorskip("torch")  # the tiny CLIP folder is a transformers CLIPModel.save_pretrained
    from dfa2_jax.metrics import clip_score, lpips
    from tests.test_clip_score import make_tiny_clip_folder

    pipe = tiny["sd3"]
    metrics = tmp_path / "metrics"
    backbone, heads = write_random_lpips(metrics)
    make_tiny_clip_folder(metrics / "clip-vit-base-patch16", image_size=24)  # resized 32 -> 24, no crop
    plan = random_plan(pipe, STEPS, ["full", "arrow:4", "cache"])
    r = evaluate(pipe, plan, PROMPTS, seed=0, height=H, width=W, out_dir=tmp_path / "out", metrics_dir=metrics,
                 repeat=1, batch_size=1)
    rep = _strict_json(r["report_path"])
    assert "lpips_skipped" not in rep and "clip_score_skipped" not in rep
    lp, cs = rep["lpips"], rep["clip_score"]
    want = lpips.lpips_images(*lpips.load_lpips(backbone, heads), r["images"]["dense"], r["images"]["compressed"])
    assert lp["net"] == "alex" and lp["weights"] == [backbone, heads]
    assert lp["per_image"] == pytest.approx(want.tolist(), abs=1e-6) and lp["mean"] == pytest.approx(want.mean())
    assert all(v > 0 for v in lp["per_image"])  # the compressed images differ from the dense ones
    scorer = clip_score.load_clip_scorer(metrics / "clip-vit-base-patch16")
    assert cs["model"] == str(metrics / "clip-vit-base-patch16")
    for kind in ("dense", "compressed"):
        want = clip_score.clip_scores(scorer, r["images"][kind], PROMPTS)
        assert cs[kind] == pytest.approx(want.tolist(), abs=1e-4)
        assert cs["mean"][kind] == pytest.approx(float(np.mean(want)), abs=1e-4)
    text = format_table(r)
    assert "lpips (alex, compressed vs dense): mean" in text and "clip score (clip-vit-base-patch16)" in text
    assert "lpips: skipped" not in text and "clip_score: skipped" not in text


def test_evaluate_flux_same_noise(tiny):
    pipe = tiny["flux"]
    n_img = (H // pipe.vae_scale_factor // 2) * (W // pipe.vae_scale_factor // 2)
    assert initial_noise(pipe, H, W, 3).shape == (1, n_img, pipe.transformer.config.in_channels)
    plan = random_plan(pipe, 2, ["full", "cache"], seed=1)
    r = evaluate(pipe, plan, PROMPTS[:1], seed=3, height=H, width=W, repeat=1, max_sequence_length=16)
    p = r["per_image"][0]
    assert math.isfinite(p["psnr"]) and p["ssim"] < 1
    assert r["text_tokens"] == 16 and r["cfg"] is False and r["guidance_scale"] == 3.5
    assert 0 < r["attention_flops_kept"]["exact"] < 1


def test_evaluate_rejects_bad_input_before_running(tiny):
    pipe = tiny["sd3"]
    plan = Plan.all_full(model_info_for(pipe.transformer.config), 2)
    with pytest.raises(PlanError, match="steps"):
        evaluate(pipe, plan, PROMPTS, height=H, width=W, num_inference_steps=3)
    with pytest.raises(EvalError, match="no prompts"):
        evaluate(pipe, plan, [], height=H, width=W)
    with pytest.raises(ValueError, match="divisible"):
        evaluate(pipe, plan, PROMPTS, height=30, width=W)
    with pytest.raises(PlanError):
        evaluate(pipe, Plan.all_full(model_info_for(tiny["flux"].transformer.config), 2), PROMPTS, height=H, width=W)
    with pytest.raises(PlanError, match="no such plan file"):
        evaluate(pipe, "/nonexistent/plan.json", PROMPTS)


# ============================================================================================ CLI
def _cli(argv):
    from dfa2_jax.cli.eval import add_parser

    p = argparse.ArgumentParser(prog="dfa2")
    sub = p.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = p.parse_args(argv)
    return args.fn(args)


def test_eval_cli(tiny, tmp_path, monkeypatch, capsys):
    import dfa2_jax.pipeline

    pipe = tiny["sd3"]
    monkeypatch.setattr(dfa2_jax.pipeline, "load_pipeline", lambda path, dtype, cache_dir: pipe)
    model = tmp_path / "model"  # the config files the command checks before loading (the load itself is patched)
    (model / "transformer").mkdir(parents=True)
    (model / "vae").mkdir()
    (model / "transformer" / "config.json").write_text(json.dumps(pipe.transformer.config.to_diffusers()))
    (model / "vae" / "config.json").write_text(
        json.dumps({"block_out_channels": [32] * (int(np.log2(pipe.vae_scale_factor)) + 1)}))
    plan_path = str(tmp_path / "plan.json")
    random_plan(pipe, STEPS, ["full", "arrow:4", "cache"]).save(plan_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\n" + "\n".join(PROMPTS) + "\n")
    out = tmp_path / "out"
    assert _cli(["eval", "--model", str(model), "--plan", plan_path, "--prompts", str(prompts), "--height", str(H),
                 "--width", str(W), "--dtype", "float32", "--repeat", "1", "--batch", "1", "--out-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"report: {out / 'report.json'}" in text and "mean" in text and "FLOPs kept" in text
    rep = _strict_json(out / "report.json")
    assert rep["prompts"] == PROMPTS and rep["plan"]["path"] == plan_path and rep["model"]["name"] == str(model)

    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="empty.txt"):
        _cli(["eval", "--model", str(model), "--plan", plan_path, "--prompts", str(empty)])
    with pytest.raises(FileNotFoundError, match="nope.json"):
        _cli(["eval", "--model", str(model), "--plan", str(tmp_path / "nope.json"), "--prompt", "x"])
    with pytest.raises(ValueError, match="--steps 0: must be >= 1"):
        _cli(["eval", "--model", str(model), "--plan", plan_path, "--prompt", "x", "--steps", "0"])
    with pytest.raises(SystemExit):  # --prompt and --prompts are exclusive
        _cli(["eval", "--model", str(model), "--plan", plan_path, "--prompt", "x", "--prompts", str(prompts)])
