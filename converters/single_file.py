"""Original single-file transformer checkpoints <-> diffusers key names, in pure NumPy.

Layouts handled:
- ``"sai_sd3"``: Stability AI SD3 / SD3.5 files (``model.diffusion_model.joint_blocks.N.x_block...``; the
  prefix is optional).
- ``"bfl_flux"``: Black Forest Labs FLUX.1 files (``double_blocks.N.img_attn.qkv...``); ComfyUI repacks put a
  ``model.diffusion_model.`` prefix in front, which is accepted.
- ``"diffusers_sd3"`` / ``"diffusers_flux"``: already diffusers-named; converted as the identity, with the same
  missing / unused key checks.

The mapping follows diffusers 0.42.1 ``loaders/single_file_utils.py``
(``convert_sd3_transformer_checkpoint_to_diffusers``, ``convert_flux_transformer_checkpoint_to_diffusers``) key
for key; ``tests/test_single_file_keys.py`` checks both directions against it bitwise. The only transforms are:
- split fused projections along axis 0: ``attn.qkv`` / ``attn2.qkv`` (SD3), ``img_attn.qkv`` / ``txt_attn.qkv``
  (FLUX double blocks) into q, k, v; FLUX single-block ``linear1`` into [q, k, v, mlp];
- swap the two halves of ``AdaLayerNormContinuous`` projections, whose originals emit (shift, scale) where
  diffusers emits (scale, shift): ``final_layer.adaLN_modulation.1`` -> ``norm_out.linear`` (both families) and
  SD3's last block ``context_block.adaLN_modulation.1`` -> ``norm1_context.linear`` (that block is
  ``context_pre_only``, so its context norm is continuous, not AdaLN-Zero);
- everything else is a rename (FLUX ``*.norm.*_norm.scale`` -> ``*.norm_*.weight``).

Ignored keys: when a file holds ``model.diffusion_model.*`` keys, only those are the transformer; every other
key (``text_encoders.*``, ``first_stage_model.*``, ``vae.*``, ``conditioner.*`` ... of full-pipeline files) is
skipped on purpose, as diffusers' transformer converter does. Any *transformer* key that the mapping does not
consume is an error (diffusers silently drops those), as is any key the mapping needs but the file lacks.

Arrays may be float32, float16 or ``ml_dtypes.bfloat16``: only slicing and ``np.concatenate`` are used, so
values are moved bit for bit and the dtype is kept.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np

PREFIX = "model.diffusion_model."
LAYOUTS = ("sai_sd3", "bfl_flux", "diffusers_sd3", "diffusers_flux")
_ORIGINAL_LAYOUTS = ("sai_sd3", "bfl_flux")

# FLUX.1 rope axes (time, height, width) for its head_dim 128 (diffusers FluxTransformer2DModel default).
FLUX_AXES_DIMS_ROPE = (16, 56, 56)
# Every released SD3 / SD3.5 model uses head_dim 64; SAI files without qk-norm do not record it.
SD3_HEAD_DIM = 64
# SD3Transformer2DModel default (=> 1024 px); not stored in the weights.
SD3_SAMPLE_SIZE = 128


class CheckpointKeyError(KeyError, ValueError):
    """A checkpoint key is missing, left over, or has an unexpected shape. The message names the key(s)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


# --------------------------------------------------------------------------------------------- the plan ---
@dataclasses.dataclass(frozen=True)
class _Op:
    """One source tensor -> one or more diffusers tensors.

    kind: "copy" (rename), "swap" (exchange the two halves of axis 0), "split" (cut axis 0 into `sizes`,
    where -1 takes the remainder). `src` is the original name without PREFIX; `dst` the diffusers names.
    """

    kind: str
    src: str
    dst: tuple[str, ...]
    sizes: tuple[int, ...] = ()


def _wb(kind: str, src: str, dst: str | tuple[str, ...], sizes: tuple[int, ...] = ()) -> list[_Op]:
    """The weight and bias ops of one Linear (or fused Linear)."""
    dsts = (dst,) if isinstance(dst, str) else dst
    return [_Op(kind, f"{src}.{p}", tuple(f"{d}.{p}" for d in dsts), sizes) for p in ("weight", "bias")]


# SAI SD3 name -> diffusers name, for Linears (weight + bias).
_SD3_TOP = (
    ("x_embedder.proj", "pos_embed.proj"),  # Conv2d [D, C, p, p]
    ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
    ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
    ("context_embedder", "context_embedder"),
)
_SD3_BLOCK_X = (
    ("x_block.attn.proj", "attn.to_out.0"),
    ("x_block.adaLN_modulation.1", "norm1.linear"),  # 6D, or 9D (SD35AdaLayerNormZeroX) in dual layers
    ("x_block.mlp.fc1", "ff.net.0.proj"),
    ("x_block.mlp.fc2", "ff.net.2"),
)
_SD3_BLOCK_CONTEXT = (  # absent from the last block (context_pre_only) except its adaLN, handled apart
    ("context_block.attn.proj", "attn.to_add_out"),
    ("context_block.adaLN_modulation.1", "norm1_context.linear"),
    ("context_block.mlp.fc1", "ff_context.net.0.proj"),
    ("context_block.mlp.fc2", "ff_context.net.2"),
)
_SD3_QK_NORM = (  # RMSNorm weights only
    ("x_block.attn.ln_q", "attn.norm_q"),
    ("x_block.attn.ln_k", "attn.norm_k"),
    ("context_block.attn.ln_q", "attn.norm_added_q"),
    ("context_block.attn.ln_k", "attn.norm_added_k"),
)
_SD3_QK_NORM_ATTN2 = (("x_block.attn2.ln_q", "attn2.norm_q"), ("x_block.attn2.ln_k", "attn2.norm_k"))

# BFL FLUX name -> diffusers name, for Linears (weight + bias).
_FLUX_TOP = (
    ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("txt_in", "context_embedder"),
    ("img_in", "x_embedder"),
)
_FLUX_GUIDANCE = (  # FLUX.1-dev only; schnell has no guidance_in
    ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
)
_FLUX_DOUBLE = (
    ("img_mod.lin", "norm1.linear"),
    ("txt_mod.lin", "norm1_context.linear"),
    ("img_attn.proj", "attn.to_out.0"),
    ("txt_attn.proj", "attn.to_add_out"),
    ("img_mlp.0", "ff.net.0.proj"),
    ("img_mlp.2", "ff.net.2"),
    ("txt_mlp.0", "ff_context.net.0.proj"),
    ("txt_mlp.2", "ff_context.net.2"),
)
_FLUX_DOUBLE_QK_NORM = (  # RMSNorm `.scale` -> `.weight`
    ("img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
    ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
    ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
    ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"),
)
_FLUX_SINGLE = (("modulation.lin", "norm.linear"), ("linear2", "proj_out"))
_FLUX_SINGLE_QK_NORM = (
    ("norm.query_norm.scale", "attn.norm_q.weight"),
    ("norm.key_norm.scale", "attn.norm_k.weight"),
)


def _sd3_plan(config: Mapping) -> list[_Op]:
    n = int(config["num_layers"])
    inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    dual = {int(i) for i in (config.get("dual_attention_layers") or ())}
    qk_norm = config.get("qk_norm")
    if qk_norm not in (None, "rms_norm"):
        raise ValueError(f"sd3: qk_norm={qk_norm!r} is not supported by the SAI layout (None or 'rms_norm')")
    qkv = (inner, inner, inner)
    ops = [_Op("copy", "pos_embed", ("pos_embed.pos_embed",))]  # [1, N, D] in both layouts
    for src, dst in _SD3_TOP:
        ops += _wb("copy", src, dst)
    for i in range(n):
        s, d = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
        last = i == n - 1
        ops += _wb("split", s + "x_block.attn.qkv", (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"), qkv)
        ops += _wb("split", s + "context_block.attn.qkv",
                   (d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"), qkv)
        for src, dst in _SD3_BLOCK_X:
            ops += _wb("copy", s + src, d + dst)
        if last:
            ops += _wb("swap", s + "context_block.adaLN_modulation.1", d + "norm1_context.linear")
        else:
            for src, dst in _SD3_BLOCK_CONTEXT:
                ops += _wb("copy", s + src, d + dst)
        if i in dual:
            ops += _wb("split", s + "x_block.attn2.qkv", (d + "attn2.to_q", d + "attn2.to_k", d + "attn2.to_v"), qkv)
            ops += _wb("copy", s + "x_block.attn2.proj", d + "attn2.to_out.0")
        if qk_norm is not None:
            pairs = _SD3_QK_NORM + (_SD3_QK_NORM_ATTN2 if i in dual else ())
            ops += [_Op("copy", f"{s}{src}.weight", (f"{d}{dst}.weight",)) for src, dst in pairs]
    ops += _wb("copy", "final_layer.linear", "proj_out")
    ops += _wb("swap", "final_layer.adaLN_modulation.1", "norm_out.linear")
    return ops


def _flux_plan(config: Mapping) -> list[_Op]:
    inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    qkv = (inner, inner, inner)
    ops: list[_Op] = []
    for src, dst in _FLUX_TOP + (_FLUX_GUIDANCE if config.get("guidance_embeds") else ()):
        ops += _wb("copy", src, dst)
    for i in range(int(config["num_layers"])):
        s, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for src, dst in _FLUX_DOUBLE:
            ops += _wb("copy", s + src, d + dst)
        ops += _wb("split", s + "img_attn.qkv", (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"), qkv)
        ops += _wb("split", s + "txt_attn.qkv",
                   (d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"), qkv)
        ops += [_Op("copy", s + src, (d + dst,)) for src, dst in _FLUX_DOUBLE_QK_NORM]
    for i in range(int(config["num_single_layers"])):
        s, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        for src, dst in _FLUX_SINGLE:
            ops += _wb("copy", s + src, d + dst)
        # linear1 = [q | k | v | mlp-in] along the output axis; the mlp part is whatever is left
        # (diffusers assumes 4 * inner, true of every FLUX.1 model).
        ops += _wb("split", s + "linear1",
                   (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp"), qkv + (-1,))
        ops += [_Op("copy", s + src, (d + dst,)) for src, dst in _FLUX_SINGLE_QK_NORM]
    ops += _wb("copy", "final_layer.linear", "proj_out")
    ops += _wb("swap", "final_layer.adaLN_modulation.1", "norm_out.linear")
    return ops


def _plan(layout: str, config: Mapping) -> list[_Op]:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; expected one of {LAYOUTS}")
    ops = _sd3_plan(config) if layout in ("sai_sd3", "diffusers_sd3") else _flux_plan(config)
    if layout.startswith("diffusers_"):  # identity over the diffusers names
        ops = [_Op("copy", d, (d,)) for op in ops for d in op.dst]
    return ops


# ------------------------------------------------------------------------------------------- helpers ---
def _strip_prefix(keys: Iterable[str]) -> dict[str, str]:
    """Transformer keys without PREFIX -> key as stored. With PREFIX present, other keys are not ours."""
    keys = list(keys)
    if any(k.startswith(PREFIX) for k in keys):
        return {k[len(PREFIX):]: k for k in keys if k.startswith(PREFIX)}
    return {k: k for k in keys}


def _name_list(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


def _check_keys(what: str, expected: Iterable[str], present: Iterable[str]) -> None:
    expected, present = set(expected), set(present)
    missing, unused = expected - present, present - expected
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {_name_list(missing)}")
    if unused:
        problems.append(f"{len(unused)} unused key(s) (not mapped by this layout/config): {_name_list(unused)}")
    if problems:
        raise CheckpointKeyError(f"{what}: " + "; ".join(problems))


def _swap_halves(x: np.ndarray, key: str) -> np.ndarray:
    if x.shape[0] % 2:
        raise CheckpointKeyError(f"{key!r}: expected an even axis 0 (shift|scale halves), got shape {x.shape}")
    h = x.shape[0] // 2
    return np.concatenate([x[h:], x[:h]], axis=0)


def _split(x: np.ndarray, sizes: tuple[int, ...], key: str) -> list[np.ndarray]:
    fixed = sum(s for s in sizes if s >= 0)
    ok = x.shape[0] > fixed if -1 in sizes else x.shape[0] == fixed
    if not ok:
        want = f"> {fixed}" if -1 in sizes else f"== {fixed}"
        raise CheckpointKeyError(
            f"{key!r}: axis 0 is {x.shape[0]}, expected {want} (fused parts {sizes}, -1 = rest); "
            f"does the config (heads x head_dim) match the file?")
    out, start = [], 0
    for s in sizes:
        stop = x.shape[0] if s < 0 else start + s
        out.append(x[start:stop])
        start = stop
    return out


# ------------------------------------------------------------------------------------------- public ---
def detect_layout(keys: Iterable[str]) -> str | None:
    """Which of LAYOUTS a checkpoint's keys are in, or None if none fits."""
    stripped = set(_strip_prefix(keys))
    if any(k.startswith("joint_blocks.") for k in stripped):
        return "sai_sd3"
    if any(k.startswith(("double_blocks.", "single_blocks.")) for k in stripped):
        return "bfl_flux"
    if "pos_embed.proj.weight" in stripped and any(
            re.match(r"transformer_blocks\.\d+\.attn\.to_q\.weight$", k) for k in stripped):
        return "diffusers_sd3"
    if "x_embedder.weight" in stripped or any(k.startswith("single_transformer_blocks.") for k in stripped):
        return "diffusers_flux"
    return None


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str, layout: str) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointKeyError(f"{layout}: cannot infer the config, key {key!r} is missing")
    return tuple(shapes[key])


def _block_ids(shapes: Mapping, pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in shapes if (m := re.match(pattern, k))})


def _count_blocks(shapes: Mapping, pattern: str, layout: str) -> int:
    ids = _block_ids(shapes, pattern)
    if ids != list(range(len(ids))):
        raise CheckpointKeyError(f"{layout}: block indices matching {pattern!r} are not 0..n-1: {ids}")
    return len(ids)


def _heads(inner: int, head_dim: int, layout: str) -> int:
    if head_dim <= 0 or inner % head_dim:
        raise ValueError(f"{layout}: inner dim {inner} is not a multiple of head_dim={head_dim}; "
                         f"pass head_dim= explicitly")
    return inner // head_dim


def _infer_sd3(layout: str, shapes: Mapping, head_dim: int | None, sample_size: int) -> dict:
    sai = layout == "sai_sd3"
    k_patch = "x_embedder.proj.weight" if sai else "pos_embed.proj.weight"
    k_pos = "pos_embed" if sai else "pos_embed.pos_embed"
    k_pooled = "y_embedder.mlp.0.weight" if sai else "time_text_embed.text_embedder.linear_1.weight"
    k_final = "final_layer.linear.weight" if sai else "proj_out.weight"
    k_ln_q = "joint_blocks.0.x_block.attn.ln_q.weight" if sai else "transformer_blocks.0.attn.norm_q.weight"
    block_re = r"joint_blocks\.(\d+)\." if sai else r"transformer_blocks\.(\d+)\."
    attn2_re = r"joint_blocks\.(\d+)\.x_block\.attn2\." if sai else r"transformer_blocks\.(\d+)\.attn2\."

    inner, in_channels, p, p2 = _shape(shapes, k_patch, layout)  # Conv2d [D, C, p, p]
    if p != p2:
        raise ValueError(f"{layout}: {k_patch!r} has a non-square patch {(p, p2)}")
    has_qk_norm = k_ln_q in shapes
    if has_qk_norm:
        hd_file = _shape(shapes, k_ln_q, layout)[0]
        if head_dim is not None and head_dim != hd_file:
            raise ValueError(f"{layout}: head_dim={head_dim} given but {k_ln_q!r} says {hd_file}")
        head_dim = hd_file
    elif head_dim is None:
        head_dim = SD3_HEAD_DIM
    caption_dim, joint_dim = _shape(shapes, "context_embedder.weight", layout)
    out_features = _shape(shapes, k_final, layout)[0]
    if out_features % (p * p):
        raise ValueError(f"{layout}: {k_final!r} out features {out_features} not a multiple of patch {p}x{p}")
    pos_embed_max_size = None
    if k_pos in shapes:
        n_pos = _shape(shapes, k_pos, layout)[-2]  # [1, N, D]
        pos_embed_max_size = math.isqrt(n_pos)
        if pos_embed_max_size ** 2 != n_pos:
            raise ValueError(f"{layout}: {k_pos!r} has {n_pos} positions, not a square grid")
    return {
        "_class_name": "SD3Transformer2DModel",
        "sample_size": sample_size,
        "patch_size": p,
        "in_channels": in_channels,
        "num_layers": _count_blocks(shapes, block_re, layout),
        "attention_head_dim": head_dim,
        "num_attention_heads": _heads(inner, head_dim, layout),
        "joint_attention_dim": joint_dim,
        "caption_projection_dim": caption_dim,
        "pooled_projection_dim": _shape(shapes, k_pooled, layout)[1],
        "out_channels": out_features // (p * p),
        "pos_embed_max_size": pos_embed_max_size,
        "dual_attention_layers": tuple(_block_ids(shapes, attn2_re)),
        "qk_norm": "rms_norm" if has_qk_norm else None,
    }


def _infer_flux(layout: str, shapes: Mapping, head_dim: int | None,
                axes_dims_rope: tuple[int, ...] | None) -> dict:
    bfl = layout == "bfl_flux"
    k_x = "img_in.weight" if bfl else "x_embedder.weight"
    k_pooled = "vector_in.in_layer.weight" if bfl else "time_text_embed.text_embedder.linear_1.weight"
    k_ctx = "txt_in.weight" if bfl else "context_embedder.weight"
    k_final = "final_layer.linear.weight" if bfl else "proj_out.weight"
    k_guid = "guidance_in.in_layer.weight" if bfl else "time_text_embed.guidance_embedder.linear_1.weight"
    double_re = r"double_blocks\.(\d+)\." if bfl else r"transformer_blocks\.(\d+)\."
    single_re = r"single_blocks\.(\d+)\." if bfl else r"single_transformer_blocks\.(\d+)\."
    k_norm = ("double_blocks.0.img_attn.norm.query_norm.scale" if bfl
              else "transformer_blocks.0.attn.norm_q.weight")
    if k_norm not in shapes:  # a model with no double block still has single-block qk norms
        k_norm = "single_blocks.0.norm.query_norm.scale" if bfl else "single_transformer_blocks.0.attn.norm_q.weight"

    inner, in_channels = _shape(shapes, k_x, layout)  # packed 2x2 latents: diffusers patch_size is 1
    hd_file = _shape(shapes, k_norm, layout)[0]
    if head_dim is not None and head_dim != hd_file:
        raise ValueError(f"{layout}: head_dim={head_dim} given but {k_norm!r} says {hd_file}")
    if axes_dims_rope is None:
        if hd_file != 128:
            raise ValueError(f"{layout}: head_dim is {hd_file}, not FLUX.1's 128; the rope axes cannot be read "
                             f"from the weights, pass axes_dims_rope= (summing to {hd_file})")
        axes_dims_rope = FLUX_AXES_DIMS_ROPE
    axes_dims_rope = tuple(int(a) for a in axes_dims_rope)
    if sum(axes_dims_rope) != hd_file:
        raise ValueError(f"{layout}: axes_dims_rope={axes_dims_rope} sums to {sum(axes_dims_rope)}, "
                         f"expected head_dim {hd_file}")
    joint_dim = _shape(shapes, k_ctx, layout)[1]
    return {
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1,
        "in_channels": in_channels,
        "out_channels": _shape(shapes, k_final, layout)[0],
        "num_layers": _count_blocks(shapes, double_re, layout),
        "num_single_layers": _count_blocks(shapes, single_re, layout),
        "attention_head_dim": hd_file,
        "num_attention_heads": _heads(inner, hd_file, layout),
        "joint_attention_dim": joint_dim,
        "pooled_projection_dim": _shape(shapes, k_pooled, layout)[1],
        "guidance_embeds": k_guid in shapes,
        "axes_dims_rope": axes_dims_rope,
    }


def infer_config(layout: str, shapes: Mapping[str, tuple[int, ...]], *, head_dim: int | None = None,
                 axes_dims_rope: tuple[int, ...] | None = None, sample_size: int = SD3_SAMPLE_SIZE) -> dict:
    """The diffusers transformer ``config.json`` dict (with ``_class_name``) implied by tensor shapes.

    `shapes` maps the checkpoint's keys (as stored, PREFIX or not) to shapes. What the weights do not record:
    - SD3 head_dim: read from the qk-norm weights when present (SD3.5), else `head_dim` or 64 (all SD3/3.5).
    - SD3 sample_size: `sample_size` (default 128, the SD3/3.5 value; only sets the default resolution).
    - FLUX axes_dims_rope: (16, 56, 56) for head_dim 128, else `axes_dims_rope` must be given.
    - FLUX patch_size: 1 (diffusers' FLUX.1 configs; the BFL ``img_in`` already takes packed 2x2 patches).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; expected one of {LAYOUTS}")
    stripped = _strip_prefix(shapes)
    shapes = {k: tuple(shapes[full]) for k, full in stripped.items()}
    if layout in ("sai_sd3", "diffusers_sd3"):
        return _infer_sd3(layout, shapes, head_dim, sample_size)
    return _infer_flux(layout, shapes, head_dim, axes_dims_rope)


def original_to_diffusers(layout: str, keys: Iterable[str], get_tensor: Callable[[str], np.ndarray],
                          config: Mapping) -> Iterator[tuple[str, np.ndarray]]:
    """Stream ``(diffusers_name, array)`` from a checkpoint in `layout`, reading each source key once.

    `keys` are the file's keys as stored; `get_tensor(key)` is called lazily with such a key, one source tensor
    at a time, so peak memory is about one copy of the model (split outputs are views of the fused tensor;
    only swapped tensors are copied). Key sets are checked before anything is read: a missing or unused
    transformer key raises CheckpointKeyError naming it (keys outside ``model.diffusion_model.`` in a prefixed
    file are skipped, see the module docstring).
    """
    ops = _plan(layout, config)
    keys = list(keys)
    prefix = PREFIX if layout in _ORIGINAL_LAYOUTS and any(k.startswith(PREFIX) for k in keys) else ""
    # Messages name keys as stored in the file (with the prefix where the file has it).
    _check_keys(f"{layout} checkpoint", (prefix + op.src for op in ops), (k for k in keys if k.startswith(prefix)))
    return _stream(ops, prefix, get_tensor)


def _stream(ops: list[_Op], prefix: str, get_tensor: Callable[[str], np.ndarray]):
    for op in ops:
        key = prefix + op.src
        x = get_tensor(key)
        if op.kind == "copy":
            yield op.dst[0], x
        elif op.kind == "swap":
            yield op.dst[0], _swap_halves(x, key)
        else:
            yield from zip(op.dst, _split(x, op.sizes, key))
        del x


def diffusers_to_original(layout: str, state_dict: Mapping[str, np.ndarray], config: Mapping) -> dict[str, np.ndarray]:
    """The exact inverse of `original_to_diffusers`: fuse q/k/v (and FLUX single mlp-in), swap halves back,
    and name keys as the original files do (``model.diffusion_model.`` prefix for SAI, none for BFL)."""
    ops = _plan(layout, config)
    _check_keys(f"{layout}: diffusers state dict", (d for op in ops for d in op.dst), state_dict)
    prefix = PREFIX if layout == "sai_sd3" else ""
    out = {}
    for op in ops:
        parts = [state_dict[d] for d in op.dst]
        if op.kind == "copy":
            x = parts[0]
        elif op.kind == "swap":
            x = _swap_halves(parts[0], op.dst[0])  # an involution
        else:
            for d, part, size in zip(op.dst, parts, op.sizes):
                if size >= 0 and part.shape[0] != size:
                    raise CheckpointKeyError(f"{d!r}: axis 0 is {part.shape[0]}, expected {size} from the config")
            x = np.concatenate(parts, axis=0)
        out[prefix + op.src] = x
    return out
