"""The VAE decoder against diffusers' AutoencoderKL on tiny configs (CPU).

1. parity: ``load_vae_decoder`` on ``save_pretrained`` folders, decode of random non-square NCHW latents vs
   ``vae.decode(z).sample`` (eager module call and the jitted ``decode``), with and without ``post_quant_conv``,
   one and two blocks, with and without mid-block attention;
2. ``decode_latents`` = the SD3/FLUX pipelines' ``vae.decode(z / scaling_factor + shift_factor)``;
3. ``to_pil`` = ``VaeImageProcessor.postprocess(..., output_type="pil")`` pixel for pixel;
4. presets = the released vae/config.json; ``from_dict`` rules;
5. bad inputs raise CheckpointError / ConfigError naming the key or field.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from flax import nnx

from converters.safetensors_io import CheckpointError, SafetensorsFile, save_file
from converters.vae import WEIGHTS_INDEX_NAME, WEIGHTS_NAME, leaf_key, load_vae_decoder
from dfa2_jax.models.configs import ConfigError
from dfa2_jax.models.vae import VAEConfig, decode, decode_latents, to_pil
from tests.conftest import max_rel_err, perturb_

# Achieved on CPU (float32, matmul precision "highest"): at most 1.04e-6 max relative error over the variants
# (two_blocks 8.9e-7, quant 6.1e-7, no_mid_attn 1.04e-6, reference 5.9e-7; jitted and decode_latents alike).
PARITY_MAX_REL = 1e-5

TWO_BLOCKS = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                  latent_channels=4, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
                  shift_factor=0.1, scaling_factor=0.5)
TINY = {
    "two_blocks": TWO_BLOCKS,
    # quant convs present (post_quant_conv is decoded), no shift (SD1/SDXL-style), two resnets + 1 per block
    "quant": dict(TWO_BLOCKS, use_quant_conv=True, use_post_quant_conv=True, shift_factor=None,
                  layers_per_block=2, scaling_factor=0.18215),
    "no_mid_attn": dict(TWO_BLOCKS, mid_block_add_attention=False, act_fn="gelu"),
    # diffusers' tiny test VAE: one block, no upsampler, group norm with one group
    "reference": dict(in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1, latent_channels=4,
                      norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                      scaling_factor=1.5305),
}

# vae/config.json of stabilityai/stable-diffusion-3-medium-diffusers (SD3.5 medium/large: the same fields plus
# "mid_block_add_attention": true) and of black-forest-labs/FLUX.1-dev, as released.
RELEASED_SD3 = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.29.0.dev0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True,
    "in_channels": 3, "latent_channels": 16, "latents_mean": None, "latents_std": None, "layers_per_block": 2,
    "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024, "scaling_factor": 1.5305, "shift_factor": 0.0609,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "use_post_quant_conv": False, "use_quant_conv": False,
}
RELEASED_FLUX = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.30.0.dev0", "_name_or_path": "../checkpoints/flux-dev",
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True, "in_channels": 3, "latent_channels": 16, "latents_mean": None, "latents_std": None,
    "layers_per_block": 2, "mid_block_add_attention": True, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": False, "use_quant_conv": False,
}


# ------------------------------------------------------------------------------------------- helpers ---
def build_vae(name: str, seed: int = 0):
    import diffusers
    import torch

    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(**TINY[name]).eval()
    perturb_(vae, seed + 1)
    return vae


def latents(config, batch: int = 2, h: int = 6, w: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, config.latent_channels, h, w), np.float32)


def torch_decode(vae, z: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return vae.decode(torch.from_numpy(z)).sample.numpy()


@pytest.fixture(scope="module")
def tiny_vaes(tmp_path_factory):
    """{name: (diffusers vae, folder)}; the folders are pipeline roots (model_index.json + vae/)."""
    out = {}
    for name in TINY:
        vae = build_vae(name)
        root = tmp_path_factory.mktemp(name)
        (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
        vae.save_pretrained(root / "vae", safe_serialization=True)
        out[name] = (vae, str(root))
    return out


def copy_vae(src_root: str, dst) -> str:
    """A copy of a tiny vae/ folder to edit; returns the vae folder."""
    dst = os.path.join(dst, "vae")
    shutil.copytree(os.path.join(src_root, "vae"), dst)
    return dst


def edit_config(folder: str, **changes) -> None:
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        d = json.load(f)
    d.update(changes)
    with open(path, "w") as f:
        json.dump(d, f)


def read_tensors(folder: str) -> dict[str, np.ndarray]:
    with SafetensorsFile(os.path.join(folder, WEIGHTS_NAME)) as sf:
        return {k: sf.get(k).copy() for k in sf.keys()}


# -------------------------------------------------------------------------------------------- parity ---
@pytest.mark.parametrize("name", list(TINY))
def test_decode_matches_diffusers(tiny_vaes, name):
    vae, root = tiny_vaes[name]
    config, graphdef, state = load_vae_decoder(root)  # pipeline root -> vae/
    assert config == VAEConfig.from_dict(dict(vae.config))
    assert config.vae_scale_factor == 2 ** (len(vae.config.block_out_channels) - 1)
    z = latents(config)  # non-square 6x5
    ref = torch_decode(vae, z)
    decoder = nnx.merge(graphdef, state)
    assert (decoder.post_quant_conv is not None) == vae.config.use_post_quant_conv
    out = np.asarray(decoder(z))
    assert out.shape == ref.shape == (2, 3, 6 * config.vae_scale_factor, 5 * config.vae_scale_factor)
    assert out.dtype == np.float32
    err = max_rel_err(out, ref)
    assert err <= PARITY_MAX_REL, f"{name}: max relative error {err:.2e} > {PARITY_MAX_REL}"
    jitted = np.asarray(decode(graphdef, state, z, unscale=False))
    err = max_rel_err(jitted, ref)
    assert err <= PARITY_MAX_REL, f"{name} (jit): max relative error {err:.2e} > {PARITY_MAX_REL}"


def test_vae_folder_itself_and_encoder_skipped(tiny_vaes):
    vae, root = tiny_vaes["quant"]
    config, _, state = load_vae_decoder(os.path.join(root, "vae"))
    keys = {leaf_key(p) for p, _ in nnx.to_flat_state(state)}
    source = set(vae.state_dict())
    assert keys == {k for k in source if not k.startswith(("encoder.", "quant_conv."))}
    assert "post_quant_conv.weight" in keys and not any(k.startswith("encoder.") for k in keys)


@pytest.mark.parametrize("name", ["two_blocks", "quant"])
def test_decode_latents_is_the_pipeline_formula(tiny_vaes, name):
    vae, root = tiny_vaes[name]
    config, graphdef, state = load_vae_decoder(root)
    z = latents(config, seed=3)
    # StableDiffusion3Pipeline / FluxPipeline: (latents / scaling_factor) + shift_factor, then vae.decode
    unscaled = z / vae.config.scaling_factor
    if vae.config.shift_factor is not None:
        unscaled = unscaled + vae.config.shift_factor
    ref = torch_decode(vae, unscaled.astype(np.float32))
    decoder = nnx.merge(graphdef, state)
    for out in (decode_latents(decoder, z, config), decode_latents(decoder, z), decode(graphdef, state, z)):
        err = max_rel_err(np.asarray(out), ref)
        assert err <= PARITY_MAX_REL, f"max relative error {err:.2e}"


def test_bfloat16_load(tiny_vaes):
    vae, root = tiny_vaes["two_blocks"]
    config, graphdef, state = load_vae_decoder(root, dtype="bfloat16")
    assert {str(v[...].dtype) for _, v in nnx.to_flat_state(state)} == {"bfloat16"}
    z = latents(config)
    out = np.asarray(nnx.merge(graphdef, state)(z).astype("float32"))
    assert max_rel_err(out, torch_decode(vae, z)) < 5e-2  # bf16 weights and activations


# ------------------------------------------------------------------------------------------- to_pil ---
@pytest.mark.parametrize("channels", [3, 1])
def test_to_pil_matches_vae_image_processor(tiny_vaes, channels):
    import torch
    from diffusers.image_processor import VaeImageProcessor

    vae, root = tiny_vaes["two_blocks"]
    config, graphdef, state = load_vae_decoder(root)
    rng = np.random.default_rng(5)
    images = np.asarray(decode(graphdef, state, latents(config)))[:, :channels] * 3.0  # some beyond [-1, 1]
    # values whose (x / 2 + 0.5) * 255 lands on k + 0.5 exactly: rounding half to even must agree
    halves = ((np.arange(images[0, 0].size) % 255 + 0.5) / 255 - 0.5) * 2
    images[0, 0] = halves.reshape(images[0, 0].shape).astype(np.float32)
    images[1] += rng.normal(0, 1e-3, images[1].shape).astype(np.float32)
    proc = VaeImageProcessor(vae_scale_factor=config.vae_scale_factor)
    want = proc.postprocess(torch.from_numpy(images), output_type="pil")
    got = to_pil(images)
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        assert g.mode == w.mode and g.size == w.size == (images.shape[3], images.shape[2])
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


# ------------------------------------------------------------------------------------------ configs ---
@pytest.mark.parametrize("preset,released", [(VAEConfig.sd3, RELEASED_SD3), (VAEConfig.flux, RELEASED_FLUX)])
def test_presets_equal_released_configs(preset, released):
    cfg = preset()
    assert cfg == VAEConfig.from_dict(released, "released")
    exported = cfg.to_diffusers()
    for key, value in released.items():
        if not key.startswith("_"):
            assert exported[key] == value, key
    assert exported["mid_block_add_attention"] is True  # absent from SD3's file: diffusers' default
    assert cfg.vae_scale_factor == 8 and cfg.latent_channels == 16
    assert not cfg.use_quant_conv and not cfg.use_post_quant_conv
    assert hash(cfg) == hash(preset())  # usable as a static jit argument


def test_presets_build_diffusers_shapes():
    """Every leaf of the SD3/FLUX-sized decoder has the shape of the released AutoencoderKL's tensor."""
    import diffusers
    import torch

    from converters.common import torch_shape as _torch_shape
    from converters.vae import abstract_decoder

    kwargs = {k: v for k, v in VAEConfig.flux().to_diffusers().items() if not k.startswith("_")}
    with torch.device("meta"):  # shapes only, nothing allocated
        ref = diffusers.AutoencoderKL(**kwargs)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.startswith(("encoder.", "quant_conv."))}
    got = {leaf_key(p): _torch_shape(str(p[-1]), tuple(v.shape))
           for p, v in nnx.to_flat_state(nnx.state(abstract_decoder(VAEConfig.flux())))}
    assert got == want


def test_from_dict_rules():
    d = dict(RELEASED_FLUX, _anything="ignored")
    assert VAEConfig.from_dict(d) == VAEConfig.flux()
    with pytest.raises(ConfigError, match="'bogus_key'"):
        VAEConfig.from_dict(dict(RELEASED_FLUX, bogus_key=1))
    with pytest.raises(ConfigError, match="FluxTransformer2DModel"):
        VAEConfig.from_dict({"_class_name": "FluxTransformer2DModel"})
    with pytest.raises(ConfigError, match="AttnUpDecoderBlock2D"):
        VAEConfig.from_dict(dict(RELEASED_FLUX, up_block_types=["AttnUpDecoderBlock2D"] * 4))
    with pytest.raises(ConfigError, match="norm_num_groups"):
        VAEConfig.from_dict(dict(RELEASED_FLUX, norm_num_groups=48))
    with pytest.raises(ConfigError, match="up_block_types"):
        VAEConfig.from_dict(dict(RELEASED_FLUX, up_block_types=["UpDecoderBlock2D"] * 3))


# -------------------------------------------------------------------------------------- bad inputs ---
def test_missing_weight_names_key(tiny_vaes, tmp_path):
    folder = copy_vae(tiny_vaes["two_blocks"][1], tmp_path)
    tensors = read_tensors(folder)
    del tensors["decoder.up_blocks.1.resnets.0.norm2.weight"]
    save_file(tensors, os.path.join(folder, WEIGHTS_NAME))
    with pytest.raises(CheckpointError, match=r"decoder\.up_blocks\.1\.resnets\.0\.norm2\.weight"):
        load_vae_decoder(folder)


def test_missing_weights_file(tiny_vaes, tmp_path):
    folder = copy_vae(tiny_vaes["two_blocks"][1], tmp_path)
    os.unlink(os.path.join(folder, WEIGHTS_NAME))
    with pytest.raises(CheckpointError, match="missing VAE weights"):
        load_vae_decoder(tmp_path)


def test_missing_vae_folder(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="without a vae/"):
        load_vae_decoder(tmp_path)


@pytest.mark.parametrize("change,pattern", [
    (dict(layers_per_block=2), r"lack .*decoder\.up_blocks\.0\.resnets\.2\."),  # config wants more than stored
    (dict(mid_block_add_attention=False),
     r"decoder\.mid_block\.attentions\.0\.\w+\.\w+'? has no place"),  # stored attention, config has none
    (dict(use_post_quant_conv=True), r"post_quant_conv\.(weight|bias)"),
    (dict(latent_channels=3), r"'decoder\.conv_in\.weight' has shape \(16, 4, 3, 3\).*\(16, 3, 3, 3\)"),
])
def test_config_weights_mismatch_names_key(tiny_vaes, tmp_path, change, pattern):
    folder = copy_vae(tiny_vaes["two_blocks"][1], tmp_path)
    edit_config(folder, **change)
    with pytest.raises(CheckpointError, match=pattern) as e:
        load_vae_decoder(folder)
    assert folder in str(e.value)


def test_fewer_layers_than_stored_names_unused_key(tiny_vaes, tmp_path):
    folder = copy_vae(tiny_vaes["quant"][1], tmp_path)  # layers_per_block=2 stored
    edit_config(folder, layers_per_block=1)
    with pytest.raises(CheckpointError, match=r"'decoder\.up_blocks\.\d\.resnets\.2\.\w+\.\w+' has no place"):
        load_vae_decoder(folder)


def test_legacy_attention_names_and_shards(tiny_vaes, tmp_path):
    """Pre-0.14 names (query/key/value/proj_attn) and a sharded index give the same params as the folder."""
    vae, root = tiny_vaes["two_blocks"]
    _, _, want = load_vae_decoder(root)
    folder = copy_vae(root, tmp_path)
    tensors = read_tensors(folder)
    prefix = "decoder.mid_block.attentions.0."
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
        for leaf in ("weight", "bias"):
            tensors[f"{prefix}{old}.{leaf}"] = tensors.pop(f"{prefix}{new}.{leaf}")
    os.unlink(os.path.join(folder, WEIGHTS_NAME))
    keys = sorted(tensors)
    half = len(keys) // 2
    shards = {"a-00001-of-00002.safetensors": keys[:half], "a-00002-of-00002.safetensors": keys[half:]}
    for shard, ks in shards.items():
        save_file({k: tensors[k] for k in ks}, os.path.join(folder, shard))
    with open(os.path.join(folder, WEIGHTS_INDEX_NAME), "w") as f:
        json.dump({"weight_map": {k: s for s, ks in shards.items() for k in ks}}, f)
    _, _, got = load_vae_decoder(folder)
    a, b = dict(nnx.to_flat_state(got)), dict(nnx.to_flat_state(want))
    assert a.keys() == b.keys()
    for p in b:
        np.testing.assert_array_equal(np.asarray(a[p][...]), np.asarray(b[p][...]), err_msg=leaf_key(p))
    # old and new names for the same tensor at once: ambiguous
    extra = os.path.join(folder, "a-00002-of-00002.safetensors")
    with SafetensorsFile(extra) as sf:
        shard = {k: sf.get(k).copy() for k in sf.keys()}
    shard[f"{prefix}to_q.weight"] = tensors[f"{prefix}query.weight"]
    save_file(shard, extra)
    with open(os.path.join(folder, WEIGHTS_INDEX_NAME), "w") as f:
        json.dump({"weight_map": {**{k: s for s, ks in shards.items() for k in ks},
                                  f"{prefix}to_q.weight": "a-00002-of-00002.safetensors"}}, f)
    with pytest.raises(CheckpointError, match="query"):
        load_vae_decoder(folder)
