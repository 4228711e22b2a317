"""load_transformer's sources and failure modes, on the tiny models of conftest (CPU).

1. original single files (SAI SD3/SD3.5 with the ``model.diffusion_model.`` prefix, BFL FLUX; a full-pipeline
   SAI file with text-encoder / VAE keys; bfloat16 files) give the same params and outputs as the folder;
2. sharded diffusers folders (index json) and pipeline roots (``model_index.json`` + ``transformer/``);
3. the orbax cache: a second load restores bitwise, a new mtime or an incomplete entry converts again;
4. bad inputs raise CheckpointError / ConfigError (ValueError subclasses) whose message names the file or key.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import dfa2_jax
from converters import single_file as sf
from converters.safetensors_io import CheckpointError, SafetensorsFile, save_file
from converters.transformer import (WEIGHTS_INDEX_NAME, WEIGHTS_NAME, resolve_checkpoint, state_to_diffusers,
                                    write_diffusers_folder)
from dfa2_jax.models.configs import ConfigError
from tests.conftest import TINY, diffusers_forward, inputs_for, max_rel_err

LAYOUT = {"sd3": "sai_sd3", "sd35": "sai_sd3", "flux_dev": "bfl_flux", "flux_schnell": "bfl_flux"}
# What the tiny models' single files do not record: SD3 head_dim without qk-norm (inferred default 64, here 8),
# SD3 sample_size (default 128, here 32; it only sets the default resolution), FLUX rope axes for head_dim 16.
OVERRIDES = {
    "sd3": {"attention_head_dim": 8, "sample_size": 32},
    "sd35": {"sample_size": 32},
    "flux_dev": {"axes_dims_rope": [4, 4, 8]},
    "flux_schnell": {"axes_dims_rope": [4, 4, 8]},
}
PARITY_MAX_REL = 1e-5  # ours vs diffusers, as tests/test_transformer_parity.py
SAME_MAX_REL = 1e-6  # two of our loads of the same weights (in practice bitwise equal)


# ------------------------------------------------------------------------------------------- helpers ---
def flat_leaves(model) -> dict[str, np.ndarray]:
    return {"/".join(str(p) for p in path): np.asarray(var[...]) for path, var in nnx.to_flat_state(model.state)}


def assert_same_params(got, want) -> None:
    """Every leaf bitwise equal, dtype included."""
    a, b = flat_leaves(got), flat_leaves(want)
    assert sorted(a) == sorted(b)
    for k in b:
        assert a[k].dtype == b[k].dtype, (k, a[k].dtype, b[k].dtype)
        assert a[k].shape == b[k].shape, (k, a[k].shape, b[k].shape)
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def assert_same_outputs(got_model, ref_out: np.ndarray, inputs: dict) -> None:
    out = np.asarray(got_model(**inputs))
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
    if not np.array_equal(out, ref_out):
        err = max_rel_err(out, ref_out)
        assert err <= SAME_MAX_REL, f"max relative error {err:.2e} > {SAME_MAX_REL}"


def diffusers_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def diffusers_config(name: str, model) -> dict:
    return {k: v for k, v in dict(model.config).items() if not k.startswith("_")} | {"_class_name": TINY[name][0]}


def write_single_file(name: str, model, path, dtype=np.float32, junk: bool = False) -> str:
    """The tiny model in its original single-file layout (SAI for SD3/SD3.5, BFL for FLUX) at ``path``."""
    sd = {k: v.astype(dtype) for k, v in diffusers_state(model).items()}
    original = sf.diffusers_to_original(LAYOUT[name], sd, diffusers_config(name, model))
    if LAYOUT[name] == "sai_sd3":
        assert all(k.startswith(sf.PREFIX) for k in original)
    else:
        assert not any(k.startswith(sf.PREFIX) for k in original)
    if junk:  # a full-pipeline file: text encoders and VAE next to the transformer
        original["text_encoders.clip_l.foo"] = np.arange(6, dtype=dtype).reshape(2, 3)
        original["first_stage_model.bar"] = np.ones((4,), dtype)
    save_file(original, path)
    return str(path)


def comparable(config) -> dict:
    """Config as a dict, with diffusers' ``out_channels=None`` meaning in_channels made explicit."""
    d = config.to_diffusers()
    d["out_channels"] = config.out_ch
    return d


@pytest.fixture(scope="module")
def refs(tiny_folders):
    """{name: (diffusers model, folder, folder-loaded float32 Transformer, inputs, its outputs)}."""
    out = {}
    for name, (model, folder) in tiny_folders.items():
        ref = dfa2_jax.load_transformer(folder, cache_dir=False)
        assert ref.source == "diffusers"
        inputs = inputs_for(model, name)
        ref_out = np.asarray(ref(**inputs))
        err = max_rel_err(ref_out, diffusers_forward(model, inputs))
        assert err <= PARITY_MAX_REL, f"{name}: folder load vs diffusers {err:.2e}"
        out[name] = (model, folder, ref, inputs, ref_out)
    return out


def copy_folder(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def sharded_folder(ref, folder, n_shards_min: int = 3) -> str:
    tensors = state_to_diffusers(ref.state)
    total = sum(t.nbytes for t in tensors.values())
    write_diffusers_folder(str(folder), ref.config, tensors, max_shard_bytes=total // 4)
    shards = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    assert len(shards) >= n_shards_min, shards
    assert os.path.isfile(os.path.join(folder, WEIGHTS_INDEX_NAME))
    assert not os.path.exists(os.path.join(folder, WEIGHTS_NAME))
    return str(folder)


# ------------------------------------------------------------------------------- 1. single files ---
@pytest.mark.parametrize("name", sorted(TINY))
def test_single_file_equals_folder(refs, tmp_path, name):
    model, _, ref, inputs, ref_out = refs[name]
    path = write_single_file(name, model, tmp_path / f"{name}.safetensors")
    got = dfa2_jax.load_transformer(path, cache_dir=False, config_overrides=OVERRIDES[name])
    assert got.source == "single_file"
    assert resolve_checkpoint(path, OVERRIDES[name]).layout == LAYOUT[name]
    assert comparable(got.config) == comparable(ref.config)
    assert_same_params(got, ref)
    assert_same_outputs(got, ref_out, inputs)


def test_single_file_full_pipeline_keys_skipped(refs, tmp_path):
    name = "sd35"
    model, _, ref, inputs, ref_out = refs[name]
    path = write_single_file(name, model, tmp_path / "sd35_full.safetensors", junk=True)
    keys = SafetensorsFile(path).keys()
    assert "text_encoders.clip_l.foo" in keys and "first_stage_model.bar" in keys
    got = dfa2_jax.load_transformer(path, cache_dir=False, config_overrides=OVERRIDES[name])
    assert got.source == "single_file"
    assert_same_params(got, ref)
    assert_same_outputs(got, ref_out, inputs)


def test_single_file_diffusers_named(refs):
    """The folder's own diffusion_pytorch_model.safetensors, named as a file, is a diffusers-layout single file."""
    name = "sd35"
    _, folder, ref, inputs, ref_out = refs[name]
    path = os.path.join(folder, WEIGHTS_NAME)
    assert resolve_checkpoint(path).layout == "diffusers_sd3"
    got = dfa2_jax.load_transformer(path, cache_dir=False, config_overrides=OVERRIDES[name])
    assert got.source == "single_file"
    assert_same_params(got, ref)
    assert_same_outputs(got, ref_out, inputs)


@pytest.mark.parametrize("name", ["sd3", "flux_dev"])
def test_single_file_bfloat16(refs, tmp_path, name):
    model, folder, _, inputs, _ = refs[name]
    path = write_single_file(name, model, tmp_path / f"{name}_bf16.safetensors", dtype=ml_dtypes.bfloat16)
    assert {str(SafetensorsFile(path).dtype(k)) for k in SafetensorsFile(path).keys()} == {"bfloat16"}
    got = dfa2_jax.load_transformer(path, dtype="bfloat16", cache_dir=False, config_overrides=OVERRIDES[name])
    want = dfa2_jax.load_transformer(folder, dtype="bfloat16", cache_dir=False)
    assert got.source == "single_file" and want.source == "diffusers"
    assert all(v.dtype == ml_dtypes.bfloat16 for v in flat_leaves(got).values())
    assert_same_params(got, want)
    np.testing.assert_array_equal(np.asarray(got(**inputs)), np.asarray(want(**inputs)))


@pytest.mark.parametrize("name, match", [("sd3", r"head_dim"), ("flux_dev", r"axes_dims_rope")])
def test_single_file_without_overrides_says_what_to_pass(refs, tmp_path, name, match):
    path = write_single_file(name, refs[name][0], tmp_path / f"{name}.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(path) + ".*" + match + ".*config_overrides"):
        dfa2_jax.load_transformer(path, cache_dir=False)


def test_config_overrides_rejected_for_folders(refs):
    folder = refs["flux_dev"][1]
    with pytest.raises(CheckpointError, match=re.escape(folder) + ".*config_overrides.*single"):
        dfa2_jax.load_transformer(folder, cache_dir=False, config_overrides=OVERRIDES["flux_dev"])


def test_config_overrides_unknown_key(refs, tmp_path):
    path = write_single_file("flux_dev", refs["flux_dev"][0], tmp_path / "f.safetensors")
    with pytest.raises(ConfigError, match=re.escape(path) + ".*unknown FluxTransformer2DModel config key 'bogus'"):
        dfa2_jax.load_transformer(path, cache_dir=False, config_overrides={**OVERRIDES["flux_dev"], "bogus": 1})


# ------------------------------------------------------------------- 2. sharded folders, pipeline roots ---
@pytest.mark.parametrize("name", ["sd35", "flux_dev"])
def test_sharded_folder_and_pipeline_root(refs, tmp_path, name):
    _, _, ref, inputs, ref_out = refs[name]
    root = tmp_path / "pipeline"
    folder = sharded_folder(ref, root / "transformer")
    index = json.loads((root / "transformer" / WEIGHTS_INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) >= 3
    got = dfa2_jax.load_transformer(folder, cache_dir=False)
    assert got.source == "diffusers" and got.config == ref.config
    assert_same_params(got, ref)
    assert_same_outputs(got, ref_out, inputs)

    pipeline = "FluxPipeline" if name.startswith("flux") else "StableDiffusion3Pipeline"
    model_index = {"_class_name": pipeline, "transformer": ["diffusers", TINY[name][0]]}
    (root / "model_index.json").write_text(json.dumps(model_index))
    got_root = dfa2_jax.load_transformer(str(root), cache_dir=False)
    assert got_root.source == "diffusers"
    assert resolve_checkpoint(str(root)).files == resolve_checkpoint(folder).files
    assert_same_params(got_root, ref)
    assert_same_outputs(got_root, ref_out, inputs)


# ------------------------------------------------------------------------------------------ 3. orbax ---
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_orbax_cache_round_trip(refs, tmp_path, dtype):
    folder = copy_folder(refs["sd35"][1], tmp_path / "transformer")
    cache = str(tmp_path / "cache")
    first = dfa2_jax.load_transformer(folder, dtype=dtype, cache_dir=cache)
    second = dfa2_jax.load_transformer(folder, dtype=dtype, cache_dir=cache)
    assert first.source == "diffusers" and second.source == "orbax"
    assert len(os.listdir(cache)) == 1
    assert second.config == first.config and second.dtype == first.dtype
    assert {v.dtype for v in flat_leaves(second).values()} == {np.dtype(dtype)}
    assert_same_params(second, first)
    if dtype == "float32":  # the restored state runs (identical params => identical outputs; bf16 saves a compile)
        _, _, ref, inputs, ref_out = refs["sd35"]
        np.testing.assert_array_equal(np.asarray(second(**inputs)), ref_out)


def test_orbax_cache_single_file(refs, tmp_path):
    name = "flux_schnell"
    path = write_single_file(name, refs[name][0], tmp_path / "f.safetensors")
    cache = str(tmp_path / "cache")
    first = dfa2_jax.load_transformer(path, cache_dir=cache, config_overrides=OVERRIDES[name])
    second = dfa2_jax.load_transformer(path, cache_dir=cache, config_overrides=OVERRIDES[name])
    assert first.source == "single_file" and second.source == "orbax"
    assert_same_params(second, first)


def test_orbax_cache_new_mtime_converts_again(refs, tmp_path):
    folder = copy_folder(refs["sd3"][1], tmp_path / "transformer")
    cache = str(tmp_path / "cache")
    weights = os.path.join(folder, WEIGHTS_NAME)
    assert dfa2_jax.load_transformer(folder, cache_dir=cache).source == "diffusers"
    assert dfa2_jax.load_transformer(folder, cache_dir=cache).source == "orbax"

    st = os.stat(weights)  # touch: same bytes, new mtime
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    touched = dfa2_jax.load_transformer(folder, cache_dir=cache)
    assert touched.source == "diffusers"
    assert dfa2_jax.load_transformer(folder, cache_dir=cache).source == "orbax"
    assert len(os.listdir(cache)) == 2

    # rewrite with other values: the next load must see them, not the cached copy
    with SafetensorsFile(weights) as f:
        tensors = {k: np.array(f.get(k)) for k in f.keys()}
    tensors["proj_out.bias"] = tensors["proj_out.bias"] + 1.0
    before = os.stat(weights).st_mtime_ns
    save_file(tensors, weights)
    assert os.stat(weights).st_mtime_ns != before
    rewritten = dfa2_jax.load_transformer(folder, cache_dir=cache)
    assert rewritten.source == "diffusers"
    np.testing.assert_array_equal(flat_leaves(rewritten)["proj_out/bias"], flat_leaves(touched)["proj_out/bias"] + 1.0)
    again = dfa2_jax.load_transformer(folder, cache_dir=cache)
    assert again.source == "orbax"
    assert_same_params(again, rewritten)


def test_orbax_incomplete_entry_rebuilt(refs, tmp_path):
    folder = copy_folder(refs["flux_dev"][1], tmp_path / "transformer")
    cache = str(tmp_path / "cache")
    first = dfa2_jax.load_transformer(folder, cache_dir=cache)
    (entry,) = os.listdir(cache)
    meta = os.path.join(cache, entry, "meta.json")
    assert json.load(open(meta))["dtype"] == "float32"
    os.remove(meta)  # as if the process died between writing params/ and meta.json
    rebuilt = dfa2_jax.load_transformer(folder, cache_dir=cache)
    assert rebuilt.source == "diffusers"
    assert os.path.isfile(meta) and os.listdir(cache) == [entry]
    assert_same_params(rebuilt, first)
    restored = dfa2_jax.load_transformer(folder, cache_dir=cache)
    assert restored.source == "orbax"
    assert_same_params(restored, first)


# ------------------------------------------------------------------------------------- 4. bad inputs ---
@pytest.fixture
def sharded(refs, tmp_path):
    """A fresh sharded SD3 folder (3 layers, >= 3 shards) to damage."""
    return sharded_folder(refs["sd3"][2], tmp_path / "transformer")


def _index(folder) -> tuple[str, dict]:
    path = os.path.join(folder, WEIGHTS_INDEX_NAME)
    with open(path) as f:
        return path, json.load(f)


def _edit_config(folder, **changes) -> str:
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def test_error_types_are_value_errors():
    assert issubclass(CheckpointError, ValueError) and issubclass(ConfigError, ValueError)


def test_missing_shard(sharded):
    index_path, index = _index(sharded)
    shard = sorted(set(index["weight_map"].values()))[1]
    os.remove(os.path.join(sharded, shard))
    with pytest.raises(CheckpointError, match=rf"{re.escape(index_path)}: shard '{re.escape(shard)}' .* is missing"):
        dfa2_jax.load_transformer(sharded, cache_dir=False)


def test_index_names_missing_file(sharded):
    index_path, index = _index(sharded)
    key = sorted(index["weight_map"])[0]
    index["weight_map"][key] = "no-such-shard.safetensors"
    with open(index_path, "w") as f:
        json.dump(index, f)
    match = rf"{re.escape(index_path)}: shard 'no-such-shard\.safetensors' \(holding e\.g\. \['{re.escape(key)}'\]\)"
    with pytest.raises(CheckpointError, match=match):
        dfa2_jax.load_transformer(sharded, cache_dir=False)


def test_index_maps_tensor_to_wrong_shard(sharded):
    index_path, index = _index(sharded)
    shards = sorted(set(index["weight_map"].values()))
    key = next(k for k, v in sorted(index["weight_map"].items()) if v == shards[0])
    index["weight_map"][key] = shards[1]
    with open(index_path, "w") as f:
        json.dump(index, f)
    wrong, right = re.escape(shards[1]), re.escape(os.path.join(sharded, shards[0]))
    match = rf"{re.escape(index_path)}: tensor '{re.escape(key)}' is mapped to '{wrong}' but is in {right}"
    with pytest.raises(CheckpointError, match=match):
        dfa2_jax.load_transformer(sharded, cache_dir=False)


def test_index_not_json(sharded):
    index_path, _ = _index(sharded)
    with open(index_path, "w") as f:
        f.write("{not json")
    with pytest.raises(CheckpointError, match=rf"{re.escape(index_path)}: not a safetensors index"):
        dfa2_jax.load_transformer(sharded, cache_dir=False)


def test_truncated_file(refs, tmp_path):
    folder = copy_folder(refs["sd3"][1], tmp_path / "transformer")
    weights = os.path.join(folder, WEIGHTS_NAME)
    sf_ = SafetensorsFile(weights)
    data_start, size = sf_._start, os.path.getsize(weights)
    cut = data_start + (size - data_start) // 2
    with open(weights, "r+b") as f:
        f.truncate(cut)
    with pytest.raises(CheckpointError, match=rf"{re.escape(weights)}: tensor '.+' ends at byte \d+ .* truncated"):
        dfa2_jax.load_transformer(folder, cache_dir=False)
    with open(weights, "r+b") as f:  # cut inside the header
        f.truncate(data_start - 10)
    with pytest.raises(CheckpointError, match=rf"{re.escape(weights)}: header length \d+ exceeds the file size"):
        dfa2_jax.load_transformer(folder, cache_dir=False)


def test_config_has_more_layers_than_weights(sharded):
    _edit_config(sharded, num_layers=4)
    match = rf"{re.escape(sharded)}: .*missing \d+ key\(s\): .*'transformer_blocks\.3\."
    with pytest.raises(CheckpointError, match=match):
        dfa2_jax.load_transformer(sharded, cache_dir=False)


def test_config_has_fewer_layers_than_weights(sharded):
    _edit_config(sharded, num_layers=2)
    with pytest.raises(CheckpointError, match=rf"{re.escape(sharded)}: .*unused key\(s\).*'transformer_blocks\.2\."):
        dfa2_jax.load_transformer(sharded, cache_dir=False)


def test_config_wrong_tensor_shape(sharded):
    _edit_config(sharded, joint_attention_dim=48)
    match = (rf"{re.escape(sharded)}/diffusion_pytorch_model-\d+-of-\d+\.safetensors: "
             r"tensor 'context_embedder\.weight' has shape \(32, 32\), the config expects \(32, 48\)")
    with pytest.raises(CheckpointError, match=match):
        dfa2_jax.load_transformer(sharded, cache_dir=False)


def test_unknown_model_type(sharded):
    cfg = _edit_config(sharded, _class_name="UNet2DConditionModel")
    with pytest.raises(ConfigError, match=rf"{re.escape(cfg)}: unknown model type _class_name='UNet2DConditionModel'"):
        dfa2_jax.load_transformer(sharded, cache_dir=False)


def test_unknown_config_key(sharded):
    cfg = _edit_config(sharded, cross_attention_dim=768)
    match = rf"{re.escape(cfg)}: unknown SD3Transformer2DModel config key 'cross_attention_dim'"
    with pytest.raises(ConfigError, match=match):
        dfa2_jax.load_transformer(sharded, cache_dir=False)


def test_config_not_json(sharded):
    cfg = os.path.join(sharded, "config.json")
    with open(cfg, "w") as f:
        f.write("num_layers: 3")
    with pytest.raises(ConfigError, match=rf"{re.escape(cfg)}: not valid JSON"):
        dfa2_jax.load_transformer(sharded, cache_dir=False)


def test_folder_without_weights(sharded):
    for f in os.listdir(sharded):
        if f != "config.json":
            os.remove(os.path.join(sharded, f))
    with pytest.raises(CheckpointError, match=rf"{re.escape(sharded)}: no {re.escape(WEIGHTS_NAME)} .*missing weights"):
        dfa2_jax.load_transformer(sharded, cache_dir=False)


def test_not_a_model(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(empty))}: not a model: no config\.json"):
        dfa2_jax.load_transformer(empty, cache_dir=False)
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(txt))}: not a model"):
        dfa2_jax.load_transformer(txt, cache_dir=False)
    nowhere = tmp_path / "nowhere" / "flux1-dev.safetensors"
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(nowhere))}: no such file or folder"):
        dfa2_jax.load_transformer(nowhere, cache_dir=False)


def test_pipeline_root_without_transformer(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    (tmp_path / "vae").mkdir()
    match = rf"{re.escape(str(tmp_path))}: .*model_index\.json.* without a transformer/"
    with pytest.raises(CheckpointError, match=match):
        dfa2_jax.load_transformer(tmp_path, cache_dir=False)


def test_single_file_unknown_keys(tmp_path):
    path = str(tmp_path / "unet.safetensors")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": np.zeros((4, 4, 3, 3), np.float32),
               "model.diffusion_model.out.2.bias": np.zeros((4,), np.float32)}, path)
    match = rf"{re.escape(path)}: unknown model type: .*input_blocks.*neither an SD3 nor a FLUX"
    with pytest.raises(CheckpointError, match=match):
        dfa2_jax.load_transformer(path, cache_dir=False)


def test_single_file_missing_transformer_key(refs, tmp_path):
    name = "flux_dev"
    model = refs[name][0]
    path = str(tmp_path / "f.safetensors")
    original = sf.diffusers_to_original("bfl_flux", diffusers_state(model), diffusers_config(name, model))
    del original["double_blocks.1.img_mlp.2.bias"]
    save_file(original, path)
    match = rf"{re.escape(path)}: .*missing 1 key\(s\): 'double_blocks\.1\.img_mlp\.2\.bias'"
    with pytest.raises(CheckpointError, match=match):
        dfa2_jax.load_transformer(path, cache_dir=False, config_overrides=OVERRIDES[name])


@pytest.mark.parametrize("seed", [0, 1])
def test_corrupt_header(tmp_path, seed):
    path = str(tmp_path / "corrupt.safetensors")
    with open(path, "wb") as f:
        f.write(np.random.default_rng(seed).bytes(4096))
    with pytest.raises(CheckpointError, match=rf"{re.escape(path)}: (header length|unreadable safetensors header)"):
        dfa2_jax.load_transformer(path, cache_dir=False)
    # a plausible length followed by garbage: the JSON itself is unreadable
    with open(path, "wb") as f:
        f.write((100).to_bytes(8, "little") + np.random.default_rng(seed).bytes(200))
    with pytest.raises(CheckpointError, match=rf"{re.escape(path)}: unreadable safetensors header"):
        dfa2_jax.load_transformer(path, cache_dir=False)
