"""Train the text-to-image testbed: a tiny VAE, an SD3-style and a FLUX-style transformer on the procedural
shape world (:mod:`dfa2_jax.testbed.world`), written as two diffusers pipeline folders.

    PYTHONPATH=. python3 scripts/train_testbed.py --out testbed_out           # one H100, ~9 min in all
    PYTHONPATH=. python3 scripts/train_testbed.py --out /tmp/tb --smoke       # CPU, tiny sizes, < 60 s
    # the shipped FLUX-style testbed: a second run sharing the SD3 testbed's VAE, encoders and tokenizers
    PYTHONPATH=. python3 scripts/train_testbed.py --out /tmp/tb2 --families flux \
        --reuse dfa2_jax/assets/testbed_sd3 --precision fp32 --minutes-flux 6

Writes ``OUT/testbed_sd3/`` (StableDiffusion3Pipeline: transformer, vae, CLIP-L/G-style text_encoder{,_2}
with projection, T5-style text_encoder_3, tokenizers, scheduler), ``OUT/testbed_flux/`` (FluxPipeline: CLIP
pooled + T5), ``OUT/train_log.json`` (losses every --log-every steps, held-out losses, timings, sizes),
``OUT/samples_{sd3,flux,flux_truecfg}.png`` (held-out captions: rows of world renders above rows of
samples, made by diffusers' own pipelines) and ``OUT/testbed.tar`` bundling all of it. Each folder also
holds ``testbed_info.json``: the generation settings the model was trained for.

Phases (PyTorch; torch lives in scripts/ only, never in dfa2_jax/):

1. Data: ``--dataset-size`` world renders (``make_batch(seed + k, chunk)``, chunks over a spawn pool of
   ``--workers`` processes that also tokenize their captions), plus held-out scenes for validation and
   samples (``split="heldout"``: captions never seen in training).
2. VAE: diffusers ``AutoencoderKL`` (3 blocks -> 4x downscale, 4 latent channels: 64x64 images -> 16x16x4
   latents), L1 + L2 + image-gradient L1 + a small KL. Then the whole dataset is encoded once (one posterior
   sample per image, as diffusers' training scripts cache latents) and ``shift_factor`` (mean) and
   ``scaling_factor`` (1/std) are written into its config, so the pipelines' ``(z - shift) * scale`` is unit
   variance. Shared by both pipelines.
3. SD3 and FLUX transformers: rectified flow as diffusers' ``train_dreambooth_{sd3,flux}.py``:
   ``x_t = (1 - s) x0 + s noise``, target ``noise - x0``, ``s`` logit-normal(0, 1), uniform loss weighting;
   SD3 gets ``timestep = 1000 s``, FLUX ``s`` (its pipeline divides by 1000) and packed 2x2 latents with
   ``_prepare_latent_image_ids`` / zero ``txt_ids``. 10% caption dropout (the empty prompt's embeddings,
   what the pipelines encode for CFG). Text embeddings are computed per batch by the frozen encoders (fp32,
   exactly what the pipelines compute; checked against ``pipe.encode_prompt`` before training). AdamW,
   linear warmup + cosine decay over the time box (or over ``--steps``), grad clip 1, bf16 autocast on CUDA
   (``--precision fp32``: none, TF32 matmuls; the FLUX-style run needed it: under autocast its first backward
   failed with CUBLAS_STATUS_EXECUTION_FAILED on torch 2.11 + CUDA 13, not investigated further),
   EMA of the weights (decay ``min(0.999, (1 + n) / (10 + n))``; the EMA is what is saved and sampled).

Choices worth knowing:

* Tokenizers: the tiny tokenizers of :mod:`dfa2_jax.tiny_tokenizers` (byte-level BPE CLIP, Unigram T5), each
  extended with the world's words (CLIP: merges appended so each world word is one token; T5: one "▁word"
  piece each). The plain tiny CLIP tokenizer spells words letter by letter, so a world caption (up to ~110
  tokens) would be cut at 77. Same file formats: our ``load_tokenizer`` and diffusers read them unchanged.
* Text encoders are random and frozen (seeded). Two deliberate settings: CLIP token / position embeddings
  are drawn with std 1 / 0.5 (transformers' 0.02 / 0.01 leaves each token's identity buried under the
  causal average of its prefix), and the T5's relative-attention bias (shared by all layers) makes each head
  look at one neighbour (offsets -1, -2, -4, +1), since T5 has no absolute positions and FLUX sees the text
  only through it: the neighbours are what binds "red" to "circle" and "circle" to "top left".
* T5 sequence length: the pipelines pad T5 to ``max_sequence_length`` (SD3 default 256, FLUX 512) and do not
  mask the padding, so the models are trained at one length ``L`` (the longest possible world caption,
  rounded up to 8: 32) and must be sampled with ``max_sequence_length=L`` (in testbed_info.json).
* FLUX: ``guidance_embeds=False`` (schnell-like). FLUX.1-dev's guidance embedding is distilled from a CFG
  teacher, which a from-scratch testbed does not have; an untrained guidance input would be noise. Samples
  are made without CFG (what our JAX FluxPipeline does) and, as a second grid, with diffusers' true CFG.
* Schedulers: ``FlowMatchEulerDiscreteScheduler(shift=1.0)`` for both (64 image tokens: SD3's shift 3 is
  for 4096). 64x64 only: pass height=width=64 (FluxPipeline's default size is 128 latent pixels).
* Weights are saved in float32 (both folders < 30 MB); our loaders and diffusers read them as they are.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import tarfile
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # nothing here needs JAX: if an import pulls it in, keep it off the GPU
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one tokenizer thread per render worker

IMAGE = 64
CLIP_LEN = 77
T5_BASE_VOCAB = 1000  # tiny T5 vocabulary before the world's words are appended
T5_NEIGHBOURS = (-1, -2, -4, 1)  # key offset each T5 head attends to (cycled over the heads)
T5_NEIGHBOUR_BIAS = 8.0  # softmax logit added at that offset: e^8 ~ 3000 x any other position


# ================================================================================================ sizes
@dataclasses.dataclass(frozen=True)
class Sizes:
    """Model and data sizes; :meth:`full` for the H100 run, :meth:`smoke` for the CPU test."""

    vae_channels: tuple[int, ...] = (32, 64, 64)
    vae_groups: int = 16
    clip_hidden: int = 64
    clip_heads: int = 4
    clip_layers: int = 2
    t5_d_model: int = 128
    t5_heads: int = 4
    t5_layers: int = 2
    sd3_layers: int = 6
    sd3_heads: int = 4
    sd3_head_dim: int = 32
    flux_double: int = 3
    flux_single: int = 6
    flux_heads: int = 4
    flux_head_dim: int = 32
    flux_axes: tuple[int, ...] = (4, 14, 14)
    dataset: int = 200_000
    val: int = 1024
    chunk: int = 4096  # images per render task
    batch_vae: int = 128
    batch_dit: int = 256
    lr_vae: float = 5e-4
    lr_dit: float = 5e-4
    warmup: int = 200
    minutes: tuple[float, float, float] = (1.25, 3.0, 3.0)  # vae, sd3, flux time boxes
    log_every: int = 25
    eval_every: int = 500
    samples: int = 16
    sample_steps: int = 28
    device: str = "cuda"

    @classmethod
    def full(cls, **kw) -> Sizes:
        return cls(**kw)

    @classmethod
    def smoke(cls, **kw) -> Sizes:
        return cls(**{**dict(vae_channels=(8, 16, 16), vae_groups=8, clip_hidden=32, clip_heads=2, t5_d_model=64,
                             t5_heads=4, sd3_layers=2, sd3_heads=2, sd3_head_dim=16, flux_double=1, flux_single=1,
                             flux_heads=2, flux_head_dim=16, flux_axes=(4, 6, 6), dataset=256, val=32, chunk=256,
                             batch_vae=8, batch_dit=16, lr_vae=2e-3, lr_dit=2e-3, warmup=3, log_every=5,
                             eval_every=0, samples=2, sample_steps=4, device="cpu"), **kw})


# ================================================================================================ tokenizers
def world_words(seed: int = 0) -> list[str]:
    """Every word a world caption can use: the world's vocabularies plus the words of sampled captions (so a
    template word added to the world later is covered too). Sorted, so tokenizers are reproducible."""
    from dfa2_jax.testbed import world as W

    words = set()
    for group in (W.SHAPES, W.COLOURS, W.SIZES, W.BACKGROUNDS, W.POSITION_PHRASES):
        for item in group:
            words.update(item.split())
    for split in ("train", "heldout"):
        for s in W.sample_scenes(seed, 2000, split):
            words.update(W.caption(s).replace(",", " ").split())
    return sorted(w for w in words if w.isalpha())


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """GPT-2 / CLIP byte-pair encoding of one word: merge the lowest-ranked adjacent pair until none is left."""
    while len(symbols) > 1:
        pairs = [(ranks.get(p, math.inf), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
        rank, _ = min(pairs)
        if rank == math.inf:
            break
        first, second = next(p for p in zip(symbols, symbols[1:]) if ranks.get(p) == rank)
        out, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                out.append(first + second)
                i += 2
            else:
                out.append(symbols[i])
                i += 1
        symbols = out
    return symbols


def make_world_clip_tokenizer(folder: str, words: list[str]):
    """The tiny CLIP tokenizer (:func:`dfa2_jax.tiny_tokenizers.make_clip_tokenizer`) with merges appended so
    that every world word is one token. Each word's merges chain its current BPE pieces left to right; the new
    merges rank after all earlier ones, so they never split a word already made whole."""
    from dfa2_jax.tiny_tokenizers import CLIP_BOS, CLIP_EOS, CLIP_MERGES, clip_vocab, write_clip_tokenizer

    vocab, _ = clip_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if t not in (CLIP_BOS, CLIP_EOS)]
    known = set(tokens)
    merges = list(CLIP_MERGES)
    for w in words:
        pieces = _bpe(list(w[:-1]) + [w[-1] + "</w>"], {p: i for i, p in enumerate(merges)})
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            if pieces[0] not in known:
                tokens.append(pieces[0])
                known.add(pieces[0])
    tokens += [CLIP_BOS, CLIP_EOS]  # eos keeps the largest id, as in the plain tiny tokenizer
    return write_clip_tokenizer(folder, {t: i for i, t in enumerate(tokens)}, [f"{a} {b}" for a, b in merges],
                                pad_token=CLIP_EOS, model_max_length=CLIP_LEN)


def make_world_t5_tokenizer(folder: str, words: list[str]):
    """The tiny T5 tokenizer (:func:`dfa2_jax.tiny_tokenizers.make_t5_tokenizer`, ``T5_BASE_VOCAB`` pieces)
    with a "▁word" piece appended for each world word it lacks, scored above any multi-piece spelling."""
    from dfa2_jax.tiny_tokenizers import t5_vocab, write_t5_tokenizer

    vocab = t5_vocab(T5_BASE_VOCAB)
    have = {p for p, _ in vocab}
    vocab += [("▁" + w, -0.5) for w in words if "▁" + w not in have]
    return write_t5_tokenizer(folder, vocab)


def longest_caption() -> str:
    """The longest caption the world can make (in words): three objects at the longest position phrases, the
    longest size / colour / shape words and the longest non-default background."""
    from dfa2_jax.testbed import world as W

    longest = lambda xs: max(xs, key=lambda s: (len(s.split()), len(s)))  # noqa: E731
    cells = sorted(range(len(W.POSITION_PHRASES)), key=lambda i: -len(W.POSITION_PHRASES[i].split()))
    objs = tuple(W.Obj(longest(W.SHAPES), longest(list(W.COLOURS)), longest(W.SIZES), c)
                 for c in cells[:W.MAX_OBJECTS])
    bg = longest([b for b in W.BACKGROUNDS if b != W.DEFAULT_BACKGROUND])
    return W.caption(W.Scene(objs, bg))


def tokenize(clip_tok, t5_tok, captions: list[str], t5_len: int) -> tuple[np.ndarray, np.ndarray]:
    """int32 ids as the pipelines tokenize: CLIP padded to 77, T5 to ``t5_len`` (padding="max_length")."""
    kw = dict(padding="max_length", truncation=True, add_special_tokens=True, return_tensors="np")
    clip = clip_tok(captions, max_length=CLIP_LEN, **kw).input_ids
    t5 = t5_tok(captions, max_length=t5_len, **kw).input_ids
    return clip.astype(np.int32), t5.astype(np.int32)


# ================================================================================================ data
def _render_chunk(task):
    """Pool worker: (seed, n, split, tokenizer folders, t5_len) -> images, captions, clip ids, t5 ids."""
    seed, n, split, tok_dirs, t5_len = task
    from transformers import AutoTokenizer

    from dfa2_jax.testbed.world import make_batch

    images, captions, _ = make_batch(seed, n, split)
    clip_tok, t5_tok = (AutoTokenizer.from_pretrained(d, local_files_only=True) for d in tok_dirs)
    return (images, captions) + tokenize(clip_tok, t5_tok, captions, t5_len)


def render_dataset(seed: int, n: int, split: str, chunk: int, workers: int, tok_dirs, t5_len: int):
    """n samples of ``split`` as chunks ``make_batch(seed + k, chunk)`` (the world's streams are independent per
    seed), rendered and tokenized in a spawn pool when there is more than one chunk."""
    tasks = [(seed + k, min(chunk, n - k * chunk), split, tok_dirs, t5_len) for k in range(-(-n // chunk))]
    if len(tasks) == 1 or workers <= 1:
        parts = [_render_chunk(t) for t in tasks]
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
            parts = pool.map(_render_chunk, tasks, chunksize=1)
    images = np.concatenate([p[0] for p in parts])
    captions = [c for p in parts for c in p[1]]
    return images, captions, np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts])


# ================================================================================================ models
def build_vae(sz: Sizes, seed: int):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(sz.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=sz.vae_channels,
                         layers_per_block=1, act_fn="silu", latent_channels=4, norm_num_groups=sz.vae_groups,
                         sample_size=IMAGE, scaling_factor=1.0, shift_factor=0.0, use_quant_conv=False,
                         use_post_quant_conv=False, mid_block_add_attention=True)


def _clip_config(sz: Sizes, clip_tok):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=sz.clip_hidden,
                          intermediate_size=4 * sz.clip_hidden, num_attention_heads=sz.clip_heads,
                          num_hidden_layers=sz.clip_layers, projection_dim=sz.clip_hidden, max_position_embeddings=77,
                          hidden_act="gelu", eos_token_id=clip_tok.eos_token_id, bos_token_id=clip_tok.bos_token_id,
                          pad_token_id=clip_tok.pad_token_id)


def _tower(model):
    """The CLIP text transformer: ``model.text_model`` (with projection, and transformers 4.x CLIPTextModel) or
    the model itself (transformers 5.x CLIPTextModel has no wrapper)."""
    return getattr(model, "text_model", model)


def build_clip(sz: Sizes, clip_tok, seed: int, projection: bool, config=None):
    """A frozen random CLIP text tower (see the module docstring for the embedding scales); ``config``
    overrides the one built from ``sz``."""
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config or _clip_config(sz, clip_tok))
    emb = _tower(model).embeddings
    with torch.no_grad():
        emb.token_embedding.weight.normal_(0.0, 1.0)
        emb.position_embedding.weight.normal_(0.0, 0.5)
    return model.eval().requires_grad_(False)


def load_shared(folder: str):
    """(vae, CLIP-L with projection, CLIP-G with projection, T5 encoder) of a saved testbed pipeline folder."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    def sub(name):
        path = os.path.join(folder, name)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--reuse {folder}: no {name}/ folder (a saved SD3 testbed pipeline has vae/, "
                                    f"text_encoder/, text_encoder_2/, text_encoder_3/)")
        return path

    vae = AutoencoderKL.from_pretrained(sub("vae"), local_files_only=True)
    clip_l = CLIPTextModelWithProjection.from_pretrained(sub("text_encoder"), local_files_only=True)
    clip_g = CLIPTextModelWithProjection.from_pretrained(sub("text_encoder_2"), local_files_only=True)
    t5 = T5EncoderModel.from_pretrained(sub("text_encoder_3"), local_files_only=True)
    return tuple(m.eval().requires_grad_(False) for m in (vae, clip_l, clip_g, t5))


def build_t5(sz: Sizes, t5_tok, seed: int):
    """A frozen random T5 encoder whose relative-attention bias makes head h attend to offset
    T5_NEIGHBOURS[h % 4] (positional context for FLUX, which gives the text no positions of its own)."""
    import torch
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=len(t5_tok), d_model=sz.t5_d_model, d_kv=sz.t5_d_model // sz.t5_heads,
                   d_ff=2 * sz.t5_d_model, num_layers=sz.t5_layers, num_heads=sz.t5_heads,
                   relative_attention_num_buckets=32, relative_attention_max_distance=128,
                   feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False)
    torch.manual_seed(seed)
    model = T5EncoderModel(cfg)
    attn = model.encoder.block[0].layer[0].SelfAttention
    offsets = torch.tensor([T5_NEIGHBOURS[h % len(T5_NEIGHBOURS)] for h in range(sz.t5_heads)])
    buckets = attn._relative_position_bucket(offsets, bidirectional=True, num_buckets=32, max_distance=128)
    with torch.no_grad():
        bias = attn.relative_attention_bias.weight  # [buckets, heads]
        bias.zero_()
        bias[buckets, torch.arange(sz.t5_heads)] = T5_NEIGHBOUR_BIAS
    return model.eval().requires_grad_(False)


def build_sd3(sz: Sizes, seed: int):
    import torch
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    inner = sz.sd3_heads * sz.sd3_head_dim
    return SD3Transformer2DModel(sample_size=IMAGE // 4, patch_size=2, in_channels=4, out_channels=4,
                                 num_layers=sz.sd3_layers, attention_head_dim=sz.sd3_head_dim,
                                 num_attention_heads=sz.sd3_heads, joint_attention_dim=sz.t5_d_model,
                                 caption_projection_dim=inner, pooled_projection_dim=2 * sz.clip_hidden,
                                 pos_embed_max_size=32, qk_norm="rms_norm")


def build_flux(sz: Sizes, seed: int):
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=sz.flux_double,
                                  num_single_layers=sz.flux_single, attention_head_dim=sz.flux_head_dim,
                                  num_attention_heads=sz.flux_heads, joint_attention_dim=sz.t5_d_model,
                                  pooled_projection_dim=sz.clip_hidden, guidance_embeds=False,
                                  axes_dims_rope=list(sz.flux_axes))


def scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ================================================================================================ text
class TextEncoders:
    """The frozen encoders with the pipelines' exact prompt encoding (diffusers 0.42
    ``StableDiffusion3Pipeline.encode_prompt`` / ``FluxPipeline.encode_prompt``), from token ids."""

    def __init__(self, clip_l, clip_g, clip_flux, t5):
        self.clip_l, self.clip_g, self.clip_flux, self.t5 = clip_l, clip_g, clip_flux, t5

    def to(self, device):
        for m in (self.clip_l, self.clip_g, self.clip_flux, self.t5):
            m.to(device)
        return self

    def sd3(self, clip_ids, t5_ids):
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            o1 = self.clip_l(clip_ids, output_hidden_states=True)
            o2 = self.clip_g(clip_ids, output_hidden_states=True)
            clip = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
            t5 = self.t5(t5_ids)[0]
            clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
            return torch.cat([clip, t5], dim=-2), torch.cat([o1[0], o2[0]], dim=-1)

    def flux(self, clip_ids, t5_ids):
        import torch

        with torch.no_grad():
            return self.t5(t5_ids)[0], self.clip_flux(clip_ids, output_hidden_states=False).pooler_output


def check_encoding(pipe, family: str, enc: TextEncoders, clip_tok, t5_tok, captions, t5_len, device):
    """Our per-batch encoding == the pipeline's ``encode_prompt`` (so training sees what sampling sees)."""
    import torch

    clip_ids, t5_ids = (torch.from_numpy(a).long().to(device) for a in tokenize(clip_tok, t5_tok, captions, t5_len))
    if family == "sd3":
        ref = pipe.encode_prompt(captions, captions, captions, device=device, do_classifier_free_guidance=False,
                                 max_sequence_length=t5_len)
        ref_embeds, ref_pooled = ref[0], ref[2]
        embeds, pooled = enc.sd3(clip_ids, t5_ids)
    else:
        ref_embeds, ref_pooled, _ = pipe.encode_prompt(captions, captions, device=device, max_sequence_length=t5_len)
        embeds, pooled = enc.flux(clip_ids, t5_ids)
    for name, a, b in (("prompt_embeds", embeds, ref_embeds), ("pooled", pooled, ref_pooled)):
        if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-5, atol=1e-5):
            raise RuntimeError(f"{family}: training {name} {tuple(a.shape)} differ from the pipeline's encode_prompt "
                               f"{tuple(b.shape)}")


# ================================================================================================ training
class Clock:
    """Time boxes: each phase gets its --minutes, cut so the whole run ends by --max-total-minutes."""

    def __init__(self, max_total_s: float):
        self.t0 = time.perf_counter()
        self.max_total_s = max_total_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def budget(self, planned_s: float, later_s: float, reserve_s: float) -> float:
        left = self.max_total_s - self.elapsed() - later_s - reserve_s
        return max(min(planned_s, left), 5.0)


def lr_factor(step: int, progress: float, warmup: int, floor: float = 0.02) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from 1 to ``floor`` over progress in [0, 1]."""
    warm = min(1.0, (step + 1) / max(warmup, 1))
    return warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def make_optimizer(model, lr: float):
    import torch

    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    fused = {"fused": True} if decay[0].is_cuda else {}
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.99), eps=1e-8, **fused)


def train_loop(name: str, model, loss_fn, *, lr: float, warmup: int, budget_s: float | None,
               max_steps: int | None, log_every: int, eval_fn=None, eval_every: int = 0, ema: bool = False,
               device: str = "cpu") -> dict:
    """Train until the time box (``budget_s``) or ``max_steps`` is used up; progress (for the cosine) is the
    used fraction. ``loss_fn(step) -> (loss, extras)``. With ``ema`` the model ends holding the EMA weights.
    Returns the phase log: mean losses every ``log_every`` steps, ``eval_fn()`` results, steps, seconds."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(model, lr)
    ema_params = [p.detach().clone().float() for p in params] if ema else None
    log, evals = [], []
    acc, acc_n, acc_extra = torch.zeros((), device=device), 0, {}
    t0 = time.perf_counter()
    step, progress = 0, 0.0
    model.train()
    while progress < 1.0:
        f = lr_factor(step, progress, warmup)
        for g in opt.param_groups:
            g["lr"] = lr * f
        loss, extras = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema:
            decay = min(0.999, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, [p.detach().float() for p in params], 1.0 - decay)
        acc += loss.detach().float()
        acc_n += 1
        for k, v in extras.items():
            acc_extra[k] = acc_extra.get(k, 0.0) + v.detach().float()
        step += 1
        elapsed = time.perf_counter() - t0
        progress = step / max_steps if max_steps else elapsed / budget_s
        if step % log_every == 0 or progress >= 1.0:
            entry = {"step": step, "time_s": round(time.perf_counter() - t0, 2), "lr": lr * f,
                     "loss": float(acc) / acc_n}  # float() syncs: the time box is wall time of finished work
            entry.update({k: float(v) / acc_n for k, v in acc_extra.items()})
            log.append(entry)
            acc, acc_n, acc_extra = torch.zeros((), device=device), 0, {}
            if step % (log_every * 8) == 0 or progress >= 1.0:
                print(f"[{name}] step {step} {entry['time_s']:.0f}s loss {entry['loss']:.4f} lr {entry['lr']:.2e}",
                      flush=True)
        if eval_fn is not None and eval_every and step % eval_every == 0 and progress < 1.0:
            evals.append({"step": step, **eval_fn()})
            model.train()
    seconds = time.perf_counter() - t0
    if ema:
        with torch.no_grad():
            for p, e in zip(params, ema_params):
                p.copy_(e.to(p.dtype))
    model.eval()
    if eval_fn is not None:
        evals.append({"step": step, "ema" if ema else "final": True, **eval_fn()})
    print(f"[{name}] {step} steps in {seconds:.1f} s ({step / seconds:.1f} it/s)", flush=True)
    return {"steps": step, "seconds": round(seconds, 2), "steps_per_s": round(step / seconds, 2), "lr": lr,
            "warmup": warmup, "log": log, "eval": evals}


PRECISION = {"autocast": True}  # --precision fp32 turns bf16 autocast off


def _autocast(device: str):
    import contextlib

    import torch

    if device.startswith("cuda") and PRECISION["autocast"]:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_float_images(u8):
    """uint8 [B, 64, 64, 3] -> float [B, 3, 64, 64] in [-1, 1] (VaeImageProcessor's normalisation)."""
    return u8.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(vae, images, val_images, sz: Sizes, budget_s, max_steps, device, seed) -> dict:
    """L1 + L2 + image-gradient L1 + 1e-4 x KL (all per-element means)."""
    import torch

    n = images.shape[0]
    g = torch.Generator(device=device).manual_seed(seed)

    def loss_fn(step):
        x = to_float_images(images[torch.randint(n, (sz.batch_vae,), device=device, generator=g)])
        with _autocast(device):
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, device=device, generator=g)
            rec = vae.decode(z).sample.float()
        l1 = (rec - x).abs().mean()
        l2 = ((rec - x) ** 2).mean()
        edge = ((rec.diff(dim=-1) - x.diff(dim=-1)).abs().mean() + (rec.diff(dim=-2) - x.diff(dim=-2)).abs().mean())
        mean, logvar = post.mean.float(), post.logvar.float()
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1.0 - logvar).mean()  # DiagonalGaussianDistribution.kl, per element
        return l1 + l2 + 0.5 * edge + 1e-4 * kl, {"l1": l1, "kl": kl}

    def eval_fn():
        with torch.no_grad(), _autocast(device):
            x = to_float_images(val_images)
            rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.float().clamp(-1, 1)
        mse = float((((rec - x) / 2) ** 2).mean())
        return {"val_psnr_db": round(10 * math.log10(1.0 / max(mse, 1e-12)), 2)}

    return train_loop("vae", vae, loss_fn, lr=sz.lr_vae, warmup=sz.warmup, budget_s=budget_s, max_steps=max_steps,
                      log_every=sz.log_every, eval_fn=eval_fn, eval_every=sz.eval_every, device=device)


def encode_latents(vae, images, device, batch: int = 1024, seed: int = 0):
    """One posterior sample per image (fp32 [N, 4, 16, 16]), in batches."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    with torch.no_grad():
        for i in range(0, images.shape[0], batch):
            with _autocast(device):
                post = vae.encode(to_float_images(images[i:i + batch])).latent_dist
            mean, std = post.mean.float(), post.std.float()
            out.append(mean + std * torch.randn(mean.shape, device=device, generator=g))
    return torch.cat(out)


def flux_ids(h: int, w: int, t5_len: int, device):
    """FluxPipeline's ``_prepare_latent_image_ids(h/2, w/2)`` and zero ``text_ids``."""
    import torch

    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device), torch.zeros(t5_len, 3, device=device)


def pack(x):
    """FluxPipeline._pack_latents: [B, C, h, w] -> [B, (h/2)(w/2), 4C]."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def train_dit(family: str, model, enc: TextEncoders, data: dict, sz: Sizes, budget_s, max_steps, device, seed,
              t5_len: int, compile_model: bool = False) -> dict:
    """Rectified flow on the normalised latents; ``data``: latents / clip_ids / t5_ids (train and val) and the
    empty caption's ids (dropout)."""
    import torch

    lat, clip_ids, t5_ids = data["latents"], data["clip_ids"], data["t5_ids"]
    n = lat.shape[0]
    g = torch.Generator(device=device).manual_seed(seed)
    img_ids, txt_ids = flux_ids(lat.shape[2], lat.shape[3], t5_len, device)
    fwd = torch.compile(model) if compile_model else model

    def predict(x0, noise, sigma, cids, tids):
        x_t = (1.0 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
        if family == "sd3":
            embeds, pooled = enc.sd3(cids, tids)
            with _autocast(device):
                pred = fwd(hidden_states=x_t, encoder_hidden_states=embeds, pooled_projections=pooled,
                           timestep=sigma * 1000.0, return_dict=False)[0]
            return pred.float(), noise - x0
        embeds, pooled = enc.flux(cids, tids)
        with _autocast(device):
            pred = fwd(hidden_states=pack(x_t), encoder_hidden_states=embeds, pooled_projections=pooled,
                       timestep=sigma, img_ids=img_ids, txt_ids=txt_ids, guidance=None, return_dict=False)[0]
        return pred.float(), pack(noise - x0)

    def loss_fn(step):
        idx = torch.randint(n, (sz.batch_dit,), device=device, generator=g)
        x0 = lat[idx]
        noise = torch.randn(x0.shape, device=device, generator=g)
        sigma = torch.sigmoid(torch.randn(x0.shape[0], device=device, generator=g))  # logit-normal(0, 1)
        drop = torch.rand(x0.shape[0], device=device, generator=g) < 0.1
        cids = torch.where(drop[:, None], data["empty_clip"], clip_ids[idx])
        tids = torch.where(drop[:, None], data["empty_t5"], t5_ids[idx])
        pred, target = predict(x0, noise, sigma, cids, tids)
        return ((pred - target) ** 2).mean(), {}

    gv = torch.Generator(device=device).manual_seed(seed + 1)
    vx0 = data["val_latents"]
    v_noise = torch.randn(vx0.shape, device=device, generator=gv)
    v_sigma = (torch.arange(vx0.shape[0], device=device) % 8 + 0.5) / 8  # eight fixed noise levels

    def eval_fn():
        total = 0.0
        with torch.no_grad():
            for i in range(0, vx0.shape[0], 256):
                sl = slice(i, i + 256)
                pred, target = predict(vx0[sl], v_noise[sl], v_sigma[sl], data["val_clip_ids"][sl],
                                       data["val_t5_ids"][sl])
                total += float(((pred - target) ** 2).mean(dim=tuple(range(1, pred.ndim))).sum())
        return {"val_loss": round(total / vx0.shape[0], 5)}

    return train_loop(family, model, loss_fn, lr=sz.lr_dit, warmup=sz.warmup, budget_s=budget_s,
                      max_steps=max_steps, log_every=sz.log_every, eval_fn=eval_fn, eval_every=sz.eval_every,
                      ema=True, device=device)


# ================================================================================================ pipelines
def make_pipeline(family: str, transformer, vae, enc: TextEncoders, clip_tok, t5_tok):
    import diffusers

    if family == "sd3":
        return diffusers.StableDiffusion3Pipeline(
            transformer=transformer, scheduler=scheduler(), vae=vae, text_encoder=enc.clip_l, tokenizer=clip_tok,
            text_encoder_2=enc.clip_g, tokenizer_2=clip_tok, text_encoder_3=enc.t5, tokenizer_3=t5_tok)
    return diffusers.FluxPipeline(transformer=transformer, scheduler=scheduler(), vae=vae,
                                  text_encoder=enc.clip_flux, tokenizer=clip_tok, text_encoder_2=enc.t5,
                                  tokenizer_2=t5_tok)


def folder_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs) / 2 ** 20


def sample_grid(pipe, family: str, captions, refs, t5_len: int, steps: int, device, path: str, **kw) -> None:
    """Held-out captions through the diffusers pipeline (seeded); rows of world renders above rows of samples,
    8 per row, 2x nearest upscaling."""
    import torch
    from PIL import Image

    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        out = pipe(list(captions), height=IMAGE, width=IMAGE, num_inference_steps=steps, max_sequence_length=t5_len,
                   generator=g, output_type="np", **kw).images
    gen = (np.clip(out, 0, 1) * 255).round().astype(np.uint8)
    cols = min(8, len(captions))
    tile = lambda im: np.pad(im, ((1, 1), (1, 1), (0, 0)), constant_values=255)  # noqa: E731 (white 1 px frame)
    rows = []
    for i in range(0, len(captions), cols):
        for src in (refs, gen):
            row = list(src[i:i + cols]) + [np.zeros_like(gen[0])] * (cols - len(src[i:i + cols]))
            rows.append(np.concatenate([tile(im) for im in row], axis=1))
    grid = np.concatenate(rows, axis=0).repeat(2, axis=0).repeat(2, axis=1)
    Image.fromarray(grid).save(path)


# ================================================================================================ main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, a handful of steps (< 60 s)")
    ap.add_argument("--minutes-vae", type=float, default=None, help="VAE time box (default 1.25)")
    ap.add_argument("--minutes-sd3", type=float, default=None, help="SD3 time box (default 3.0)")
    ap.add_argument("--minutes-flux", type=float, default=None, help="FLUX time box (default 3.0)")
    ap.add_argument("--max-total-minutes", type=float, default=9.0,
                    help="cap on the whole run: time boxes shrink to fit it (default 9.0)")
    ap.add_argument("--steps", type=int, default=None, help="exact step count of every phase (no time boxes)")
    ap.add_argument("--steps-vae", type=int, default=None)
    ap.add_argument("--steps-sd3", type=int, default=None)
    ap.add_argument("--steps-flux", type=int, default=None)
    ap.add_argument("--dataset-size", type=int, default=None, help="training images (default 200000; smoke 256)")
    ap.add_argument("--batch-size", type=int, default=None, help="transformer batch (default 256)")
    ap.add_argument("--log-every", type=int, default=None, help="steps per logged loss (default 25; smoke 5)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="render processes")
    ap.add_argument("--device", default=None, help="torch device (default cuda; smoke cpu)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile", action="store_true", help="torch.compile the transformers (off: compile time "
                                                         "eats the time box)")
    ap.add_argument("--samples", type=int, default=None, help="held-out captions in each grid (default 16)")
    ap.add_argument("--sample-steps", type=int, default=None, help="sampling steps of the grids (default 28)")
    ap.add_argument("--no-samples", action="store_true", help="skip the sample grids")
    ap.add_argument("--families", default="sd3,flux", help="which pipelines to train: sd3, flux or sd3,flux")
    ap.add_argument("--reuse", default=None,
                    help="a testbed folder (e.g. dfa2_jax/assets/testbed_sd3) whose VAE, text encoders and "
                         "tokenizers are loaded instead of built, and the VAE not trained: a second pipeline "
                         "shares them with the first")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                    help="CUDA: bf16 autocast, or fp32 with TF32 matmuls")
    args = ap.parse_args(argv)
    fams = tuple(f.strip() for f in args.families.split(",") if f.strip())
    if not fams or any(f not in ("sd3", "flux") for f in fams) or len(set(fams)) != len(fams):
        ap.error(f"--families {args.families!r}: expected sd3, flux or sd3,flux")
    args.families = tuple(f for f in ("sd3", "flux") if f in fams)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.smoke:
        return run(args)
    # The smoke run is tiny: one intra-op thread is several times faster than two on a shared CPU (the test
    # runs it in-process, so the setting is restored).
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args) -> int:
    clock = Clock(args.max_total_minutes * 60)
    over = {k: v for k, v in dict(dataset=args.dataset_size, batch_dit=args.batch_size, device=args.device,
                                   log_every=args.log_every, samples=args.samples,
                                   sample_steps=args.sample_steps).items()
            if v is not None}
    sz = (Sizes.smoke if args.smoke else Sizes.full)(**over)
    minutes = [m if m is not None else d for m, d in zip((args.minutes_vae, args.minutes_sd3, args.minutes_flux),
                                                          sz.minutes)]
    default_steps = (20, 40, 40) if args.smoke else (None, None, None)
    steps = [s if s is not None else (args.steps if args.steps is not None else d)
             for s, d in zip((args.steps_vae, args.steps_sd3, args.steps_flux), default_steps)]
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="testbed_tok_")
    log: dict = {"args": vars(args), "sizes": dataclasses.asdict(sz), "phases": {}, "timings_s": {}}

    def save_log():
        with open(os.path.join(out, "train_log.json"), "w") as f:
            json.dump(log, f, indent=1)

    # ---- tokenizers and data (before torch: the spawn workers need neither it nor the GPU)
    PRECISION["autocast"] = args.precision == "bf16"
    words = world_words(args.seed)
    if args.reuse:
        from transformers import AutoTokenizer

        tok_dirs = (os.path.join(args.reuse, "tokenizer"), os.path.join(args.reuse, "tokenizer_3"))
        clip_tok, t5_tok = (AutoTokenizer.from_pretrained(d, local_files_only=True) for d in tok_dirs)
    else:
        tok_dirs = (os.path.join(work, "clip"), os.path.join(work, "t5"))
        clip_tok = make_world_clip_tokenizer(tok_dirs[0], words)
        t5_tok = make_world_t5_tokenizer(tok_dirs[1], words)
    bad = [w for w in words if len(clip_tok.tokenize(w)) != 1 or len(t5_tok.tokenize(w)) != 1]
    if bad:
        raise RuntimeError(f"world words not single tokens in the extended tokenizers: {bad}")
    longest = longest_caption()
    t5_len = -(-len(t5_tok(longest).input_ids) // 8) * 8
    clip_longest = len(clip_tok(longest).input_ids)
    if clip_longest > CLIP_LEN:
        raise RuntimeError(f"the longest world caption is {clip_longest} CLIP tokens (> {CLIP_LEN}): {longest!r}")
    t = time.perf_counter()
    images, captions, clip_ids, t5_ids = render_dataset(args.seed * 1_000_003, sz.dataset, "train", sz.chunk,
                                                        args.workers, tok_dirs, t5_len)
    val_images, val_captions, val_clip, val_t5 = render_dataset(args.seed * 1_000_003 + 999_983, sz.val, "heldout",
                                                                sz.chunk, 1, tok_dirs, t5_len)
    from dfa2_jax.testbed.world import make_batch

    sample_refs, sample_caps, _ = make_batch(args.seed + 7, sz.samples, "heldout")
    log["timings_s"]["render_tokenize"] = round(time.perf_counter() - t, 2)
    log["data"] = {"train_images": len(captions), "unique_train_captions": len(set(captions)),
                   "val_images": len(val_captions), "t5_max_sequence_length": t5_len, "clip_tokens_longest":
                   clip_longest, "longest_caption": longest, "world_words": words,
                   "clip_vocab": len(clip_tok), "t5_vocab": len(t5_tok), "sample_captions": list(sample_caps)}
    print(f"data: {len(captions)} train + {len(val_captions)} held-out images in "
          f"{log['timings_s']['render_tokenize']:.1f} s; T5 length {t5_len}", flush=True)

    import torch

    device = sz.device
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    t = time.perf_counter()
    dev_images = torch.from_numpy(images).to(device)
    dev_val_images = torch.from_numpy(val_images).to(device)
    clip_ids_t, t5_ids_t = torch.from_numpy(clip_ids).long().to(device), torch.from_numpy(t5_ids).long().to(device)
    empty_clip, empty_t5 = (torch.from_numpy(a).long().to(device) for a in tokenize(clip_tok, t5_tok, [""], t5_len))
    del images

    # ---- models
    if args.reuse:
        vae, clip_l, clip_g, t5 = load_shared(args.reuse)
        vae = vae.to(device)
        clip_flux = build_clip(sz, clip_tok, args.seed + 1, projection=False, config=clip_l.config)
    else:
        vae = build_vae(sz, args.seed).to(device)
        clip_l = build_clip(sz, clip_tok, args.seed + 1, projection=True)
        clip_g = build_clip(sz, clip_tok, args.seed + 2, projection=True)
        t5 = build_t5(sz, t5_tok, args.seed + 3)
        clip_flux = build_clip(sz, clip_tok, args.seed + 1, projection=False)
    _tower(clip_flux).load_state_dict(_tower(clip_l).state_dict())  # FLUX's CLIP = SD3's CLIP-L tower
    enc = TextEncoders(clip_l, clip_g, clip_flux, t5).to(device)
    builders = {"sd3": lambda: build_sd3(sz, args.seed + 4), "flux": lambda: build_flux(sz, args.seed + 5)}
    transformers = {f: builders[f]().to(device) for f in args.families}
    pipes = {f: make_pipeline(f, transformers[f], vae, enc, clip_tok, t5_tok) for f in transformers}
    for f, pipe in pipes.items():
        check_encoding(pipe, f, enc, clip_tok, t5_tok, list(val_captions[:4]) + [""], t5_len, device)
    log["models"] = {"vae_params": n_params(vae), "clip_l_params": n_params(enc.clip_l),
                     "clip_g_params": n_params(enc.clip_g), "t5_params": n_params(enc.t5),
                     **{f"{f}_params": n_params(m) for f, m in transformers.items()}}
    log["timings_s"]["setup"] = round(time.perf_counter() - t, 2)
    print("params: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in log["models"].items()), flush=True)
    save_log()

    # ---- VAE, then the latents of everything and the latent normalisation
    reserve = 0 if args.no_samples else 25 if not args.smoke else 5  # per pipeline: save + samples
    planned = [m * 60 if ((k == 0 and not args.reuse) or fam in args.families) else 0.0
               for k, (m, fam) in enumerate(zip(minutes, ("vae", "sd3", "flux")))]
    budget = (clock.budget(planned[0], planned[1] + planned[2], len(args.families) * reserve + 15)
              if steps[0] is None else None)
    if args.reuse:  # the shared VAE as trained with the first pipeline, its latent normalisation included
        log["phases"]["vae"] = {"reused": args.reuse}
        vae.requires_grad_(False)
        t = time.perf_counter()
        latents = encode_latents(vae, dev_images, device, seed=args.seed)
        shift, scale = float(vae.config.shift_factor), float(vae.config.scaling_factor)
    else:
        log["phases"]["vae"] = train_vae(vae, dev_images, dev_val_images[:256], sz, budget, steps[0], device,
                                         args.seed)
        vae.requires_grad_(False)
        t = time.perf_counter()
        latents = encode_latents(vae, dev_images, device, seed=args.seed)
        shift = float(latents.mean())
        scale = float(1.0 / latents.std())
        vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    val_latents = (encode_latents(vae, dev_val_images, device, seed=args.seed + 1) - shift) * scale
    data = {"latents": (latents - shift) * scale, "clip_ids": clip_ids_t, "t5_ids": t5_ids_t,
            "empty_clip": empty_clip, "empty_t5": empty_t5, "val_latents": val_latents,
            "val_clip_ids": torch.from_numpy(val_clip).long().to(device),
            "val_t5_ids": torch.from_numpy(val_t5).long().to(device)}
    del latents, dev_images
    log["phases"]["vae"].update(shift_factor=shift, scaling_factor=scale)
    log["timings_s"]["encode_latents"] = round(time.perf_counter() - t, 2)
    print(f"latents: shift_factor {shift:.4f} scaling_factor {scale:.4f}", flush=True)
    save_log()

    # ---- transformers
    info_common = {"height": IMAGE, "width": IMAGE, "max_sequence_length": t5_len, "num_inference_steps": 28,
                   "world": "dfa2_jax.testbed.world", "note": "pass max_sequence_length (the T5 length the model "
                   "was trained at; the pipelines pad to it and do not mask) and height=width=64"}
    written = []
    for i, family in enumerate(("sd3", "flux")):
        if family not in transformers:
            continue
        model = transformers[family]
        later = planned[2] if family == "sd3" and steps[2] is None and "flux" in transformers else 0.0
        budget = clock.budget(planned[1 + i], later, (2 - i) * reserve + 5) if steps[1 + i] is None else None
        log["phases"][family] = train_dit(family, model, enc, data, sz, budget, steps[1 + i], device,
                                          args.seed + 10 * (i + 1), t5_len, compile_model=args.compile)
        model.requires_grad_(False)
        t = time.perf_counter()
        folder = os.path.join(out, f"testbed_{family}")
        pipe = pipes[family]
        pipe.save_pretrained(folder, safe_serialization=True)
        guidance = 4.0 if family == "sd3" else None
        with open(os.path.join(folder, "testbed_info.json"), "w") as f:
            json.dump({"family": family, "guidance_scale": guidance, **info_common,
                       "trained_steps": log["phases"][family]["steps"]}, f, indent=1)
        log["models"][f"{family}_folder_mb"] = round(folder_mb(folder), 2)
        written.append(folder)
        if not args.no_samples:
            pipe.set_progress_bar_config(disable=True)
            path = os.path.join(out, f"samples_{family}.png")
            kw = {"guidance_scale": guidance} if family == "sd3" else {}
            sample_grid(pipe, family, sample_caps, sample_refs, t5_len, sz.sample_steps, device, path, **kw)
            written.append(path)
            if family == "flux":
                path = os.path.join(out, "samples_flux_truecfg.png")
                sample_grid(pipe, family, sample_caps, sample_refs, t5_len, sz.sample_steps, device, path,
                            negative_prompt=[""] * len(sample_caps), true_cfg_scale=4.0)
                written.append(path)
        log["timings_s"][f"{family}_save_samples"] = round(time.perf_counter() - t, 2)
        print(f"{family}: {folder} ({log['models'][f'{family}_folder_mb']:.1f} MB)", flush=True)
        save_log()

    log["timings_s"]["total"] = round(clock.elapsed(), 2)
    save_log()
    with tarfile.open(os.path.join(out, "testbed.tar"), "w") as tar:
        for p in written + [os.path.join(out, "train_log.json")]:
            tar.add(p, arcname=os.path.basename(p))
    shutil.rmtree(work, ignore_errors=True)
    for mb_key in ("sd3_folder_mb", "flux_folder_mb"):
        if log["models"].get(mb_key, 0) > 30:
            print(f"warning: {mb_key} = {log['models'][mb_key]:.1f} MB > 30 MB", flush=True)
    print(f"done in {clock.elapsed():.1f} s: {out}/testbed.tar", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
