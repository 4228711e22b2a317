"""Hugging Face repo ids (``org/name``, ``org/name@revision``) -> a snapshot folder of the local hub cache.

Nothing is downloaded: a model fetched earlier (``huggingface-cli download org/name`` or any
``from_pretrained``) sits in the hub cache as ::

    <cache>/models--org--name/
        blobs/<hash>                                   the files' bytes
        refs/main                                      a commit hash (one per branch or tag: refs/<revision>)
        snapshots/<commit>/transformer/config.json     symlinks into blobs/

The cache folder is, as in ``huggingface_hub``: ``$HF_HUB_CACHE``, else ``$HUGGINGFACE_HUB_CACHE`` (its legacy
name), else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``. These
environment variables only name places; they are read at each call.

A string is a repo id only when it is not an existing path and matches :data:`REPO_ID`; ``@revision`` is a
branch or tag (looked up in ``refs/``) or a commit hash (a folder under ``snapshots/``).
"""

from __future__ import annotations

import os
import re

from converters.safetensors_io import CheckpointError

# org/name[@revision]; the revision may hold slashes (refs/pr/1)
REPO_ID = re.compile(r"^([\w.-]+)/([\w.-]+)(?:@([\w./-]+))?$")


def hub_cache_dir() -> str:
    """The hub cache folder ``huggingface_hub`` uses (see the module docstring)."""
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if hub:
        return os.path.expanduser(os.path.expandvars(hub))
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.path.expandvars(os.environ["HF_HOME"])), "hub")
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "huggingface", "hub")


def is_repo_id(name_or_path: str | os.PathLike) -> bool:
    """True for ``org/name[@revision]`` strings that are not an existing path."""
    return (isinstance(name_or_path, str) and not os.path.exists(name_or_path)
            and REPO_ID.match(name_or_path) is not None)


def _within(folder: str, name: str) -> bool:
    """``name`` stays inside ``folder`` (a revision such as ``../x`` must not escape the repo folder)."""
    real = os.path.realpath(folder)
    return os.path.commonpath([real, os.path.realpath(os.path.join(folder, name))]) == real


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """A path is returned as it is (``os.fspath``); a repo id (:func:`is_repo_id`) becomes its snapshot folder
    in the local hub cache. Raises :class:`CheckpointError` (a ``ValueError``), one line naming the folder it
    looked in, when the repo or revision is not cached."""
    if not is_repo_id(name_or_path):
        return os.fspath(name_or_path)
    org, name, revision = REPO_ID.match(name_or_path).groups()
    repo_id = f"{org}/{name}"
    cache = hub_cache_dir()
    repo = os.path.join(cache, f"models--{org}--{name}")
    fetch = (f"fetch it on a machine with network with `huggingface-cli download {repo_id}"
             f"{'' if revision is None else f' --revision {revision}'}` and copy the cache, or set HF_HUB_CACHE to "
             "the cache that holds it")
    if not os.path.isdir(repo):
        raise CheckpointError(f"{name_or_path}: not a local path, and repo {repo_id!r} is not in the Hugging Face "
                              f"cache (looked for {repo}; nothing is downloaded): {fetch}")
    snapshots = os.path.join(repo, "snapshots")
    rev = revision or "main"
    ref = os.path.join(repo, "refs", rev)
    if _within(os.path.join(repo, "refs"), rev) and os.path.isfile(ref):
        with open(ref, encoding="utf-8") as f:
            commit = f.read().strip()
        where = f"{ref} -> {commit!r}"
    elif (revision is not None and "/" not in revision and revision not in (".", "..")
          and os.path.isdir(os.path.join(snapshots, revision))):
        commit, where = revision, "a commit hash"
    else:
        have = sorted(os.listdir(os.path.join(repo, "refs"))) if os.path.isdir(os.path.join(repo, "refs")) else []
        raise CheckpointError(f"{name_or_path}: revision {rev!r} of {repo_id!r} is not in the Hugging Face cache "
                              f"(no {ref} and no {os.path.join(snapshots, rev)}; cached refs: {have or 'none'}): "
                              f"{fetch}")
    folder = os.path.join(snapshots, commit)
    if not commit or "/" in commit or commit in (".", "..") or not os.path.isdir(folder):
        raise CheckpointError(f"{name_or_path}: {where}, but the snapshot {folder} is missing (an incomplete "
                              f"download): {fetch}")
    return folder


__all__ = ["REPO_ID", "hub_cache_dir", "is_repo_id", "resolve_model_path"]
