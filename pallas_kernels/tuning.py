"""Autotuning of the Triton kernel's tile config, with its on-disk cache.

:func:`autotune` times every candidate :class:`~pallas_kernels.triton.TritonConfig` on given inputs and stores the
fastest under :func:`tune_key` in :func:`tune_cache_path`; :func:`pallas_kernels.arrow_attention` then takes
:func:`tuned_config` for a Triton call without a config (the user's cache first, then the results shipped with the
package, :data:`SHIPPED_TUNING`), else :func:`~pallas_kernels.triton.heuristic_config`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .common import validate
from .triton import TritonConfig, arrow_attention_triton

TUNE_CANDIDATES = tuple(TritonConfig(bq, bk, nw, ns) for bq, bk, nw, ns in (
    (128, 64, 8, 3), (128, 64, 4, 3), (128, 64, 8, 2), (128, 128, 8, 2), (128, 128, 8, 3), (128, 32, 4, 3),
    (64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 8, 4), (64, 32, 4, 3), (128, 32, 8, 4)))


def tune_cache_path() -> Path:
    """``$DFA2_ARROW_TUNE_CACHE``, else ``$XDG_CACHE_HOME/dfa2_jax/arrow_tune.json`` (``~/.cache`` default)."""
    env = os.environ.get("DFA2_ARROW_TUNE_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dfa2_jax" / "arrow_tune.json"


def tune_key(shape, dtype, text_len: int, text_first: bool, device_kind: str | None = None) -> str:
    """The cache key: device kind, jax version, [B, S, H, D], dtype and token layout."""
    device_kind = device_kind or jax.devices()[0].device_kind
    b, s, h, d = shape
    return (f"{device_kind}|jax{jax.__version__}|B{b}S{s}H{h}D{d}|{jnp.dtype(dtype).name}|"
            f"text{text_len}{'first' if text_first else 'last'}")


@functools.lru_cache(maxsize=8)
def _read_tune_cache(path: str, mtime_ns: int) -> dict:
    del mtime_ns  # part of the memo key: a rewritten file is read again
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}  # unreadable / half-written by an older version: tuning results are only a speed hint
    return data if isinstance(data, dict) else {}


def _tuned_entries(path: Path) -> dict:
    try:
        return _read_tune_cache(str(path), path.stat().st_mtime_ns)
    except OSError:
        return {}


def _write_atomic(path: Path, text: str) -> None:
    """A temp file in the target's folder, flushed and fsynced, then ``os.replace``: a reader sees the old cache
    or the new one, never a partial write; on any error the temp file is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; the cache is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


SHIPPED_TUNING = Path(__file__).with_name("arrow_tuned.json")  # autotune results measured here, any jax version


def tuned_config(shape, dtype, text_len: int, text_first: bool) -> TritonConfig | None:
    """The autotuned config for this shape on this device: the user's on-disk cache first, then the results
    shipped with the package (:data:`SHIPPED_TUNING`, keyed with ``jax*``); None if neither has it."""
    key = tune_key(shape, dtype, text_len, text_first)
    entry = _tuned_entries(tune_cache_path()).get(key)
    if not isinstance(entry, dict):
        parts = key.split("|")
        entry = _tuned_entries(SHIPPED_TUNING).get("|".join([parts[0], "jax*", *parts[2:]]))
    if not isinstance(entry, dict):
        return None
    try:
        return TritonConfig(**{f.name: int(entry[f.name]) for f in dataclasses.fields(TritonConfig)})
    except (KeyError, TypeError, ValueError):
        return None


def autotune(q, k, v, half_window, *, text_len: int, text_first: bool, cache=None, candidates=None,
             iters: int = 10, force: bool = False, interpret: bool = False, log=None) -> TritonConfig:
    """Time every candidate config of the Triton kernel on these inputs (median of ``iters`` calls after one
    compile call) and store the fastest in the on-disk cache (:func:`tune_cache_path`), which
    :func:`pallas_kernels.arrow_attention` then uses for this shape whenever a Triton call gets no explicit config.
    Candidates that fail to compile are skipped (and reported through ``log``). Returns the cached choice at once
    unless ``force``. ``interpret`` is for tests."""
    validate(q, k, v, half_window, text_len, cache, kernel=True)
    key = tune_key(q.shape, q.dtype, text_len, text_first)
    if not force and (hit := tuned_config(q.shape, q.dtype, text_len, text_first)) is not None:
        return hit
    log = log or (lambda msg: None)
    timings = {}
    for cfg in candidates or TUNE_CANDIDATES:
        if cfg.block_q > max(16, pl.next_power_of_2(q.shape[1])):
            continue
        try:
            run = lambda: arrow_attention_triton(q, k, v, half_window, text_len=text_len, text_first=text_first,
                                                 cache=cache, config=cfg, interpret=interpret)
            jax.block_until_ready(run())
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                jax.block_until_ready(run())
                times.append(time.perf_counter() - t0)
            timings[cfg] = statistics.median(times)
            log(f"autotune {cfg}: {timings[cfg] * 1e3:.3f} ms")
        except Exception as e:  # noqa: BLE001 - a config the compiler rejects is just not a candidate
            log(f"autotune {cfg}: failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    if not timings:
        raise RuntimeError(f"arrow_attention autotune: no candidate config ran for {key}")
    best = min(timings, key=timings.get)
    path = tune_cache_path()
    entries = dict(_tuned_entries(path))
    entries[key] = {**dataclasses.asdict(best), "ms": round(timings[best] * 1e3, 4)}
    _write_atomic(path, json.dumps(entries, indent=1, sort_keys=True) + "\n")
    return best
