"""Text encoders (CLIP, T5 encoder) and tokenizers against transformers, on tiny configs (CPU).

1. parity: tiny transformers models (seeded, every weight perturbed) saved with save_pretrained, loaded with
   converters.text_encoders; every hidden state, pooled output, text_embeds, last_hidden_state compared;
2. key layouts: transformers 4.x ``text_model.`` prefix + ``position_ids`` buffer, T5 tied / full-model keys,
   sharded folders, dtypes;
3. tiny tokenizers (dfa2_jax.tiny_tokenizers) read back by load_tokenizer, without torch;
4. bad inputs raise CheckpointError / ConfigError naming the folder, file or key.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from converters.safetensors_io import CheckpointError, SafetensorsFile, save_file
from converters.text_encoders import (WEIGHTS_INDEX_NAME, WEIGHTS_NAME, encode, load_clip, load_t5, load_tokenizer,
                                      state_to_transformers)
from dfa2_jax.models.clip import CLIPTextConfig
from dfa2_jax.models.configs import ConfigError
from dfa2_jax.models.t5 import T5Config, relative_position_bucket
from dfa2_jax.tiny_tokenizers import CLIP_MERGES, clip_vocab, make_clip_tokenizer, make_t5_tokenizer
from tests.conftest import max_rel_err

# Ours vs transformers in float32 (matmul precision "highest", conftest). Achieved (CPU, jax 0.10.2,
# transformers 5.23, torch 2.13): CLIP hidden states <= 5.9e-7, last_hidden_state <= 6.5e-7, pooled <= 4.2e-7,
# text_embeds <= 7.9e-7; T5 relu 2.8e-7 (L 19) / 4.2e-7 (L 256), gated-gelu 8.5e-7 / 1.0e-6.
MAX_REL = 1e-5
VOCAB_CLIP, VOCAB_T5 = 1000, 1103
CLIP_TINY = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
                 vocab_size=VOCAB_CLIP, projection_dim=32, max_position_embeddings=77)
T5_TINY = dict(vocab_size=VOCAB_T5, d_model=32, d_ff=37, d_kv=8, num_layers=5, num_heads=4,
               relative_attention_num_buckets=8, dropout_rate=0.0)
# (hidden_act, eos_token_id, with projection): eos 2 is transformers' legacy rule (pool at argmax of the ids),
# any other id pools at its first occurrence.
CLIP_CASES = {
    "L_legacy": ("quick_gelu", 2, False),
    "G_legacy_proj": ("gelu", 2, True),
    "L_eos_proj": ("quick_gelu", 997, True),
    "G_eos": ("gelu", 997, False),
}
T5_CASES = ("relu", "gated-gelu")


def perturb_params_(module, seed: int) -> None:
    """Noise on every parameter (norm weights 1, zero biases and equal-init tensors become distinct), so a
    swapped or transposed tensor always changes the output. Buffers (CLIP's int position_ids) are left alone."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in module.parameters():
            t.add_(0.05 * torch.randn(t.shape, generator=g, dtype=t.dtype))


def build_clip(name: str, seed: int = 0):
    import torch
    import transformers

    act, eos, proj = CLIP_CASES[name]
    cfg = transformers.CLIPTextConfig(**CLIP_TINY, hidden_act=act, eos_token_id=eos, bos_token_id=998, pad_token_id=1)
    torch.manual_seed(seed)
    cls = transformers.CLIPTextModelWithProjection if proj else transformers.CLIPTextModel
    model = cls(cfg).eval()
    perturb_params_(model, seed + 1)
    return model


def build_t5(ff: str, seed: int = 0):
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.T5EncoderModel(transformers.T5Config(**T5_TINY, feed_forward_proj=ff)).eval()
    perturb_params_(model, seed + 1)
    return model


@pytest.fixture(scope="module")
def clip_folders(tmp_path_factory):
    out = {}
    for name in CLIP_CASES:
        model = build_clip(name)
        folder = tmp_path_factory.mktemp("clip") / name
        model.save_pretrained(folder, safe_serialization=True)
        out[name] = (model, str(folder))
    return out


@pytest.fixture(scope="module")
def t5_folders(tmp_path_factory):
    out = {}
    for ff in T5_CASES:
        model = build_t5(ff)
        folder = tmp_path_factory.mktemp("t5") / ff
        model.save_pretrained(folder, safe_serialization=True)
        out[ff] = (model, str(folder))
    return out


def clip_ids(eos: int, seed: int = 0) -> np.ndarray:
    """[3, 77] ids where the two pooling rules disagree: the eos token sits at non-final positions (twice in a
    row, the first one counts), the largest id (999) elsewhere, the legacy id 2 appears as an ordinary token."""
    ids = np.random.default_rng(seed).integers(3, 990, (3, 77))
    ids[0, 5], ids[0, 40], ids[0, 60] = eos, 999, eos
    ids[1, 70], ids[1, 12] = eos, 999
    ids[2, 30], ids[2, 50] = 999, eos
    ids[:, 1] = 2 if eos != 2 else ids[:, 1]
    return ids


def torch_clip(model, ids: np.ndarray):
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(ids), output_hidden_states=True)


def torch_t5(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(ids)).last_hidden_state.numpy()


# --------------------------------------------------------------------------------------------- parity ---
@pytest.mark.parametrize("name", CLIP_CASES)
def test_clip_parity(clip_folders, name):
    model, folder = clip_folders[name]
    act, eos, proj = CLIP_CASES[name]
    config, graphdef, state = load_clip(folder)
    assert config == CLIPTextConfig(**CLIP_TINY, hidden_act=act, eos_token_id=eos, bos_token_id=998, pad_token_id=1)
    ids = clip_ids(eos)
    ref = torch_clip(model, ids)
    out = encode(graphdef, state, ids)
    assert len(out.hidden_states) == len(ref.hidden_states) == CLIP_TINY["num_hidden_layers"] + 1
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert max_rel_err(a, b.numpy()) <= MAX_REL, f"hidden_states[{i}]"
    assert max_rel_err(out.last_hidden_state, ref.last_hidden_state.numpy()) <= MAX_REL
    last = ref.last_hidden_state.numpy()
    # the pooled position of each rule (transformers' CLIPTextModelWithProjection returns no pooler_output)
    pos = ids.argmax(-1) if eos == 2 else (ids == eos).argmax(-1)
    np.testing.assert_array_equal(pos, [40, 12, 30] if eos == 2 else [5, 70, 50])
    assert max_rel_err(out.pooled_output, last[np.arange(3), pos]) <= MAX_REL
    if proj:
        assert max_rel_err(out.text_embeds, ref.text_embeds.numpy()) <= MAX_REL
    else:
        assert out.text_embeds is None
        assert max_rel_err(out.pooled_output, ref.pooler_output.numpy()) <= MAX_REL


@pytest.mark.parametrize("ff", T5_CASES)
@pytest.mark.parametrize("length", [19, 256])
def test_t5_parity(t5_folders, ff, length):
    model, folder = t5_folders[ff]
    config, graphdef, state = load_t5(folder)
    assert config == T5Config(**{k: v for k, v in T5_TINY.items() if k != "dropout_rate"}, feed_forward_proj=ff)
    ids = np.random.default_rng(length).integers(0, VOCAB_T5, (2, length))
    out = encode(graphdef, state, ids)
    assert out.shape == (2, length, T5_TINY["d_model"])
    assert max_rel_err(out, torch_t5(model, ids)) <= MAX_REL


def test_t5_activation_is_tanh_gelu():
    """transformers maps feed_forward_proj "gated-gelu" to gelu_new (tanh approximation), T5 v1.1 XXL's."""
    import transformers

    assert transformers.T5Config(feed_forward_proj="gated-gelu").dense_act_fn == "gelu_new"
    cfg = T5Config(feed_forward_proj="gated-gelu")
    assert (cfg.is_gated_act, cfg.dense_act_fn) == (True, "gelu_new")
    assert (T5Config(feed_forward_proj="relu").is_gated_act, T5Config().dense_act_fn) == (False, "relu")


def test_relative_position_bucket_matches_transformers():
    import torch
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-600, 601)
    for buckets, dist in [(32, 128), (8, 128), (16, 20), (64, 256)]:
        want = T5Attention._relative_position_bucket(torch.from_numpy(rel), True, buckets, dist).numpy()
        np.testing.assert_array_equal(relative_position_bucket(rel, num_buckets=buckets, max_distance=dist), want)


# Reduced precision vs the f32 reference (tiny T5 gated-gelu, L = 19). Achieved: bf16 4.0e-2 (transformers' own
# bf16 model: 3.3e-2), fp16 2.7e-3 (transformers fp16: 3.2e-3); CLIP bf16 text_embeds 5.9e-3.
REDUCED_MAX_REL = {"bfloat16": 8e-2, "float16": 1e-2}


def test_reduced_precision(t5_folders, clip_folders):
    """bf16 / fp16 loads run and stay close to f32; fp16 keeps T5's wo in f32 as transformers does."""
    model, folder = t5_folders["gated-gelu"]
    ids = np.random.default_rng(3).integers(0, VOCAB_T5, (2, 19))
    want = torch_t5(model, ids)
    for dtype in ("bfloat16", "float16"):
        _, graphdef, state = load_t5(folder, dtype)
        dtypes = {"/".join(map(str, p)): v[...].dtype for p, v in nnx.to_flat_state(state)}
        wo = jnp.float32 if dtype == "float16" else jnp.dtype(dtype)
        assert all(d == (wo if k.endswith("wo/kernel") else jnp.dtype(dtype)) for k, d in dtypes.items())
        out = encode(graphdef, state, ids)
        assert out.dtype == jnp.dtype(dtype)
        assert max_rel_err(out, want) < REDUCED_MAX_REL[dtype], dtype
    model, folder = clip_folders["G_legacy_proj"]
    _, graphdef, state = load_clip(folder, "bfloat16")
    out = encode(graphdef, state, clip_ids(2))
    assert out.text_embeds.dtype == jnp.bfloat16
    want = torch_clip(model, clip_ids(2)).text_embeds.numpy()
    assert max_rel_err(out.text_embeds, want) < REDUCED_MAX_REL["bfloat16"]


# ---------------------------------------------------------------------------------------- key layouts ---
def rewrite(src_folder: str, dst_folder: str, fn) -> None:
    """Copy a save_pretrained folder, rewriting its tensors with ``fn(dict) -> dict``."""
    shutil.copytree(src_folder, dst_folder)
    path = os.path.join(dst_folder, WEIGHTS_NAME)
    with SafetensorsFile(path) as f:
        tensors = {k: np.array(f.get(k)) for k in f.keys()}
    save_file(fn(tensors), path)


def test_clip_transformers4_layout(clip_folders, tmp_path):
    """Released checkpoints (transformers 4.x) prefix CLIPTextModel keys with text_model. and may hold the
    position_ids buffer; both load to the same params as the 5.x layout."""
    _, folder = clip_folders["L_legacy"]
    _, _, want = load_clip(folder)

    def to_v4(t):
        out = {"text_model." + k: v for k, v in t.items()}
        out["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
        return out

    rewrite(folder, tmp_path / "v4", to_v4)
    _, _, got = load_clip(tmp_path / "v4")
    a, b = state_to_transformers(got), state_to_transformers(want)
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert all(k.startswith("text_model.") for k in a)


def test_clip_projection_flag(clip_folders):
    _, proj_folder = clip_folders["L_eos_proj"]
    _, graphdef, state = load_clip(proj_folder, with_projection=False)
    assert encode(graphdef, state, clip_ids(997)).text_embeds is None
    with pytest.raises(CheckpointError, match="text_projection"):
        load_clip(clip_folders["L_legacy"][1], with_projection=True)


def test_t5_tied_and_full_model_keys(t5_folders, tmp_path):
    model, folder = t5_folders["relu"]
    ids = np.random.default_rng(0).integers(0, VOCAB_T5, (1, 19))
    want = torch_t5(model, ids)
    variants = {
        "both": lambda t: {**t, "encoder.embed_tokens.weight": t["shared.weight"]},
        "embed_only": lambda t: {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v
                                 for k, v in t.items()},
        "full_t5": lambda t: {**t, "decoder.block.0.layer.0.SelfAttention.q.weight": np.ones((32, 32), np.float32),
                              "decoder.final_layer_norm.weight": np.ones(32, np.float32),
                              "lm_head.weight": np.ones((VOCAB_T5, 32), np.float32)},
    }
    for name, fn in variants.items():
        rewrite(folder, tmp_path / name, fn)
        _, graphdef, state = load_t5(tmp_path / name)
        assert max_rel_err(encode(graphdef, state, ids), want) <= MAX_REL, name
    rewrite(folder, tmp_path / "differ", lambda t: {**t, "encoder.embed_tokens.weight": t["shared.weight"] + 1})
    with pytest.raises(CheckpointError, match=r"'encoder\.embed_tokens\.weight' differs from 'shared\.weight'"):
        load_t5(tmp_path / "differ")


def test_sharded_folder(t5_folders, tmp_path):
    _, folder = t5_folders["gated-gelu"]
    dst = tmp_path / "sharded"
    shutil.copytree(folder, dst)
    with SafetensorsFile(dst / WEIGHTS_NAME) as f:
        tensors = {k: np.array(f.get(k)) for k in f.keys()}
    os.remove(dst / WEIGHTS_NAME)
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: tensors[k] for k in ks}, dst / name)
    with open(dst / WEIGHTS_INDEX_NAME, "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}, f)
    a, b = state_to_transformers(load_t5(dst)[2]), state_to_transformers(load_t5(folder)[2])
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ tokenizers ---
PROMPT = "A photo of a cat riding the horse, in the city!"


def test_tiny_clip_tokenizer(tmp_path, clip_folders):
    make_clip_tokenizer(tmp_path / "tokenizer")
    for name in ("vocab.json", "merges.txt"):
        assert os.path.isfile(tmp_path / "tokenizer" / name)
    assert open(tmp_path / "tokenizer" / "merges.txt").readline() == "#version: 0.2\n"
    tok = load_tokenizer(tmp_path / "tokenizer")
    vocab, _ = clip_vocab()
    assert len(tok) == len(vocab) == 256 * 2 + len(CLIP_MERGES) + 2
    assert tok.model_max_length == 77 and tok.eos_token_id == len(vocab) - 1 and tok.bos_token_id == len(vocab) - 2
    enc = tok(PROMPT, padding="max_length", max_length=77, truncation=True)
    ids = enc.input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id
    assert tok.convert_ids_to_tokens(ids[1:6]) == ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of a cat riding the horse , in the city !"
    # End to end as SD3's CLIP-L: padded with eos, legacy pooling (argmax) picks the first eos.
    model, folder = clip_folders["L_legacy"]
    ids = np.asarray([ids, tok("a dog").input_ids + [tok.pad_token_id] * (77 - 4)])
    _, graphdef, state = load_clip(folder)
    out, ref = encode(graphdef, state, ids), torch_clip(model, ids)
    assert max_rel_err(out.pooled_output, ref.pooler_output.numpy()) <= MAX_REL


def test_tiny_t5_tokenizer(tmp_path):
    make_t5_tokenizer(tmp_path / "tokenizer_3", VOCAB_T5)
    tok = load_tokenizer(tmp_path / "tokenizer_3")
    assert len(tok) == VOCAB_T5 and tok.model_max_length == 512
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok(PROMPT).input_ids
    assert ids[-1] == tok.eos_token_id and max(ids) < VOCAB_T5
    assert tok.convert_ids_to_tokens(ids[2:6]) == ["▁photo", "▁of", "▁a", "▁cat"]
    assert tok.decode(ids, skip_special_tokens=True) == PROMPT
    padded = tok(PROMPT, padding="max_length", max_length=256, truncation=True).input_ids
    assert len(padded) == 256 and padded[len(ids):] == [0] * (256 - len(ids))
    with pytest.raises(ValueError, match="too small"):
        make_t5_tokenizer(tmp_path / "small", 50)


def test_tiny_tokenizers_do_not_import_torch(tmp_path):
    code = ("import sys; from dfa2_jax import tiny_tokenizers as t; "
            f"t.make_clip_tokenizer({str(tmp_path / 'c')!r}); t.make_t5_tokenizer({str(tmp_path / 't')!r}, 300); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]


# ---------------------------------------------------------------------------------------- bad inputs ---
def test_missing_weights_names_folder(clip_folders, tmp_path):
    dst = tmp_path / "no_weights"
    shutil.copytree(clip_folders["L_legacy"][1], dst)
    os.remove(dst / WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match=f"{dst}.*missing weights"):
        load_clip(dst)
    with pytest.raises(CheckpointError, match="no such folder"):
        load_t5(tmp_path / "nowhere")
    os.remove(dst / "config.json")
    with pytest.raises(CheckpointError, match=f"{dst}: no config.json"):
        load_clip(dst)
    with pytest.raises(CheckpointError, match="not a tokenizer folder"):
        load_tokenizer(dst)


def edit_config(src: str, dst, **changes) -> None:
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)


def test_config_weights_mismatch_names_key(clip_folders, t5_folders, tmp_path):
    clip, t5 = clip_folders["L_legacy"][1], t5_folders["relu"][1]
    edit_config(clip, tmp_path / "c_layers", num_hidden_layers=4)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'encoder\.layers\.4\.[a-z_0-9.]+' has no "
                                              r"place"):
        load_clip(tmp_path / "c_layers")
    edit_config(clip, tmp_path / "c_width", intermediate_size=40)
    with pytest.raises(CheckpointError, match=r"'encoder\.layers\.\d\.mlp\.fc\d\.(weight|bias)' has shape"):
        load_clip(tmp_path / "c_width")
    edit_config(t5, tmp_path / "t_gated", feed_forward_proj="gated-gelu")
    with pytest.raises(CheckpointError,
                       match=r"'encoder\.block\.\d\.layer\.1\.DenseReluDense\.wi\.weight' has no place"):
        load_t5(tmp_path / "t_gated")
    edit_config(t5, tmp_path / "t_layers", num_layers=6)
    with pytest.raises(CheckpointError, match=r"lacks \d+ tensor.*encoder\.block\.5\."):
        load_t5(tmp_path / "t_layers")
    rewrite(t5, tmp_path / "t_extra", lambda t: {**t, "encoder.block.1.layer.0.SelfAttention.relative_attention_bias."
                                                      "weight": np.zeros((8, 4), np.float32)})
    with pytest.raises(CheckpointError, match=r"'encoder\.block\.1\.layer\.0\.SelfAttention\.relative_attention_bias"):
        load_t5(tmp_path / "t_extra")
    rewrite(clip, tmp_path / "c_vision", lambda t: {**t, "vision_model.post_layernorm.weight": np.ones(4, np.float32)})
    with pytest.raises(CheckpointError, match=r"'vision_model\.post_layernorm\.weight' is not part of a CLIP text"):
        load_clip(tmp_path / "c_vision")


def test_config_from_dict():
    base = dict(CLIP_TINY, hidden_act="gelu", eos_token_id=2)
    noise = {"_name_or_path": "x", "architectures": ["CLIPTextModel"], "torch_dtype": "float16", "dtype": "bfloat16",
             "transformers_version": "4.41.2", "model_type": "clip_text_model", "initializer_factor": 1.0,
             "initializer_range": 0.02, "dropout": 0.0, "attention_dropout": 0.0, "output_hidden_states": False}
    assert CLIPTextConfig.from_dict({**base, **noise}) == CLIPTextConfig(**base)
    with pytest.raises(ConfigError, match="unknown CLIPTextConfig config key 'hiden_size'"):
        CLIPTextConfig.from_dict({**base, "hiden_size": 8}, "cfg.json")
    with pytest.raises(ConfigError, match="hidden_act='swiglu'"):
        CLIPTextConfig.from_dict({**base, "hidden_act": "swiglu"})
    with pytest.raises(ConfigError, match="full CLIPModel"):
        CLIPTextConfig.from_dict({"model_type": "clip", "text_config": {}})
    # a T5 v1.1 XXL encoder config.json with the derived / decoder / generation keys transformers 4.x writes
    xxl = {"architectures": ["T5EncoderModel"], "d_ff": 10240, "d_kv": 64, "d_model": 4096,
           "decoder_start_token_id": 0, "dense_act_fn": "gelu_new", "dropout_rate": 0.1, "eos_token_id": 1,
           "feed_forward_proj": "gated-gelu",
           "initializer_factor": 1.0, "is_encoder_decoder": True, "is_gated_act": True, "layer_norm_epsilon": 1e-06,
           "model_type": "t5", "num_decoder_layers": 24, "num_heads": 64, "num_layers": 24, "output_past": True,
           "pad_token_id": 0, "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
           "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.41.2",
           "use_cache": True, "vocab_size": 32128}
    assert T5Config.from_dict(xxl) == T5Config.v1_1_xxl()
    with pytest.raises(ConfigError, match="model_type='umt5'"):
        T5Config.from_dict({**xxl, "model_type": "umt5"})
    with pytest.raises(ConfigError, match="feed_forward_proj='gated-gelu-x'"):
        T5Config.from_dict({**xxl, "feed_forward_proj": "gated-gelu-x"})
