"""converters.single_file against diffusers 0.42.1's own single-file converters, on tiny random models.

For each tiny model: diffusers state dict (random distinct values, so any misplaced split or swap shows)
-> diffusers_to_original -> (a) diffusers' converter and (b) ours must give the state dict back bitwise;
(c) infer_config recovers the config; (d) missing / unused keys are named; (e) detect_layout.
"""

from __future__ import annotations

import inspect

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers.loaders import single_file_utils as sfu  # noqa: E402

from converters import single_file as sf  # noqa: E402

SD3 = dict(sample_size=32, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=4,
           caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
           pos_embed_max_size=96)
FLUX = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])

# name -> (original layout, diffusers layout, diffusers class, config kwargs, infer_config overrides)
CASES = {
    "sd3_p2": ("sai_sd3", "diffusers_sd3", "SD3Transformer2DModel", SD3, dict(head_dim=8)),
    "sd3_p1": ("sai_sd3", "diffusers_sd3", "SD3Transformer2DModel", dict(SD3, patch_size=1), dict(head_dim=8)),
    "sd35": ("sai_sd3", "diffusers_sd3", "SD3Transformer2DModel",
             dict(SD3, dual_attention_layers=(0,), qk_norm="rms_norm"), {}),  # head_dim read from ln_q
    "flux_dev": ("bfl_flux", "diffusers_flux", "FluxTransformer2DModel", dict(FLUX, guidance_embeds=True),
                 dict(axes_dims_rope=(4, 4, 8))),
    "flux_schnell": ("bfl_flux", "diffusers_flux", "FluxTransformer2DModel", dict(FLUX, guidance_embeds=False),
                     dict(axes_dims_rope=(4, 4, 8))),
}

_cache: dict = {}


def _model_case(name):
    """(layout, diffusers_layout, config, float32 numpy state dict with distinct random values)."""
    if name not in _cache:
        layout, dlayout, cls, kwargs, _ = CASES[name]
        torch.manual_seed(0)
        model = getattr(diffusers, cls)(**kwargs).eval()
        rng = np.random.default_rng(0)
        sd = {k: rng.standard_normal(tuple(v.shape)).astype(np.float32) for k, v in model.state_dict().items()}
        config = {**dict(model.config), "_class_name": cls}
        _cache[name] = (layout, dlayout, config, sd)
    return _cache[name]


def _to_torch(x: np.ndarray):
    if x.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(x.copy())


def _to_numpy(t) -> np.ndarray:
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _assert_bitwise(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for k in want:
        a, b = np.asarray(got[k]), want[k]
        assert a.dtype == b.dtype and a.shape == b.shape, (k, a.dtype, a.shape, b.dtype, b.shape)
        assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes(), k


def _diffusers_converter(layout, config):
    if layout == "sai_sd3":
        return sfu.convert_sd3_transformer_checkpoint_to_diffusers
    # diffusers hard-codes FLUX.1's inner_dim 3072 for splitting single-block linear1; rebuild the function
    # with the tiny model's inner dim (the only change) so it can be the oracle here.
    src = inspect.getsource(sfu.convert_flux_transformer_checkpoint_to_diffusers)
    assert src.count("inner_dim = 3072") == 1
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    namespace = dict(vars(sfu))
    exec(src.replace("inner_dim = 3072", f"inner_dim = {inner}"), namespace)
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"]


def _ours(layout, original, config):
    return dict(sf.original_to_diffusers(layout, original, original.__getitem__, config))


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_matches_diffusers(name, dtype):
    layout, _, config, sd = _model_case(name)
    sd = {k: v.astype(dtype) for k, v in sd.items()}
    original = sf.diffusers_to_original(layout, sd, config)
    if layout == "sai_sd3":
        assert all(k.startswith(sf.PREFIX) for k in original)
    else:
        assert not any(k.startswith(sf.PREFIX) for k in original)
    # (a) diffusers' own converter on the original-layout dict
    theirs = _diffusers_converter(layout, config)({k: _to_torch(v) for k, v in original.items()})
    _assert_bitwise({k: _to_numpy(v) for k, v in theirs.items()}, sd)
    # (b) ours
    _assert_bitwise(_ours(layout, original, config), sd)


@pytest.mark.parametrize("name", list(CASES))
def test_diffusers_layout_is_identity(name):
    _, dlayout, config, sd = _model_case(name)
    assert sf.detect_layout(sd) == dlayout
    _assert_bitwise(_ours(dlayout, sd, config), sd)
    _assert_bitwise(sf.diffusers_to_original(dlayout, sd, config), sd)


def _relevant(config: dict) -> dict:
    out = {k: v for k, v in config.items() if not k.startswith("_") and k != "sample_size"}
    for k in ("dual_attention_layers", "axes_dims_rope"):
        if k in out:
            out[k] = tuple(out[k])
    if out.get("out_channels") is None and "in_channels" in out:
        out["out_channels"] = out["in_channels"]  # diffusers: out_channels or in_channels
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_infer_config(name):
    layout, dlayout, config, sd = _model_case(name)
    overrides = CASES[name][4]
    want = _relevant(config)
    original = sf.diffusers_to_original(layout, sd, config)
    for lay, keys in ((layout, original), (dlayout, sd)):
        got = sf.infer_config(lay, {k: v.shape for k, v in keys.items()}, **overrides)
        assert got["_class_name"] == config["_class_name"]
        assert _relevant(got) == want, lay
        assert set(got) - {"_class_name"} <= set(config), "keys diffusers' config does not have"
        if lay == "sai_sd3":
            assert got["sample_size"] == 128


def test_infer_config_defaults_and_errors():
    layout, _, config, sd = _model_case("sd3_p2")
    shapes = {k: v.shape for k, v in sf.diffusers_to_original(layout, sd, config).items()}
    with pytest.raises(ValueError, match="head_dim"):  # default 64 does not divide the tiny inner dim 32
        sf.infer_config(layout, shapes)
    assert sf.infer_config(layout, shapes, head_dim=8, sample_size=32)["sample_size"] == 32
    del shapes[sf.PREFIX + "context_embedder.weight"]
    with pytest.raises(KeyError, match="context_embedder.weight"):
        sf.infer_config(layout, shapes, head_dim=8)

    layout, _, config, sd = _model_case("flux_dev")
    shapes = {k: v.shape for k, v in sf.diffusers_to_original(layout, sd, config).items()}
    with pytest.raises(ValueError, match="axes_dims_rope"):  # head_dim 16: the rope split is not recorded
        sf.infer_config(layout, shapes)
    with pytest.raises(ValueError, match="axes_dims_rope"):
        sf.infer_config(layout, shapes, axes_dims_rope=(4, 4, 4))
    # head_dim 128 gets FLUX.1's axes by default (fake shapes: only what infer_config reads)
    big = {"img_in.weight": (3072, 64), "txt_in.weight": (3072, 4096), "vector_in.in_layer.weight": (3072, 768),
           "final_layer.linear.weight": (64, 3072), "double_blocks.0.img_attn.norm.query_norm.scale": (128,),
           "single_blocks.0.linear1.weight": (21504, 3072), "guidance_in.in_layer.weight": (3072, 256)}
    got = sf.infer_config("bfl_flux", {sf.PREFIX + k: v for k, v in big.items()})
    assert got["axes_dims_rope"] == (16, 56, 56) and got["num_attention_heads"] == 24
    assert got["num_layers"] == 1 and got["num_single_layers"] == 1 and got["guidance_embeds"] is True


# keys that are used in every case: removing one must be reported
_MISSING = {"sai_sd3": "joint_blocks.3.context_block.attn.qkv.bias", "bfl_flux": "single_blocks.0.linear1.weight"}


@pytest.mark.parametrize("name", list(CASES))
def test_missing_and_unused_keys_are_named(name):
    layout, dlayout, config, sd = _model_case(name)
    original = sf.diffusers_to_original(layout, sd, config)
    prefix = sf.PREFIX if layout == "sai_sd3" else ""

    extra = dict(original)
    extra[prefix + "final_layer.bogus.weight"] = np.zeros(3, np.float32)
    with pytest.raises(KeyError, match=r"final_layer\.bogus\.weight"):
        list(sf.original_to_diffusers(layout, extra, extra.__getitem__, config))

    short = dict(original)
    del short[prefix + _MISSING[layout]]
    with pytest.raises(ValueError, match=_MISSING[layout].replace(".", r"\.")):
        list(sf.original_to_diffusers(layout, short, short.__getitem__, config))

    # nothing is read before the key check fails
    def no_read(key):
        raise AssertionError(f"read {key} before validating keys")

    with pytest.raises(sf.CheckpointKeyError):
        sf.original_to_diffusers(layout, short, no_read, config)

    # the inverse checks too
    sd_extra = dict(sd, **{"bogus.weight": np.zeros(1, np.float32)})
    with pytest.raises(KeyError, match=r"bogus\.weight"):
        sf.diffusers_to_original(layout, sd_extra, config)
    sd_short = {k: v for k, v in sd.items() if k != "proj_out.bias"}
    with pytest.raises(KeyError, match=r"proj_out\.bias"):
        sf.diffusers_to_original(layout, sd_short, config)
    with pytest.raises(KeyError, match=r"proj_out\.bias"):
        list(sf.original_to_diffusers(dlayout, sd_short, sd_short.__getitem__, config))


def test_config_mismatch_names_the_fused_key():
    layout, _, config, sd = _model_case("flux_dev")
    original = sf.diffusers_to_original(layout, sd, config)
    wrong = dict(config, num_attention_heads=1)  # inner 16 instead of 32
    with pytest.raises(ValueError, match=r"double_blocks\.0\.img_attn\.qkv\.weight"):
        list(sf.original_to_diffusers(layout, original, original.__getitem__, wrong))


def test_full_pipeline_files_skip_non_transformer_keys():
    """SAI all-in-one files and ComfyUI FLUX files: only model.diffusion_model.* is the transformer."""
    for name, others in (("sd35", ("text_encoders.clip_l.transformer.text_model.final_layer_norm.weight",
                                   "first_stage_model.decoder.conv_in.weight")),
                         ("flux_schnell", ("vae.decoder.conv_in.weight", "text_encoders.t5xxl.shared.weight"))):
        layout, _, config, sd = _model_case(name)
        original = {sf.PREFIX + k.removeprefix(sf.PREFIX): v
                    for k, v in sf.diffusers_to_original(layout, sd, config).items()}
        full = dict(original, **{k: np.zeros(2, np.float32) for k in others})
        assert sf.detect_layout(full) == layout
        read = []

        def get(key, full=full):
            read.append(key)
            return full[key]

        _assert_bitwise(dict(sf.original_to_diffusers(layout, full, get, config)), sd)
        assert sorted(read) == sorted(original) and len(read) == len(set(read)), "each transformer key read once"


def test_detect_layout():
    for name in CASES:
        layout, dlayout, config, sd = _model_case(name)
        original = sf.diffusers_to_original(layout, sd, config)
        bare = [k.removeprefix(sf.PREFIX) for k in original]
        assert sf.detect_layout(original) == layout
        assert sf.detect_layout(bare) == layout
        assert sf.detect_layout([sf.PREFIX + k for k in bare]) == layout
        assert sf.detect_layout(sd) == dlayout
    assert sf.detect_layout(["double_blocks.0.img_attn.qkv.weight"]) == "bfl_flux"
    assert sf.detect_layout(["model.diffusion_model.single_blocks.0.linear1.weight"]) == "bfl_flux"
    assert sf.detect_layout(["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"]) == "sai_sd3"
    assert sf.detect_layout(["transformer_blocks.0.attn.to_q.weight", "pos_embed.proj.weight"]) == "diffusers_sd3"
    assert sf.detect_layout(["x_embedder.weight"]) == "diffusers_flux"
    assert sf.detect_layout(["encoder.block.0.layer.0.SelfAttention.q.weight"]) is None
    assert sf.detect_layout([]) is None


def test_streaming_reads_each_key_once_and_keeps_dtype():
    layout, _, config, sd = _model_case("sd35")
    original = sf.diffusers_to_original(layout, {k: v.astype(np.float16) for k, v in sd.items()}, config)
    read = []

    def get(key):
        read.append(key)
        return original[key]

    it = sf.original_to_diffusers(layout, original, get, config)
    assert read == []  # lazy
    first_key, first = next(it)
    assert len(read) == 1 and first.dtype == np.float16
    rest = dict(it)
    assert len(rest) + 1 == len(sd) and sorted(read) == sorted(original)
