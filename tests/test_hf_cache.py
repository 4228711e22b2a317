"""Hugging Face repo ids resolve in the local hub cache, offline (``converters.hf_cache``).

The cache is faked in tmp_path as ``huggingface_hub`` lays it out: ``blobs/<sha256>`` holding the bytes,
``snapshots/<commit>/...`` relative symlinks into ``blobs/``, ``refs/<branch or tag>`` holding a commit hash.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

import dfa2_jax
from converters.hf_cache import hub_cache_dir, is_repo_id, resolve_model_path
from converters.safetensors_io import CheckpointError
from converters.transformer import resolve_checkpoint, state_to_diffusers, write_diffusers_folder

COMMIT_A = "a" * 40
COMMIT_B = "0123456789abcdef0123456789abcdef01234567"
TINY_FLUX = dfa2_jax.FluxConfig(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                guidance_embeds=True, axes_dims_rope=(4, 4, 8))


def _add_snapshot(repo, commit: str, src: str) -> str:
    """Move the files of folder ``src`` into ``repo``'s blobs and link them from ``snapshots/<commit>``."""
    blobs = repo / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    snap = repo / "snapshots" / commit
    for dirpath, _, files in os.walk(src):
        for f in files:
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, src)
            with open(path, "rb") as fh:
                data = fh.read()
            blob = blobs / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            link = snap / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(blob, link.parent), link)
    return str(snap)


def _set_ref(repo, name: str, commit: str) -> None:
    ref = repo / "refs" / name
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)  # the hub writes the hash without a newline


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A hub cache with repo org/tiny-flux: main -> COMMIT_A (seed 0), tag v2 -> COMMIT_B (seed 1); each snapshot
    a pipeline root holding transformer/ only."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny-flux"
    snaps = {}
    for commit, seed in ((COMMIT_A, 0), (COMMIT_B, 1)):
        tr = dfa2_jax.random_transformer(TINY_FLUX, dtype="float32", seed=seed)
        src = tmp_path / f"src_{seed}"
        write_diffusers_folder(str(src / "transformer"), TINY_FLUX, state_to_diffusers(tr.state))
        (src / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
        snaps[commit] = _add_snapshot(repo, commit, str(src))
    _set_ref(repo, "main", COMMIT_A)
    _set_ref(repo, "v2", COMMIT_B)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache, repo, snaps


def _leaves(model) -> dict[str, np.ndarray]:
    from flax import nnx

    return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(model.state)}


def _assert_same_params(a, b) -> None:
    la, lb = _leaves(a), _leaves(b)
    assert sorted(la) == sorted(lb)
    for k in lb:
        np.testing.assert_array_equal(la[k], lb[k], err_msg=k)


def test_repo_id_loads_the_snapshot(hub):
    _, _, snaps = hub
    assert resolve_model_path("org/tiny-flux") == snaps[COMMIT_A]
    assert os.path.islink(os.path.join(snaps[COMMIT_A], "transformer", "config.json"))
    by_id = dfa2_jax.load_transformer("org/tiny-flux", cache_dir=False)
    by_folder = dfa2_jax.load_transformer(snaps[COMMIT_A], cache_dir=False)
    _assert_same_params(by_id, by_folder)
    assert by_id.path == snaps[COMMIT_A]
    assert dfa2_jax.config_of("org/tiny-flux") == TINY_FLUX
    assert resolve_checkpoint("org/tiny-flux").root == snaps[COMMIT_A]


def test_revisions(hub):
    _, _, snaps = hub
    main = dfa2_jax.load_transformer("org/tiny-flux@main", cache_dir=False)
    tag = dfa2_jax.load_transformer("org/tiny-flux@v2", cache_dir=False)
    commit = dfa2_jax.load_transformer(f"org/tiny-flux@{COMMIT_B}", cache_dir=False)
    _assert_same_params(tag, commit)
    _assert_same_params(tag, dfa2_jax.load_transformer(snaps[COMMIT_B], cache_dir=False))
    la, lb = _leaves(main), _leaves(tag)
    assert any(not np.array_equal(la[k], lb[k]) for k in la)  # two revisions, two sets of weights


def test_orbax_cache_through_repo_id(hub, tmp_path):
    first = dfa2_jax.load_transformer("org/tiny-flux", cache_dir=str(tmp_path / "c"))
    again = dfa2_jax.load_transformer("org/tiny-flux", cache_dir=str(tmp_path / "c"))
    assert (first.source, again.source) == ("diffusers", "orbax")
    _assert_same_params(first, again)


def test_missing_repo_or_revision_is_one_clear_line(hub, tmp_path):
    cache, repo, _ = hub
    with pytest.raises(CheckpointError) as e:
        dfa2_jax.load_transformer("org/other-model", cache_dir=False)
    msg = str(e.value)
    assert "\n" not in msg
    assert str(cache / "models--org--other-model") in msg
    assert "huggingface-cli download org/other-model" in msg and "HF_HUB_CACHE" in msg
    with pytest.raises(CheckpointError, match=r"revision 'nope' of 'org/tiny-flux' is not in the Hugging Face cache.*"
                                              r"cached refs: \['main', 'v2'\].*--revision nope") as e:
        dfa2_jax.config_of("org/tiny-flux@nope")
    assert "\n" not in str(e.value)
    _set_ref(repo, "broken", "f" * 40)  # a ref whose snapshot is gone
    with pytest.raises(CheckpointError, match="snapshot .* is missing"):
        resolve_model_path("org/tiny-flux@broken")
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        resolve_model_path("org/tiny-flux@..")


def test_load_pipeline_resolves_repo_ids(hub):
    import dfa2_jax.pipeline as P

    _, _, snaps = hub
    # the snapshot holds transformer/ only: the error names the resolved snapshot folder
    with pytest.raises(CheckpointError, match=f"{snaps[COMMIT_A]}: missing vae/ folder"):
        P.load_pipeline("org/tiny-flux")
    with pytest.raises(CheckpointError, match="repo 'org/absent' is not in the Hugging Face cache"):
        P.load_pipeline("org/absent")


def test_cache_folder_and_what_is_a_repo_id(tmp_path, monkeypatch):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == str(tmp_path / "home" / ".cache" / "huggingface" / "hub")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub_cache_dir() == str(tmp_path / "hf" / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "direct"))
    assert hub_cache_dir() == str(tmp_path / "direct")

    assert is_repo_id("black-forest-labs/FLUX.1-dev") and is_repo_id("org/name@refs/pr/1")
    assert not is_repo_id("name") and not is_repo_id("/abs/path") and not is_repo_id("a/b/c")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "local").mkdir(parents=True)
    assert not is_repo_id("org/local")  # an existing path is a path
    assert resolve_model_path("org/local") == "org/local"
    assert resolve_model_path(tmp_path) == str(tmp_path)
