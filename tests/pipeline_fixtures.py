"""Tiny diffusers SD3 / FLUX pipelines built offline (random weights, tokenizers made in code), saved with
``save_pretrained``: the oracle for our pipelines."""

from __future__ import annotations

import os

from dfa2_jax.tiny_tokenizers import make_clip_tokenizer, make_t5_tokenizer
from tests.conftest import perturb_

T5_VOCAB = 1103


def _clip(with_projection: bool, hidden: int, seed: int, eos_id: int, bos_id: int):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
                         vocab_size=1000, projection_dim=hidden, max_position_embeddings=77, hidden_act="gelu",
                         eos_token_id=eos_id, bos_token_id=bos_id, pad_token_id=eos_id)
    torch.manual_seed(seed)
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg).eval()
    perturb_(model, seed + 100)
    return model


def _t5(d_model: int, seed: int, ff: str = "relu"):
    import torch
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=T5_VOCAB, d_model=d_model, d_ff=37, d_kv=8, num_layers=3, num_heads=4,
                   relative_attention_num_buckets=8, feed_forward_proj=ff, dropout_rate=0.0)
    torch.manual_seed(seed)
    model = T5EncoderModel(cfg).eval()
    perturb_(model, seed + 100)
    return model


def _vae(latent_channels: int, seed: int, shift_factor: float | None):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=latent_channels, norm_num_groups=4, use_quant_conv=False,
                        use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=shift_factor).eval()
    perturb_(vae, seed + 100)
    return vae


def _tokenizers(folder: str):
    """The offline tiny CLIP and T5 tokenizers, written under ``folder`` and read back by transformers."""
    from transformers import AutoTokenizer

    os.makedirs(folder, exist_ok=True)
    make_clip_tokenizer(os.path.join(folder, "_tok_clip"))
    make_t5_tokenizer(os.path.join(folder, "_tok_t5"), T5_VOCAB)
    return (AutoTokenizer.from_pretrained(os.path.join(folder, "_tok_clip")),
            AutoTokenizer.from_pretrained(os.path.join(folder, "_tok_t5")))


def build_sd3_pipeline(folder: str, *, with_t5: bool = True, seed: int = 0):
    """StableDiffusion3Pipeline: SD3.5-style tiny transformer (dual attention, RMS qk-norm), CLIP-L/G, T5."""
    import diffusers
    import torch
    tok, tok_t5 = _tokenizers(folder)
    torch.manual_seed(seed)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64, out_channels=4,
        pos_embed_max_size=96, dual_attention_layers=(0,), qk_norm="rms_norm").eval()
    perturb_(transformer, seed + 1)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(4, seed + 2, 0.0609),
        text_encoder=_clip(True, 32, seed + 3, tok.eos_token_id, tok.bos_token_id), tokenizer=tok,
        text_encoder_2=_clip(True, 32, seed + 4, tok.eos_token_id, tok.bos_token_id), tokenizer_2=tok,
        text_encoder_3=_t5(64, seed + 5, "gated-gelu") if with_t5 else None,
        tokenizer_3=tok_t5 if with_t5 else None)
    pipe.save_pretrained(folder)
    return pipe


def build_flux_pipeline(folder: str, *, guidance: bool = True, seed: int = 0):
    """FluxPipeline: tiny FLUX transformer (guidance embedding or not), CLIP-L (pooled), T5."""
    import diffusers
    import torch
    tok, tok_t5 = _tokenizers(folder)
    torch.manual_seed(seed)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance,
        axes_dims_rope=[4, 4, 8]).eval()
    perturb_(transformer, seed + 1)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(
        shift=3.0 if guidance else 1.0, use_dynamic_shifting=guidance, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    pipe = diffusers.FluxPipeline(
        transformer=transformer, scheduler=sched, vae=_vae(4, seed + 2, 0.1159),
        text_encoder=_clip(False, 32, seed + 3, tok.eos_token_id, tok.bos_token_id), tokenizer=tok,
        text_encoder_2=_t5(32, seed + 5), tokenizer_2=tok_t5)
    pipe.save_pretrained(folder)
    return pipe
