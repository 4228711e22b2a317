"""Tiny SD3-style and FLUX-style pipelines built in code (random weights from a fixed seed, tokenizers made
offline): the machinery of both families at a size that runs in seconds on a CPU, for tests and
``dfa2 demo --model tiny-random``. Their pictures are noise-like textures."""

from __future__ import annotations

import os

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


__all__ = ["tiny_pipelines", "T5_VOCAB"]
