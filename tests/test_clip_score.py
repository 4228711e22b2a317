"""CLIP score (dfa2_jax.metrics.clip_score): a tiny random transformers ``CLIPModel`` saved with save_pretrained
next to a tiny CLIP tokenizer and a ``CLIPImageProcessorPil`` config; our preprocessing equals the PIL image
processor's, our image / text embeddings equal ``get_image_features`` / ``get_text_features``, and the score equals
the torch computation of 100 * max(cos, 0)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from converters.safetensors_io import CheckpointError
from dfa2_jax.metrics.clip_score import (CLIPPreprocess, clip_score_from_embeds, clip_scores, image_embeds,
                                         load_clip_scorer, missing_clip_file, preprocess, text_embeds, tokenize)
from dfa2_jax.models.configs import ConfigError
from dfa2_jax.tiny_tokenizers import clip_vocab, make_clip_tokenizer

torch = pytest.importorskip("torch")

IMAGE_SIZE = 32
PROMPTS = ["a photo of the cat", "the dog and the cat on a red mat", "photo " * 60]  # the last: truncated


def make_tiny_clip_folder(folder, seed: int = 0, image_size: int = IMAGE_SIZE):
    """A CLIPModel folder as an openai/clip-vit-* snapshot, tiny: config.json + model.safetensors, the tiny CLIP
    tokenizer, preprocessor_config.json (CLIPImageProcessorPil, shortest edge = crop = image_size). Returns the
    transformers model (eval mode)."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from tests.conftest import perturb_

    tok = make_clip_tokenizer(folder)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(clip_vocab()[0]), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=24)
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    perturb_(model, seed)
    model.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": image_size},
                          crop_size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip-vit-tiny")
    model = make_tiny_clip_folder(folder)
    return folder, model, load_clip_scorer(folder)


def random_images(seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    # non-square both ways (resize keeps the aspect, center crop), one already at the model's size, one array
    ims = [Image.fromarray(rng.integers(0, 256, s, dtype=np.uint8)) for s in ((40, 53, 3), (61, 45, 3), (32, 32, 3))]
    return ims + [rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)]


def pooled(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 4.x / 5.x


def test_preprocess_matches_clip_image_processor(clip):
    from transformers import CLIPImageProcessorPil

    folder, _, scorer = clip
    assert scorer.preprocess == CLIPPreprocess(IMAGE_SIZE, (IMAGE_SIZE, IMAGE_SIZE))
    ims = random_images()
    proc = CLIPImageProcessorPil.from_pretrained(folder)
    want = proc(images=ims, return_tensors="np")["pixel_values"]
    got = preprocess(ims, scorer.preprocess)
    assert got.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE) and got.dtype == np.float32
    assert np.array_equal(got, want)


def test_embeddings_match_transformers(clip):
    from transformers import CLIPImageProcessorPil

    folder, model, scorer = clip
    ims = random_images(1)
    pixel_values = CLIPImageProcessorPil.from_pretrained(folder)(images=ims, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        want_img = pooled(model.get_image_features(pixel_values=pixel_values)).numpy()
    got_img = image_embeds(scorer, ims, batch_size=3)  # 3 + a padded batch of 1
    err_img = float(np.max(np.abs(got_img - want_img)))

    ids = tokenize(scorer, PROMPTS)
    enc = scorer.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert np.array_equal(ids, enc["input_ids"].numpy()) and ids.shape == (3, 77)
    assert ids[2, -1] == scorer.tokenizer.eos_token_id  # truncation keeps the eos last
    with torch.no_grad():
        want_txt = pooled(model.get_text_features(**enc)).numpy()
        # torchmetrics pads to the longest prompt with an attention mask: the same embeddings
        longest = scorer.tokenizer(PROMPTS[:2], padding=True, return_tensors="pt")
        want_longest = pooled(model.get_text_features(**longest)).numpy()
    got_txt = text_embeds(scorer, PROMPTS)
    err_txt = float(np.max(np.abs(got_txt - want_txt)))
    print(f"CLIP embeds max |ours - transformers|: image {err_img:.2e}, text {err_txt:.2e}")
    assert got_img.shape == (4, 24) and got_txt.shape == (3, 24)
    assert err_img <= 1e-5 and err_txt <= 1e-5
    assert np.max(np.abs(got_txt[:2] - want_longest)) <= 1e-5


def test_clip_score_matches_torch_formula(clip):
    from transformers import CLIPImageProcessorPil

    folder, model, scorer = clip
    ims = random_images(2)[:3]
    got = clip_scores(scorer, ims, PROMPTS)
    with torch.no_grad():
        pv = CLIPImageProcessorPil.from_pretrained(folder)(images=ims, return_tensors="pt")["pixel_values"]
        img = pooled(model.get_image_features(pixel_values=pv))
        enc = scorer.tokenizer(PROMPTS, padding=True, truncation=True, return_tensors="pt")
        txt = pooled(model.get_text_features(**enc))
        img = img / img.norm(p=2, dim=-1, keepdim=True)
        txt = txt / txt.norm(p=2, dim=-1, keepdim=True)
        want = (100 * (img * txt).sum(axis=-1)).clamp(min=0).numpy()
    # a random model's cosines may all have one sign: with the text embeddings negated as well, every pair
    # exercises both sides of the clamp
    flipped = clip_score_from_embeds(image_embeds(scorer, ims), -text_embeds(scorer, PROMPTS))
    want_flipped = (100 * (img * -txt).sum(axis=-1)).clamp(min=0).numpy()
    assert np.all((want > 0) | (want_flipped > 0))
    err = max(float(np.max(np.abs(got - want))), float(np.max(np.abs(flipped - want_flipped))))
    print(f"CLIP score max |ours - torch| = {err:.2e} (scores {want}, negated text {want_flipped})")
    assert got.dtype == np.float64 and got.shape == (3,) and err <= 1e-4


def test_clip_score_formula():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    b = np.array([[3.0, 0.0], [-1.0, -1.0], [1.0, 1.0]])
    assert np.allclose(clip_score_from_embeds(a, b), [100.0, 0.0, 100 / np.sqrt(2)])
    with pytest.raises(ValueError, match="one shape"):
        clip_score_from_embeds(a, b[:2])


# ============================================================================================ folder errors
def test_folder_errors_name_the_file(clip, tmp_path):
    import shutil

    folder, _, _ = clip
    bad = tmp_path / "clip"
    shutil.copytree(folder, bad)
    assert missing_clip_file(bad) is None
    (bad / "merges.txt").unlink()
    assert missing_clip_file(bad) is None  # tokenizer.json alone is a tokenizer
    (bad / "tokenizer.json").unlink()
    assert missing_clip_file(bad) == str(bad / "merges.txt")
    with pytest.raises(CheckpointError, match=f"{bad / 'merges.txt'}: missing"):
        load_clip_scorer(bad)
    shutil.copy(folder / "merges.txt", bad / "merges.txt")
    (bad / "model.safetensors").rename(bad / "weights")
    assert missing_clip_file(bad) == str(bad / "model.safetensors")
    (bad / "weights").rename(bad / "model.safetensors")
    assert missing_clip_file(tmp_path / "nope") == str(tmp_path / "nope")

    # transformers 4.x checkpoints hold the position_ids buffers: ignored; any other stray key is an error
    # safetensors' own writer: converters.safetensors_io.save_file stores the 0-d logit_scale as [1]
    # (np.ascontiguousarray makes 0-d arrays 1-d)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(bad / "model.safetensors")
    save_file({**tensors, "vision_model.embeddings.position_ids": np.arange(17)[None],
               "text_model.embeddings.position_ids": np.arange(77)[None]}, bad / "model.safetensors")
    load_clip_scorer(bad)
    save_file({**tensors, "vision_model.head.weight": np.zeros((2, 2), np.float32)}, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match="'vision_model.head.weight' has no place"):
        load_clip_scorer(bad)
    save_file({k: v for k, v in tensors.items() if k != "visual_projection.weight"}, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match="visual_projection.weight"):
        load_clip_scorer(bad)
    save_file(tensors, bad / "model.safetensors")

    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(cfg["text_config"]))
    with pytest.raises(ConfigError, match="not a CLIPModel config"):
        load_clip_scorer(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "vision_config": {**cfg["vision_config"], "use_swin": 1}}))
    with pytest.raises(ConfigError, match="vision_config: unknown CLIPVisionConfig config key 'use_swin'"):
        load_clip_scorer(bad)
    (bad / "config.json").write_text(json.dumps(cfg))

    pre = json.loads((bad / "preprocessor_config.json").read_text())
    (bad / "preprocessor_config.json").write_text(json.dumps({**pre, "resample": 2}))
    with pytest.raises(ConfigError, match="resample=2"):
        load_clip_scorer(bad)
    # the older openai layout: int size / crop_size
    (bad / "preprocessor_config.json").write_text(json.dumps({"crop_size": 24, "size": 28, "do_resize": True,
                                                              "resample": 3, "image_mean": [0.5] * 3}))
    scorer = load_clip_scorer(bad)
    assert scorer.preprocess == CLIPPreprocess(28, (24, 24), (0.5, 0.5, 0.5))


def test_config_transformers4_layout():
    """openai/clip-vit-large-patch14-style config.json of transformers 4.x: every PretrainedConfig key in both
    sub-configs (generation settings, is_decoder, null token ids in the vision one), *_config_dict duplicates."""
    from dfa2_jax.metrics.clip_score import CLIPConfig

    common = {"add_cross_attention": False, "architectures": None, "attention_dropout": 0, "dropout": 0,
              "bad_words_ids": None, "chunk_size_feed_forward": 0, "do_sample": False, "id2label": {"0": "LABEL_0"},
              "initializer_factor": 1, "initializer_range": 0.02, "is_decoder": False, "is_encoder_decoder": False,
              "max_length": 20, "num_beams": 1, "pruned_heads": {}, "return_dict": True, "tie_word_embeddings": True,
              "top_k": 50, "torch_dtype": None, "torchscript": False, "use_bfloat16": False, "layer_norm_eps": 1e-5,
              "hidden_act": "quick_gelu"}
    d = {"initializer_factor": 1, "logit_scale_init_value": 2.6592, "model_type": "clip", "projection_dim": 768,
         "text_config": {**common, "model_type": "clip_text_model", "bos_token_id": 0, "eos_token_id": 2,
                         "pad_token_id": 1, "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                         "num_hidden_layers": 12, "max_position_embeddings": 77, "vocab_size": 49408},
         "text_config_dict": {"hidden_size": 768},
         "vision_config": {**common, "model_type": "clip_vision_model", "bos_token_id": None, "eos_token_id": None,
                           "pad_token_id": None, "hidden_size": 1024, "intermediate_size": 4096, "image_size": 224,
                           "num_attention_heads": 16, "num_hidden_layers": 24, "num_channels": 3, "patch_size": 14},
         "vision_config_dict": {"hidden_size": 1024}, "torch_dtype": "float32", "transformers_version": None}
    c = CLIPConfig.from_dict(d, "config.json")
    assert c.projection_dim == 768 and c.text.projection_dim == 768 and c.text.eos_token_id == 2
    assert (c.vision.hidden_size, c.vision.patch_size, c.vision.num_positions) == (1024, 14, 257)
    with pytest.raises(ConfigError, match="model_type='clip_vision_model'"):
        CLIPConfig.from_dict({**d, "text_config": d["vision_config"]}, "config.json")
