"""Train the text-to-image testbed: a tiny VAE, an SD3-style and a FLUX-style transformer on the procedural
shape world (:mod:`dfa2_jax.testbed.world`), written as two diffusers pipeline folders.

    python3 scripts/train_testbed.py --out testbed_out           # one H100, ~9 min in all
    python3 scripts/train_testbed.py --out /tmp/tb --smoke       # CPU, tiny sizes, < 60 s
    # the second-generation testbed: world v2 (128x128, 4x4 grid, 1-5 objects), 1024 image tokens
    python3 scripts/train_testbed.py --world v2 --out testbed2_out   # one H100, ~9 min in all
    python3 scripts/train_testbed.py --world v2 --out /tmp/tb2 --smoke   # CPU, tiny sizes, < 60 s
    # the shipped FLUX-style testbed: a second run sharing the SD3 testbed's VAE, encoders and tokenizers
    python3 scripts/train_testbed.py --out /tmp/tb2 --families flux \
        --reuse dfa2_jax/assets/testbed_sd3 --precision fp32 --minutes-flux 6

Writes ``OUT/testbed_sd3/`` (StableDiffusion3Pipeline: transformer, vae, CLIP-L/G-style text_encoder{,_2}
with projection, T5-style text_encoder_3, tokenizers, scheduler), ``OUT/testbed_flux/`` (FluxPipeline: CLIP
pooled + T5), ``OUT/train_log.json`` (losses every --log-every steps, held-out losses, timings, sizes, the
evaluation), ``OUT/samples_{sd3,flux,flux_truecfg}.png`` (held-out captions: rows of world renders above rows
of samples, made by diffusers' own pipelines) and ``OUT/testbed.tar`` bundling all of it. Each folder also
holds ``testbed_info.json``: the generation settings the model was trained for. With ``--world v2`` the
folders are ``OUT/testbed2_{sd3,flux}/``.

Last, each saved folder is loaded back with diffusers (``from_pretrained``, float32) and evaluated: dense prompt
accuracy (:mod:`dfa2_jax.testbed.classifier`, JAX on the CPU) of ``--eval-n`` held-out captions
(``make_batch(1, n, "heldout")``, seed i for caption i, the settings of testbed_info.json); a table of accuracy,
steps/s, losses and wall time is the last thing printed.

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

World v2 (``--world v2``, :data:`WORLD_SETUPS`, :meth:`Sizes.full_v2`): 128x128 pictures through a x2 VAE
(2 blocks, no mid-block attention: 4096 latent pixels would make it the VAE's costliest layer) -> 64x64x4
latents -> patch 2 (SD3) / 2x2 packing (FLUX) -> 32x32 = 1024 image tokens. Transformers at head_dim 64,
4 heads (width 256): SD3 6 joint blocks, FLUX 3 double + 6 single. Differences from v1, and why:

* scheduler shift 2.0 for sampling *and* training (sigma = 2u / (1 + u), u logit-normal): FLUX's resolution rule
  gives exp(0.5 + 0.65 * (1024 - 256) / 3840) = 1.9 at 1024 tokens; at 64 tokens (v1) it was 1.
* CLIP length = the longest v2 caption's CLIP tokens rounded up to 8 (tokenizer ``model_max_length`` and CLIP
  positions), not 77: the pipelines read ``model_max_length``, and SD3's joint sequence is 21 tokens shorter
  (56 + 56 text tokens).
* FLUX: fp32 weights and activations with TF32 matmuls (v1's bf16-autocast CUBLAS failure), but the attention
  kernel in bf16 (``--precision-flux fp32-bf16attn``): fp32 attention has no flash kernel, and at 1080 tokens
  attention is a large share of the step; no bf16 GEMM runs.
* batch: SD3 96, FLUX 64 (v1: 256). v1's steps (73 ms SD3, 46 ms FLUX) were bound by the host launching
  kernels, not by the GPU; at 1024 tokens a bf16 SD3 step of 64 samples is estimated at ~50 ms of GPU work,
  an fp32 FLUX step at ~70 ms, so SD3 takes a larger batch to keep the GPU the limit, FLUX keeps more steps.
* EMA: EDM2's power-function profile (gamma 6.94, sigma_rel ~0.1) instead of a fixed 0.999 decay, whose
  1000-step horizon is most of a ~2000-step run.
* transformer weights saved in bfloat16 (diffusers loads them as float32 modules unless told otherwise; so do
  our loaders): 13.8 M (SD3) / 13.4 M (FLUX) params are 52 MB in float32, 26 MB in bfloat16; each folder stays
  <= 40 MB (~31 MB) so that shipping both keeps the wheel small and ``pip install`` fast.
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

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # nothing here needs JAX: if an import pulls it in, keep it off the GPU
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one tokenizer thread per render worker

IMAGE = 64  # v1 (WORLD_SETUPS["v1"].image)
CLIP_LEN = 77  # v1
T5_BASE_VOCAB = 1000  # tiny T5 vocabulary before the world's words are appended
T5_NEIGHBOURS = (-1, -2, -4, 1)  # key offset each T5 head attends to (cycled over the heads)
T5_NEIGHBOUR_BIAS = 8.0  # softmax logit added at that offset: e^8 ~ 3000 x any other position
INFO_FILE = "testbed_info.json"
PRECISIONS = ("bf16", "fp32", "fp32-bf16attn")


@dataclasses.dataclass(frozen=True)
class WorldSetup:
    """What a world changes in the testbed besides the model sizes (module docstring)."""

    world: str  # a dfa2_jax.testbed.world name
    image: int  # picture side, px
    prefix: str  # folders OUT/<prefix>_sd3, OUT/<prefix>_flux
    clip_len: int | None  # CLIP tokenizer length; None: the longest caption's, rounded up to 8
    shift: float  # scheduler shift, also applied to the training sigmas
    weights_dtype: str  # transformer weights as saved
    precision: tuple[str, str]  # default CUDA precision of (sd3, flux)
    max_folder_mb: float  # a larger folder is warned about
    classifier: str  # the world's shipped classifier (dfa2_jax.testbed.classifier.ASSETS), package-relative


WORLD_SETUPS = {
    "v1": WorldSetup("v1", 64, "testbed", CLIP_LEN, 1.0, "float32", ("bf16", "bf16"), 30.0,
                     "dfa2_jax/assets/testbed_classifier.safetensors"),
    "v2": WorldSetup("v2", 128, "testbed2", None, 2.0, "bfloat16", ("bf16", "fp32-bf16attn"), 40.0,
                     "dfa2_jax/assets/testbed2_classifier.safetensors"),
}


# ================================================================================================ sizes
@dataclasses.dataclass(frozen=True)
class Sizes:
    """Model and data sizes; :meth:`full` for the H100 run, :meth:`smoke` for the CPU test."""

    vae_channels: tuple[int, ...] = (32, 64, 64)
    vae_groups: int = 16
    vae_mid_attention: bool = True
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
    batch_flux: int | None = None  # the FLUX transformer's batch when not batch_dit's
    lr_vae: float = 5e-4
    lr_dit: float = 5e-4
    warmup: int = 200
    minutes: tuple[float, float, float] = (1.25, 3.0, 3.0)  # vae, sd3, flux time boxes
    log_every: int = 25
    eval_every: int = 500
    samples: int = 16
    sample_steps: int = 28
    device: str = "cuda"
    ema_gamma: float | None = None  # None: decay min(0.999, (1 + n) / (10 + n)); else EDM2's power EMA
    eval_n: int = 200  # held-out captions of the final evaluation
    eval_batch: int = 100  # captions per pipeline call there
    reserve_s: float = 25.0  # per pipeline: save + samples + evaluation, kept out of the time boxes

    @classmethod
    def full(cls, **kw) -> Sizes:
        return cls(**kw)

    @classmethod
    def full_v2(cls, **kw) -> Sizes:
        """World v2 on one H100 in ~9 minutes (module docstring): 1024 image tokens, width 256 = 4 heads x 64."""
        return cls(**{**dict(vae_channels=(32, 64), vae_mid_attention=False, sd3_layers=6, sd3_heads=4,
                             sd3_head_dim=64, flux_double=3, flux_single=6, flux_heads=4, flux_head_dim=64,
                             flux_axes=(8, 28, 28), batch_vae=64, batch_dit=96, batch_flux=64,
                             minutes=(0.75, 3.0, 3.5),
                             ema_gamma=6.94, reserve_s=35.0), **kw})

    @classmethod
    def smoke_v2(cls, **kw) -> Sizes:
        return cls.smoke(**{**dict(vae_channels=(8, 16), vae_mid_attention=False, dataset=64, val=8, chunk=64,
                                   batch_vae=4, batch_dit=8, ema_gamma=6.94, eval_n=4, eval_batch=4), **kw})

    @classmethod
    def preset(cls, world: str, smoke: bool, **kw) -> Sizes:
        if world == "v1":
            return (cls.smoke if smoke else cls.full)(**kw)
        return (cls.smoke_v2 if smoke else cls.full_v2)(**kw)

    @classmethod
    def smoke(cls, **kw) -> Sizes:
        return cls(**{**dict(vae_channels=(8, 16, 16), vae_groups=8, clip_hidden=32, clip_heads=2, t5_d_model=64,
                             t5_heads=4, sd3_layers=2, sd3_heads=2, sd3_head_dim=16, flux_double=1, flux_single=1,
                             flux_heads=2, flux_head_dim=16, flux_axes=(4, 6, 6), dataset=256, val=32, chunk=256,
                             batch_vae=8, batch_dit=16, lr_vae=2e-3, lr_dit=2e-3, warmup=3, log_every=5,
                             eval_every=0, samples=2, sample_steps=4, device="cpu", eval_n=4, eval_batch=4,
                             reserve_s=5.0), **kw})


# ================================================================================================ tokenizers
def world_words(seed: int = 0, world: str = "v1") -> list[str]:
    """Every word a world caption can use: the world's vocabularies plus the words of sampled captions (so a
    template word added to the world later is covered too); v2's row / column digits included. Sorted, so
    tokenizers are reproducible."""
    from dfa2_jax.testbed import world as W

    w = W.get_world(world)
    words = set()
    for group in (w.shapes, w.colour_names, w.sizes, w.background_names, w.position_phrases):
        for item in group:
            words.update(item.split())
    for split in ("train", "heldout"):
        for s in W.sample_scenes(seed, 2000, split, world=w):
            words.update(W.caption(s).replace(",", " ").split())
    return sorted(x for x in words if x.isalnum())


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


def make_world_clip_tokenizer(folder: str, words: list[str], clip_len: int = CLIP_LEN):
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
                                pad_token=CLIP_EOS, model_max_length=clip_len)


def make_world_t5_tokenizer(folder: str, words: list[str]):
    """The tiny T5 tokenizer (:func:`dfa2_jax.tiny_tokenizers.make_t5_tokenizer`, ``T5_BASE_VOCAB`` pieces)
    with a "▁word" piece appended for each world word it lacks, scored above any multi-piece spelling."""
    from dfa2_jax.tiny_tokenizers import t5_vocab, write_t5_tokenizer

    vocab = t5_vocab(T5_BASE_VOCAB)
    have = {p for p, _ in vocab}
    vocab += [("▁" + w, -0.5) for w in words if "▁" + w not in have]
    return write_t5_tokenizer(folder, vocab)


def longest_caption(world: str = "v1") -> str:
    """The longest caption the world can make (in words): max_objects objects at the longest position phrases,
    the longest size / colour / shape words and the longest non-default background."""
    from dfa2_jax.testbed import world as W

    w = W.get_world(world)
    longest = lambda xs: max(xs, key=lambda s: (len(s.split()), len(s)))  # noqa: E731
    cells = sorted(range(w.n_cells), key=lambda i: -len(w.position_phrases[i].split()))
    objs = tuple(W.Obj(longest(w.shapes), longest(w.colour_names), longest(w.sizes), c, w.name)
                 for c in cells[:w.max_objects])
    bg = longest([b for b in w.background_names if b != w.default_background])
    return W.caption(W.Scene(objs, bg, w.name))


def tokenize(clip_tok, t5_tok, captions: list[str], t5_len: int,
             clip_len: int = CLIP_LEN) -> tuple[np.ndarray, np.ndarray]:
    """int32 ids as the pipelines tokenize: CLIP padded to ``clip_len`` (its tokenizer's model_max_length, 77 in
    v1), T5 to ``t5_len`` (padding="max_length")."""
    kw = dict(padding="max_length", truncation=True, add_special_tokens=True, return_tensors="np")
    clip = clip_tok(captions, max_length=clip_len, **kw).input_ids
    t5 = t5_tok(captions, max_length=t5_len, **kw).input_ids
    return clip.astype(np.int32), t5.astype(np.int32)


# ================================================================================================ data
def _render_chunk(task):
    """Pool worker: (seed, n, split, tokenizer folders, t5_len, clip_len, world, shared memory name or None,
    first image index) -> images (None when written into the shared memory), captions, clip ids, t5 ids."""
    seed, n, split, tok_dirs, t5_len, clip_len, world, shm_name, lo = task
    from transformers import AutoTokenizer

    from dfa2_jax.testbed.world import make_batch

    images, captions, _ = make_batch(seed, n, split, world=world)
    if shm_name is not None:  # v2: 49 KB per image, too much to pickle back through the pool's pipes
        from multiprocessing import shared_memory

        shm = shared_memory.SharedMemory(name=shm_name)
        try:
            view = np.ndarray((n,) + images.shape[1:], np.uint8, buffer=shm.buf, offset=lo * images[0].nbytes)
            view[:] = images
            del view
        finally:
            shm.close()
        images = None
    clip_tok, t5_tok = (AutoTokenizer.from_pretrained(d, local_files_only=True) for d in tok_dirs)
    return (images, captions) + tokenize(clip_tok, t5_tok, captions, t5_len, clip_len)


def _shm_room(nbytes: int) -> bool:
    """Whether /dev/shm (where SharedMemory lives on Linux) has room for ``nbytes`` and 256 MB more: a container's
    default is 64 MB, and writing past it kills the writer with SIGBUS."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return False
    return st.f_bavail * st.f_frsize >= nbytes + (256 << 20)


def render_dataset(seed: int, n: int, split: str, chunk: int, workers: int, tok_dirs, t5_len: int,
                   clip_len: int = CLIP_LEN, world: str = "v1"):
    """n samples of ``split`` as chunks ``make_batch(seed + k, chunk)`` (the world's streams are independent per
    seed), rendered and tokenized in a spawn pool when there is more than one chunk; the pool's workers write
    their images into one shared-memory block (or, without room in /dev/shm, send them back pickled)."""
    from dfa2_jax.testbed.world import get_world

    k_tasks = -(-n // chunk)
    side = get_world(world).image_size
    if k_tasks == 1 or workers <= 1:
        parts = [_render_chunk((seed + k, min(chunk, n - k * chunk), split, tok_dirs, t5_len, clip_len, world,
                                None, k * chunk)) for k in range(k_tasks)]
        images = np.concatenate([p[0] for p in parts])
    elif not _shm_room(n * side * side * 3):
        import multiprocessing as mp

        tasks = [(seed + k, min(chunk, n - k * chunk), split, tok_dirs, t5_len, clip_len, world, None, k * chunk)
                 for k in range(k_tasks)]
        with mp.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
            parts = pool.map(_render_chunk, tasks, chunksize=1)
        images = np.concatenate([p[0] for p in parts])
    else:
        import multiprocessing as mp
        from multiprocessing import shared_memory

        shm = shared_memory.SharedMemory(create=True, size=n * side * side * 3)
        try:
            tasks = [(seed + k, min(chunk, n - k * chunk), split, tok_dirs, t5_len, clip_len, world, shm.name,
                      k * chunk) for k in range(k_tasks)]
            with mp.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
                parts = pool.map(_render_chunk, tasks, chunksize=1)
            view = np.ndarray((n, side, side, 3), np.uint8, buffer=shm.buf)
            images = view.copy()
            del view
        finally:
            shm.close()
            shm.unlink()
    captions = [c for p in parts for c in p[1]]
    return images, captions, np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts])


# ================================================================================================ models
def build_vae(sz: Sizes, seed: int, image: int = IMAGE):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(sz.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=sz.vae_channels,
                         layers_per_block=1, act_fn="silu", latent_channels=4, norm_num_groups=sz.vae_groups,
                         sample_size=image, scaling_factor=1.0, shift_factor=0.0, use_quant_conv=False,
                         use_post_quant_conv=False, mid_block_add_attention=sz.vae_mid_attention)


def _clip_config(sz: Sizes, clip_tok):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=sz.clip_hidden,
                          intermediate_size=4 * sz.clip_hidden, num_attention_heads=sz.clip_heads,
                          num_hidden_layers=sz.clip_layers, projection_dim=sz.clip_hidden,
                          max_position_embeddings=clip_tok.model_max_length,
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


def latent_size(sz: Sizes, image: int) -> int:
    """Latent side: the VAE halves the picture at every block but the last."""
    return image // 2 ** (len(sz.vae_channels) - 1)


def build_sd3(sz: Sizes, seed: int, image: int = IMAGE):
    import torch
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    inner = sz.sd3_heads * sz.sd3_head_dim
    lat = latent_size(sz, image)
    return SD3Transformer2DModel(sample_size=lat, patch_size=2, in_channels=4, out_channels=4,
                                 num_layers=sz.sd3_layers, attention_head_dim=sz.sd3_head_dim,
                                 num_attention_heads=sz.sd3_heads, joint_attention_dim=sz.t5_d_model,
                                 caption_projection_dim=inner, pooled_projection_dim=2 * sz.clip_hidden,
                                 pos_embed_max_size=max(32, lat // 2), qk_norm="rms_norm")


def build_flux(sz: Sizes, seed: int):
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=sz.flux_double,
                                  num_single_layers=sz.flux_single, attention_head_dim=sz.flux_head_dim,
                                  num_attention_heads=sz.flux_heads, joint_attention_dim=sz.t5_d_model,
                                  pooled_projection_dim=sz.clip_hidden, guidance_embeds=False,
                                  axes_dims_rope=list(sz.flux_axes))


def scheduler(shift: float = 1.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


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

    clip_ids, t5_ids = (torch.from_numpy(a).long().to(device)
                        for a in tokenize(clip_tok, t5_tok, captions, t5_len, clip_tok.model_max_length))
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


def ema_decay(step: int, gamma: float | None) -> float:
    """EMA decay after ``step`` updates. ``gamma`` None: min(0.999, (1 + n) / (10 + n)) (v1). Else EDM2's
    power-function EMA (Karras et al. 2024, eq. 6-7: beta_t = (1 - 1/t)^(gamma + 1)), whose averaging window
    grows with t (sigma_rel ~0.1 of the run at gamma 6.94) and so suits a run of unknown length."""
    if gamma is None:
        return min(0.999, (1 + step) / (10 + step))
    return (1.0 - 1.0 / (step + 1)) ** (gamma + 1.0)


def train_loop(name: str, model, loss_fn, *, lr: float, warmup: int, budget_s: float | None,
               max_steps: int | None, log_every: int, eval_fn=None, eval_every: int = 0, ema: bool = False,
               device: str = "cpu", ema_gamma: float | None = None) -> dict:
    """Train until the time box (``budget_s``) or ``max_steps`` is used up; progress (for the cosine) is the
    used fraction. ``loss_fn(step) -> (loss, extras)``. With ``ema`` the model ends holding the EMA weights
    (:func:`ema_decay` profile). Returns the phase log: mean losses every ``log_every`` steps, ``eval_fn()``
    results, steps, seconds."""
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
            decay = ema_decay(step, ema_gamma)
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


PRECISION = {"vae": "bf16", "sd3": "bf16", "flux": "bf16"}  # per phase, one of PRECISIONS (set by run())


def _autocast(device: str, phase: str = "vae"):
    """bf16 autocast on CUDA for a "bf16" phase; nothing otherwise (fp32 with TF32 matmuls)."""
    import contextlib

    import torch

    if device.startswith("cuda") and PRECISION[phase] == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def bf16_attention(enabled: bool):
    """FLUX in fp32 with the attention kernel in bf16 (``fp32-bf16attn``): diffusers' FluxAttnProcessor calls
    ``transformer_flux.dispatch_attention_fn``; this casts its q / k / v to bf16 (so SDPA can take the flash
    kernel, which has no fp32 variant) and the output back. No bf16 GEMM runs (v1's CUBLAS failure came from
    bf16 autocast). Only for training: the saved model samples in the dtype it is loaded in."""
    import contextlib

    if not enabled:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def patched():
        import torch
        from diffusers.models.transformers import transformer_flux as tf

        orig = tf.dispatch_attention_fn

        def cast(query, key, value, *args, **kw):
            bf = torch.bfloat16
            return orig(query.to(bf), key.to(bf), value.to(bf), *args, **kw).to(query.dtype)

        tf.dispatch_attention_fn = cast
        try:
            yield
        finally:
            tf.dispatch_attention_fn = orig

    return patched()


def to_float_images(u8):
    """uint8 [B, S, S, 3] -> float [B, 3, S, S] in [-1, 1] (VaeImageProcessor's normalisation)."""
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


def encode_latents(vae, images, device, batch: int | None = None, seed: int = 0):
    """One posterior sample per image (fp32 [N, 4, h, w]), in batches (default: 1024 64x64 images' worth of
    pixels)."""
    import torch

    batch = batch or max(64, 1024 * 64 * 64 // (images.shape[1] * images.shape[2]))
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


def shift_sigma(sigma, shift: float):
    """The scheduler's time shift (FlowMatchEulerDiscreteScheduler): s sigma / (1 + (s - 1) sigma); 1: identity."""
    return sigma if shift == 1.0 else shift * sigma / (1.0 + (shift - 1.0) * sigma)


def train_dit(family: str, model, enc: TextEncoders, data: dict, sz: Sizes, budget_s, max_steps, device, seed,
              t5_len: int, compile_model: bool = False, shift: float = 1.0) -> dict:
    """Rectified flow on the normalised latents; ``data``: latents / clip_ids / t5_ids (train and val) and the
    empty caption's ids (dropout). Training sigmas are logit-normal, then shifted as the sampler's (``shift``)."""
    import torch

    lat, clip_ids, t5_ids = data["latents"], data["clip_ids"], data["t5_ids"]
    n = lat.shape[0]
    batch = sz.batch_flux if family == "flux" and sz.batch_flux else sz.batch_dit
    g = torch.Generator(device=device).manual_seed(seed)
    img_ids, txt_ids = flux_ids(lat.shape[2], lat.shape[3], t5_len, device)
    fwd = torch.compile(model) if compile_model else model

    def predict(x0, noise, sigma, cids, tids):
        x_t = (1.0 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
        if family == "sd3":
            embeds, pooled = enc.sd3(cids, tids)
            with _autocast(device, "sd3"):
                pred = fwd(hidden_states=x_t, encoder_hidden_states=embeds, pooled_projections=pooled,
                           timestep=sigma * 1000.0, return_dict=False)[0]
            return pred.float(), noise - x0
        embeds, pooled = enc.flux(cids, tids)
        with _autocast(device, "flux"):
            pred = fwd(hidden_states=pack(x_t), encoder_hidden_states=embeds, pooled_projections=pooled,
                       timestep=sigma, img_ids=img_ids, txt_ids=txt_ids, guidance=None, return_dict=False)[0]
        return pred.float(), pack(noise - x0)

    def loss_fn(step):
        idx = torch.randint(n, (batch,), device=device, generator=g)
        x0 = lat[idx]
        noise = torch.randn(x0.shape, device=device, generator=g)
        sigma = torch.sigmoid(torch.randn(x0.shape[0], device=device, generator=g))  # logit-normal(0, 1)
        sigma = shift_sigma(sigma, shift)
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

    with bf16_attention(family == "flux" and PRECISION["flux"] == "fp32-bf16attn"):
        return {"batch": batch, **train_loop(family, model, loss_fn, lr=sz.lr_dit, warmup=sz.warmup,
                                             budget_s=budget_s, max_steps=max_steps, log_every=sz.log_every,
                                             eval_fn=eval_fn, eval_every=sz.eval_every, ema=True, device=device,
                                             ema_gamma=sz.ema_gamma)}


# ================================================================================================ pipelines
def make_pipeline(family: str, transformer, vae, enc: TextEncoders, clip_tok, t5_tok, shift: float = 1.0):
    import diffusers

    if family == "sd3":
        return diffusers.StableDiffusion3Pipeline(
            transformer=transformer, scheduler=scheduler(shift), vae=vae, text_encoder=enc.clip_l,
            tokenizer=clip_tok, text_encoder_2=enc.clip_g, tokenizer_2=clip_tok, text_encoder_3=enc.t5,
            tokenizer_3=t5_tok)
    return diffusers.FluxPipeline(transformer=transformer, scheduler=scheduler(shift), vae=vae,
                                  text_encoder=enc.clip_flux, tokenizer=clip_tok, text_encoder_2=enc.t5,
                                  tokenizer_2=t5_tok)


def folder_mb(path: str) -> float:
    """The folder's size in MB (10⁶ bytes)."""
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs) / 1e6


def save_grid(refs, gen, path: str) -> None:
    """Rows of world renders above rows of the samples of the same captions, 8 per row, 2x nearest upscaling."""
    from PIL import Image

    cols = min(8, len(gen))
    tile = lambda im: np.pad(im, ((1, 1), (1, 1), (0, 0)), constant_values=255)  # noqa: E731 (white 1 px frame)
    rows = []
    for i in range(0, len(gen), cols):
        for src in (refs, gen):
            row = list(src[i:i + cols]) + [np.zeros_like(gen[0])] * (cols - len(src[i:i + cols]))
            rows.append(np.concatenate([tile(im) for im in row], axis=1))
    grid = np.concatenate(rows, axis=0).repeat(2, axis=0).repeat(2, axis=1)
    Image.fromarray(grid).save(path)


def load_saved(family: str, folder: str, device: str):
    """A saved testbed folder through diffusers' own pipeline class, float32 (bf16-saved weights upcast)."""
    import diffusers
    import torch

    cls = diffusers.StableDiffusion3Pipeline if family == "sd3" else diffusers.FluxPipeline
    pipe = cls.from_pretrained(folder, dtype=torch.float32, local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, info: dict, captions, seeds, steps: int, device: str, batch: int, deadline=None,
             **kw) -> np.ndarray:
    """uint8 [n, H, W, 3]: caption i from ``torch.Generator(device).manual_seed(seeds[i])``, with the settings of
    ``info`` (testbed_info.json: size, T5 length, guidance where the model takes it). ``deadline()`` true stops
    after the current batch (fewer images come back). A str ``negative_prompt`` is repeated per caption."""
    import torch

    kw = {"height": info["height"], "width": info["width"], "num_inference_steps": steps,
          "max_sequence_length": info["max_sequence_length"], **kw}
    if info.get("guidance_scale") is not None:
        kw.setdefault("guidance_scale", info["guidance_scale"])
    out = []
    for lo in range(0, len(captions), batch):
        part = list(captions[lo:lo + batch])
        call = dict(kw)
        if isinstance(call.get("negative_prompt"), str):
            call["negative_prompt"] = [call["negative_prompt"]] * len(part)
        gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds[lo:lo + batch]]
        with torch.no_grad():
            ims = pipe(part, generator=gens, output_type="np", **call).images
        out.append((np.clip(ims, 0, 1) * 255).round().astype(np.uint8))
        if deadline is not None and deadline():
            break
    return np.concatenate(out)


def score_images(images, captions, classifier: str, world_name: str) -> dict:
    """Dense prompt accuracy with the testbed classifier (JAX, CPU: JAX_PLATFORMS is cpu for this process):
    mean over captions, and the share of captions with every attribute right."""
    from dfa2_jax.testbed import classifier as C

    clf = C.load_classifier(classifier)
    if clf.config.world != world_name:
        raise ValueError(f"{classifier}: a classifier of world {clf.config.world!r}, the testbed is {world_name!r}")
    sc = C.prompt_scores(images, captions, classifier=clf)
    return {"prompt_accuracy": round(float(sc["accuracy"].mean()), 4),
            "all_right": round(float(sc["all_right"].mean()), 4),
            "per_caption": [round(float(a), 4) for a in sc["accuracy"]]}


def evaluate_family(family: str, folder: str, captions, refs, sz: Sizes, device: str, out: str, *,
                    classifier: str | None, world_name: str, samples: bool, deadline) -> tuple[dict, list[str]]:
    """Load ``folder`` back with diffusers, generate ``captions`` (seed i for caption i, ``sz.sample_steps``
    steps), score them (``classifier``; None: no scoring) and save the sample grids from the first ``sz.samples``
    images (FLUX: one more grid with diffusers' true CFG 4 and an empty negative prompt). Returns (log, files)."""
    t = time.perf_counter()
    with open(os.path.join(folder, INFO_FILE)) as f:
        info = json.load(f)
    pipe = load_saved(family, folder, device)
    res: dict = {"captions": len(captions), "steps": sz.sample_steps}
    files = []
    gen = generate(pipe, info, captions, range(len(captions)), sz.sample_steps, device, sz.eval_batch, deadline)
    res["generated"] = len(gen)
    res["generate_s"] = round(time.perf_counter() - t, 2)
    if len(gen) < len(captions):
        print(f"[eval {family}] out of time: {len(gen)} of {len(captions)} captions generated", flush=True)
    if classifier is not None:
        t2 = time.perf_counter()
        try:
            res.update(score_images(gen, list(captions[:len(gen)]), classifier, world_name))
            res["renders_all_right"] = score_images(refs[:len(gen)], list(captions[:len(gen)]), classifier,
                                                    world_name)["all_right"]  # the classifier on ground truth
        except (OSError, ValueError, ImportError, RuntimeError) as e:  # the folders are saved: report, go on
            res["skipped"] = f"{type(e).__name__}: {e}"
            print(f"[eval {family}] not scored: {res['skipped']}", flush=True)
        res["score_s"] = round(time.perf_counter() - t2, 2)
    if samples:
        k = min(sz.samples, len(gen))
        path = os.path.join(out, f"samples_{family}.png")
        save_grid(refs[:k], gen[:k], path)
        files.append(path)
        if family == "flux":
            path = os.path.join(out, "samples_flux_truecfg.png")
            cfg = generate(pipe, info, captions[:k], range(k), sz.sample_steps, device, sz.eval_batch,
                           negative_prompt="", true_cfg_scale=4.0)
            save_grid(refs[:k], cfg, path)
            files.append(path)
    del pipe
    res["seconds"] = round(time.perf_counter() - t, 2)
    return res, files


def summary_table(log: dict) -> str:
    """The run in a few lines: per family steps, steps/s, losses, dense prompt accuracy; VAE; wall time."""
    lines = [f"{'family':<7}{'steps':>7}{'steps/s':>9}{'batch':>7}{'train loss':>12}{'held-out':>10}"
             f"{'prompt acc':>12}{'all right':>11}{'captions':>10}"]
    for fam in ("sd3", "flux"):
        ph = log["phases"].get(fam)
        if ph is None:
            continue
        tail = ph["log"][-max(1, len(ph["log"]) // 10):]  # the last tenth of the logged windows
        train = sum(e["loss"] for e in tail) / len(tail)
        held = ph["eval"][-1].get("val_loss", float("nan")) if ph["eval"] else float("nan")
        ev = log.get("eval", {}).get(fam, {})
        acc = ev.get("prompt_accuracy")
        right = ev.get("all_right")
        lines.append(f"{fam:<7}{ph['steps']:>7}{ph['steps_per_s']:>9.2f}{ph['batch']:>7}"
                     f"{train:>12.4f}{held:>10.4f}{'-' if acc is None else f'{acc:.4f}':>12}"
                     f"{'-' if right is None else f'{right:.3f}':>11}{ev.get('generated', 0):>10}")
    vae = log["phases"].get("vae", {})
    if "steps" in vae:
        psnr = vae["eval"][-1].get("val_psnr_db") if vae.get("eval") else None
        lines.append(f"vae: {vae['steps']} steps, {vae['steps_per_s']:.1f} steps/s, val PSNR {psnr} dB")
    mbs = ", ".join(f"{k[:-len('_folder_mb')]} {v:.1f} MB" for k, v in log["models"].items()
                    if k.endswith("_folder_mb"))
    lines.append(f"folders: {mbs}; wall time {log['timings_s'].get('total', float('nan')):.1f} s "
                 f"(cap {log['args']['max_total_minutes'] * 60:.0f} s)")
    for fam, ev in log.get("eval", {}).items():
        if "all_right" in ev:
            lines.append(f"{fam}: prompt accuracy (mean attribute accuracy) {ev['prompt_accuracy']:.4f} on "
                         f"{ev['generated']} held-out captions (target >= 0.9: "
                         f"{'met' if ev['prompt_accuracy'] >= 0.9 else 'NOT met'}); {ev['all_right']:.3f} of them have "
                         f"every attribute right; ground-truth renders {ev['renders_all_right']:.3f}")
        elif "skipped" in ev:
            lines.append(f"{fam}: not scored ({ev['skipped']})")
    return "\n".join(lines)


# ================================================================================================ main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--world", choices=sorted(WORLD_SETUPS), default="v1",
                    help="v1: 64x64, 3x3 grid (the shipped testbeds); v2: 128x128, 4x4 grid, 1024 image tokens")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, a handful of steps (< 60 s)")
    ap.add_argument("--minutes-vae", type=float, default=None, help="VAE time box (default v1 1.25, v2 0.75)")
    ap.add_argument("--minutes-sd3", type=float, default=None, help="SD3 time box (default 3.0)")
    ap.add_argument("--minutes-flux", type=float, default=None, help="FLUX time box (default v1 3.0, v2 3.5)")
    ap.add_argument("--max-total-minutes", type=float, default=9.0,
                    help="cap on the whole run, evaluation included: time boxes shrink to fit it (default 9.0)")
    ap.add_argument("--steps", type=int, default=None, help="exact step count of every phase (no time boxes)")
    ap.add_argument("--steps-vae", type=int, default=None)
    ap.add_argument("--steps-sd3", type=int, default=None)
    ap.add_argument("--steps-flux", type=int, default=None)
    ap.add_argument("--dataset-size", type=int, default=None, help="training images (default 200000; smoke 256)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="transformer batch, both families (default v1 256; v2 SD3 96, FLUX 64)")
    ap.add_argument("--log-every", type=int, default=None, help="steps per logged loss (default 25; smoke 5)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="render processes")
    ap.add_argument("--device", default=None, help="torch device (default cuda; smoke cpu)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile", action="store_true", help="torch.compile the transformers (off: compile time "
                                                         "eats the time box)")
    ap.add_argument("--samples", type=int, default=None, help="held-out captions in each grid (default 16)")
    ap.add_argument("--sample-steps", type=int, default=None,
                    help="sampling steps of the evaluation and grids (default 28)")
    ap.add_argument("--no-samples", action="store_true", help="skip the sample grids")
    ap.add_argument("--eval-n", type=int, default=None,
                    help="held-out captions of the final prompt-accuracy evaluation (default 200; smoke 4; 0: none)")
    ap.add_argument("--classifier", default=None,
                    help="testbed classifier weights for the evaluation (default: the world's shipped file)")
    ap.add_argument("--families", default="sd3,flux", help="which pipelines to train: sd3, flux or sd3,flux")
    ap.add_argument("--reuse", default=None,
                    help="a testbed folder (e.g. dfa2_jax/assets/testbed_sd3) whose VAE, text encoders and "
                         "tokenizers are loaded instead of built, and the VAE not trained: a second pipeline "
                         "shares them with the first")
    ap.add_argument("--precision", choices=PRECISIONS, default=None,
                    help="CUDA, every phase: bf16 autocast; fp32 with TF32 matmuls; fp32-bf16attn: fp32 with the "
                         "FLUX attention kernel in bf16 (the VAE and SD3 then run fp32). Default: the world's "
                         "(v1 bf16; v2 bf16, FLUX fp32-bf16attn)")
    ap.add_argument("--precision-sd3", choices=("bf16", "fp32"), default=None, help="overrides --precision")
    ap.add_argument("--precision-flux", choices=PRECISIONS, default=None, help="overrides --precision")
    ap.add_argument("--weights-dtype", choices=("float32", "bfloat16"), default=None,
                    help="transformer weights as saved (default v1 float32, v2 bfloat16)")
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


def resolve_precision(args, setup: WorldSetup) -> dict[str, str]:
    """Per phase: --precision-{sd3,flux}, else --precision, else the world's default (the VAE follows SD3)."""
    glob = args.precision
    sd3 = args.precision_sd3 or ({"fp32-bf16attn": "fp32"}.get(glob, glob) if glob else setup.precision[0])
    flux = args.precision_flux or glob or setup.precision[1]
    vae = {"fp32-bf16attn": "fp32"}.get(glob, glob) if glob else setup.precision[0]
    return {"vae": vae, "sd3": sd3, "flux": flux}


def run(args) -> int:
    clock = Clock(args.max_total_minutes * 60)
    setup = WORLD_SETUPS[args.world]
    over = {k: v for k, v in dict(dataset=args.dataset_size, batch_dit=args.batch_size,
                                   batch_flux=args.batch_size, device=args.device,
                                   log_every=args.log_every, samples=args.samples,
                                   sample_steps=args.sample_steps, eval_n=args.eval_n).items()
            if v is not None}
    sz = Sizes.preset(args.world, args.smoke, **over)
    minutes = [m if m is not None else d for m, d in zip((args.minutes_vae, args.minutes_sd3, args.minutes_flux),
                                                          sz.minutes)]
    default_steps = ((20, 40, 40) if args.world == "v1" else (20, 20, 20)) if args.smoke else (None, None, None)
    steps = [s if s is not None else (args.steps if args.steps is not None else d)
             for s, d in zip((args.steps_vae, args.steps_sd3, args.steps_flux), default_steps)]
    weights_dtype = args.weights_dtype or setup.weights_dtype
    classifier = args.classifier
    if classifier is None and sz.eval_n:
        import dfa2_jax

        classifier = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(dfa2_jax.__file__))),
                                  setup.classifier)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="testbed_tok_")
    log: dict = {"args": vars(args), "world": args.world, "setup": dataclasses.asdict(setup),
                 "sizes": dataclasses.asdict(sz), "phases": {}, "timings_s": {}}

    def save_log():
        with open(os.path.join(out, "train_log.json"), "w") as f:
            json.dump(log, f, indent=1)

    # ---- tokenizers and data (before torch: the spawn workers need neither it nor the GPU)
    PRECISION.update(resolve_precision(args, setup))
    log["precision"] = dict(PRECISION)
    words = world_words(args.seed, args.world)
    longest = longest_caption(args.world)
    if args.reuse:
        from transformers import AutoTokenizer

        tok_dirs = (os.path.join(args.reuse, "tokenizer"), os.path.join(args.reuse, "tokenizer_3"))
        clip_tok, t5_tok = (AutoTokenizer.from_pretrained(d, local_files_only=True) for d in tok_dirs)
    else:
        tok_dirs = (os.path.join(work, "clip"), os.path.join(work, "t5"))
        clip_len = setup.clip_len
        if clip_len is None:  # the longest caption's length, with BOS and EOS, rounded up to 8
            probe = make_world_clip_tokenizer(tok_dirs[0], words, CLIP_LEN)
            clip_len = -(-len(probe(longest).input_ids) // 8) * 8
        clip_tok = make_world_clip_tokenizer(tok_dirs[0], words, clip_len)
        t5_tok = make_world_t5_tokenizer(tok_dirs[1], words)
    clip_len = clip_tok.model_max_length
    bad = [w for w in words if len(clip_tok.tokenize(w)) != 1 or len(t5_tok.tokenize(w)) != 1]
    if bad:
        raise RuntimeError(f"world words not single tokens in the extended tokenizers: {bad}")
    t5_len = -(-len(t5_tok(longest).input_ids) // 8) * 8
    clip_longest = len(clip_tok(longest).input_ids)
    if clip_longest > clip_len:
        raise RuntimeError(f"the longest world caption is {clip_longest} CLIP tokens (> {clip_len}): {longest!r}")
    t = time.perf_counter()
    images, captions, clip_ids, t5_ids = render_dataset(args.seed * 1_000_003, sz.dataset, "train", sz.chunk,
                                                        args.workers, tok_dirs, t5_len, clip_len, args.world)
    val_images, val_captions, val_clip, val_t5 = render_dataset(args.seed * 1_000_003 + 999_983, sz.val, "heldout",
                                                                sz.chunk, 1, tok_dirs, t5_len, clip_len, args.world)
    from dfa2_jax.defaults import GenerationDefaults, write_defaults
    from dfa2_jax.testbed.world import make_batch

    n_eval = sz.eval_n if sz.eval_n else (0 if args.no_samples else sz.samples)
    eval_refs, eval_caps, _ = make_batch(1, n_eval, "heldout", world=args.world)
    log["timings_s"]["render_tokenize"] = round(time.perf_counter() - t, 2)
    log["data"] = {"train_images": len(captions), "unique_train_captions": len(set(captions)),
                   "val_images": len(val_captions), "t5_max_sequence_length": t5_len, "clip_max_length": clip_len,
                   "clip_tokens_longest": clip_longest, "longest_caption": longest, "world_words": words,
                   "clip_vocab": len(clip_tok), "t5_vocab": len(t5_tok),
                   "sample_captions": list(eval_caps[:sz.samples]), "eval_captions": "make_batch(1, "
                   f"{n_eval}, 'heldout', world={args.world!r}), seed i for caption i"}
    print(f"data: {len(captions)} train + {len(val_captions)} held-out {setup.image}x{setup.image} images in "
          f"{log['timings_s']['render_tokenize']:.1f} s; T5 length {t5_len}, CLIP length {clip_len} (longest "
          f"caption {clip_longest})", flush=True)

    import torch

    device = sz.device
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    t = time.perf_counter()
    dev_images = torch.from_numpy(images).to(device)
    dev_val_images = torch.from_numpy(val_images).to(device)
    clip_ids_t, t5_ids_t = torch.from_numpy(clip_ids).long().to(device), torch.from_numpy(t5_ids).long().to(device)
    empty_clip, empty_t5 = (torch.from_numpy(a).long().to(device)
                            for a in tokenize(clip_tok, t5_tok, [""], t5_len, clip_len))
    del images

    # ---- models
    if args.reuse:
        vae, clip_l, clip_g, t5 = load_shared(args.reuse)
        vae = vae.to(device)
        clip_flux = build_clip(sz, clip_tok, args.seed + 1, projection=False, config=clip_l.config)
    else:
        vae = build_vae(sz, args.seed, setup.image).to(device)
        clip_l = build_clip(sz, clip_tok, args.seed + 1, projection=True)
        clip_g = build_clip(sz, clip_tok, args.seed + 2, projection=True)
        t5 = build_t5(sz, t5_tok, args.seed + 3)
        clip_flux = build_clip(sz, clip_tok, args.seed + 1, projection=False)
    _tower(clip_flux).load_state_dict(_tower(clip_l).state_dict())  # FLUX's CLIP = SD3's CLIP-L tower
    enc = TextEncoders(clip_l, clip_g, clip_flux, t5).to(device)
    builders = {"sd3": lambda: build_sd3(sz, args.seed + 4, setup.image), "flux": lambda: build_flux(sz, args.seed + 5)}
    transformers = {f: builders[f]().to(device) for f in args.families}
    pipes = {f: make_pipeline(f, transformers[f], vae, enc, clip_tok, t5_tok, setup.shift) for f in transformers}
    for f, pipe in pipes.items():
        check_encoding(pipe, f, enc, clip_tok, t5_tok, list(val_captions[:4]) + [""], t5_len, device)
    log["models"] = {"vae_params": n_params(vae), "clip_l_params": n_params(enc.clip_l),
                     "clip_g_params": n_params(enc.clip_g), "t5_params": n_params(enc.t5),
                     **{f"{f}_params": n_params(m) for f, m in transformers.items()}}
    log["timings_s"]["setup"] = round(time.perf_counter() - t, 2)
    print("params: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in log["models"].items())
          + "; precision " + ", ".join(f"{k} {v}" for k, v in PRECISION.items()), flush=True)
    save_log()

    # ---- VAE, then the latents of everything and the latent normalisation
    # kept out of the time boxes: per pipeline its save, evaluation and grids (all at the end), and 15 s
    reserve = (sz.reserve_s if (n_eval or not args.no_samples) else 5.0) * len(args.families) + 15
    planned = [m * 60 if ((k == 0 and not args.reuse) or fam in args.families) else 0.0
               for k, (m, fam) in enumerate(zip(minutes, ("vae", "sd3", "flux")))]
    budget = (clock.budget(planned[0], planned[1] + planned[2], reserve) if steps[0] is None else None)
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
    print(f"latents {tuple(data['latents'].shape[1:])}: shift_factor {shift:.4f} scaling_factor {scale:.4f}",
          flush=True)
    save_log()

    # ---- transformers: train, save (float32 or bfloat16 weights), free
    info_common = {"height": setup.image, "width": setup.image, "max_sequence_length": t5_len,
                   "num_inference_steps": 28, "world": "dfa2_jax.testbed.world", "world_name": args.world,
                   "clip_max_length": clip_len, "clip_tokens_longest": clip_longest, "scheduler_shift": setup.shift,
                   "weights_dtype": weights_dtype,
                   "note": "pass max_sequence_length (the T5 length the model was trained at; the pipelines pad to "
                           f"it and do not mask) and height=width={setup.image}"}
    if args.world != "v1":  # (v1: the shipped dfa2_jax/assets/testbed_classifier.safetensors)
        info_common["classifier"] = setup.classifier
    written, folders = [], {}
    for i, family in enumerate(("sd3", "flux")):
        if family not in transformers:
            continue
        model = transformers.pop(family)
        later = planned[2] if family == "sd3" and steps[2] is None and "flux" in transformers else 0.0
        budget = clock.budget(planned[1 + i], later, reserve) if steps[1 + i] is None else None
        log["phases"][family] = train_dit(family, model, enc, data, sz, budget, steps[1 + i], device,
                                          args.seed + 10 * (i + 1), t5_len, compile_model=args.compile,
                                          shift=setup.shift)
        model.requires_grad_(False)
        t = time.perf_counter()
        folder = os.path.join(out, f"{setup.prefix}_{family}")
        pipe = pipes.pop(family)
        if weights_dtype == "bfloat16":
            model.to(torch.bfloat16)  # saved as such; loaders upcast (module docstring)
        pipe.save_pretrained(folder, safe_serialization=True)
        guidance = 4.0 if family == "sd3" else None
        with open(os.path.join(folder, INFO_FILE), "w") as f:
            json.dump({"family": family, "guidance_scale": guidance, **info_common,
                       "trained_steps": log["phases"][family]["steps"]}, f, indent=1)
        write_defaults(folder, GenerationDefaults(setup.image, setup.image, 28, guidance, t5_len, "float32"),
                       comment="Generation defaults of this pipeline folder (dfa2_jax/defaults.py): the settings it "
                               "was trained for, from testbed_info.json; float32 as load_testbed() loads it.")
        log["models"][f"{family}_folder_mb"] = round(folder_mb(folder), 2)
        written.append(folder)
        folders[family] = folder
        del pipe, model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        log["timings_s"][f"{family}_save"] = round(time.perf_counter() - t, 2)
        print(f"{family}: {folder} ({log['models'][f'{family}_folder_mb']:.1f} MB, {weights_dtype} transformer)",
              flush=True)
        save_log()
    del data

    # ---- evaluation of the saved folders (diffusers' own pipelines) and the sample grids
    log["eval"] = {}
    if n_eval:
        for family, folder in folders.items():
            t = time.perf_counter()
            res, files = evaluate_family(
                family, folder, eval_caps, eval_refs, sz, device, out, classifier=classifier if sz.eval_n else None,
                world_name=args.world, samples=not args.no_samples,
                deadline=lambda: clock.elapsed() > clock.max_total_s - 10)
            log["eval"][family] = res
            written += files
            log["timings_s"][f"{family}_eval"] = round(time.perf_counter() - t, 2)
            save_log()

    log["timings_s"]["total"] = round(clock.elapsed(), 2)
    save_log()
    with tarfile.open(os.path.join(out, "testbed.tar"), "w") as tar:
        for p in written + [os.path.join(out, "train_log.json")]:
            tar.add(p, arcname=os.path.basename(p))
    shutil.rmtree(work, ignore_errors=True)
    for mb_key in ("sd3_folder_mb", "flux_folder_mb"):
        if log["models"].get(mb_key, 0) > setup.max_folder_mb:
            print(f"warning: {mb_key} = {log['models'][mb_key]:.1f} MB > {setup.max_folder_mb:.0f} MB", flush=True)
    print(f"done in {clock.elapsed():.1f} s: {out}/testbed.tar", flush=True)
    print(summary_table(log), flush=True)
    return 0



if __name__ == "__main__":
    sys.exit(main())
