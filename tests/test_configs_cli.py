"""Config presets equal the released config.json values; config.json round trip; the `dfa2` CLI."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

import dfa2_jax
from dfa2_jax.cli import main
from dfa2_jax.models.configs import ConfigError, config_from_dict

# transformer/config.json of the released checkpoints (architecture keys).
RELEASED = {
    "sd3-medium": ({"_class_name": "SD3Transformer2DModel", "attention_head_dim": 64, "caption_projection_dim": 1536,
                    "in_channels": 16, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 24,
                    "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
                    "sample_size": 128}, dfa2_jax.SD3Config.medium()),
    "sd3.5-medium": ({"_class_name": "SD3Transformer2DModel", "attention_head_dim": 64,
                      "caption_projection_dim": 1536, "dual_attention_layers": list(range(13)), "in_channels": 16,
                      "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 24, "out_channels": 16,
                      "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
                      "qk_norm": "rms_norm", "sample_size": 128}, dfa2_jax.SD3Config.v35_medium()),
    "sd3.5-large": ({"_class_name": "SD3Transformer2DModel", "attention_head_dim": 64, "caption_projection_dim": 2432,
                     "in_channels": 16, "joint_attention_dim": 4096, "num_attention_heads": 38, "num_layers": 38,
                     "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
                     "qk_norm": "rms_norm", "sample_size": 128, "dual_attention_layers": []},
                    dfa2_jax.SD3Config.v35_large()),
    "flux-dev": ({"_class_name": "FluxTransformer2DModel", "attention_head_dim": 128, "guidance_embeds": True,
                  "in_channels": 64, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19,
                  "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768,
                  "axes_dims_rope": [16, 56, 56], "_diffusers_version": "0.30.0.dev0"}, dfa2_jax.FluxConfig.dev()),
    "flux-schnell": ({"_class_name": "FluxTransformer2DModel", "attention_head_dim": 128, "guidance_embeds": False,
                      "in_channels": 64, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19,
                      "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768},
                     dfa2_jax.FluxConfig.schnell()),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_presets_equal_released_configs(name):
    raw, preset = RELEASED[name]
    assert config_from_dict(raw, name) == preset
    assert config_from_dict(preset.to_diffusers()) == preset
    hash(preset)  # usable as a static jit argument


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="unknown SD3Transformer2DModel config key 'num_blocks'"):
        config_from_dict({"_class_name": "SD3Transformer2DModel", "num_blocks": 3})
    with pytest.raises(ConfigError, match="unknown model type _class_name='UNet2DConditionModel'"):
        config_from_dict({"_class_name": "UNet2DConditionModel"})
    with pytest.raises(ConfigError, match="sum\\(axes_dims_rope\\)"):
        config_from_dict({"_class_name": "FluxTransformer2DModel", "axes_dims_rope": [16, 56, 55]})


def test_attention_layer_names():
    """Full-width configs, built abstractly (shapes only: nothing is allocated) to read the module's names."""
    from converters.transformer import abstract_model

    sd35 = abstract_model(dfa2_jax.SD3Config.v35_medium(num_layers=3, dual_attention_layers=(0,)), jnp.float32)
    assert sd35.attention_layer_names() == [
        "transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.1.attn",
        "transformer_blocks.2.attn"]
    flux = abstract_model(dfa2_jax.FluxConfig.dev(num_layers=2, num_single_layers=1, num_attention_heads=2),
                          jnp.bfloat16)
    assert flux.attention_layer_names() == ["transformer_blocks.0.attn", "transformer_blocks.1.attn",
                                            "single_transformer_blocks.0.attn"]


def test_random_transformer_is_deterministic_and_finite():
    cfg = dfa2_jax.SD3Config.medium(num_layers=2, num_attention_heads=2, caption_projection_dim=128,
                                    pos_embed_max_size=16, joint_attention_dim=64, pooled_projection_dim=32)
    a = dfa2_jax.random_transformer(cfg, dtype="float32", seed=3)
    b = dfa2_jax.random_transformer(cfg, dtype="float32", seed=3)
    rng = np.random.default_rng(0)
    x = dict(hidden_states=rng.standard_normal((1, 16, 8, 6), np.float32),
             encoder_hidden_states=rng.standard_normal((1, 5, 64), np.float32),
             pooled_projections=rng.standard_normal((1, 32), np.float32), timestep=np.array([500.0], np.float32))
    out_a, out_b = np.asarray(a(**x)), np.asarray(b(**x))
    np.testing.assert_array_equal(out_a, out_b)
    assert np.isfinite(out_a).all() and out_a.shape == (1, 16, 8, 6) and np.abs(out_a).max() > 0


def test_cli_info_and_convert(tiny_folders, tmp_path, capsys):
    _, folder = tiny_folders["sd35"]
    assert main(["info", "--model", folder]) == 0
    out = capsys.readouterr().out
    assert "SD3Transformer2DModel (diffusers, layout diffusers_sd3)" in out and "qk_norm: rms_norm" in out
    assert main(["convert", "--model", folder, "--dtype", "float32", "--cache-dir", str(tmp_path)]) == 0
    assert "from diffusers" in capsys.readouterr().out
    assert main(["convert", "--model", folder, "--dtype", "float32", "--cache-dir", str(tmp_path)]) == 0
    assert "from orbax" in capsys.readouterr().out
    assert main(["info", "--model", str(tmp_path / "nothing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_config_json_is_what_diffusers_wrote(tiny_folders):
    model, folder = tiny_folders["flux_dev"]
    with open(f"{folder}/config.json") as f:
        written = json.load(f)
    cfg = dfa2_jax.config_from_json(f"{folder}/config.json")
    assert cfg.num_layers == written["num_layers"] == model.config.num_layers
    assert cfg.guidance_embeds is True and cfg.axes_dims_rope == (4, 4, 8)
