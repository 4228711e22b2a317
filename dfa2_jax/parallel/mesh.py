"""The mesh vocabulary shared by the models, the runtime and the sharded sampler: which axes split the batch and
the heads, attention run per device (:func:`per_device`, :func:`per_device_tables`), and the layout
constraints the models put on their streams and weights (:func:`token_split`, :func:`heads_replicated`,
:func:`head_split_rows`). Every helper reads the context mesh (``jax.set_mesh``) and is the identity without
one, so single-device code never notices them. The sharded sampler itself is :mod:`dfa2_jax.parallel.sharded`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("cfg", "data")  # mesh axes that split the model batch, major first (dfa2_jax.parallel.sharded)
HEAD_AXES = ("heads", "seq")  # mesh axes that split the heads inside attention
SEQ_AXIS = "seq"  # Ulysses-style: tokens split outside attention, heads inside


def mesh_sizes() -> tuple[object, dict[str, int]]:
    mesh = jax.sharding.get_abstract_mesh()
    return mesh, ({} if mesh.empty else dict(mesh.shape))


def _batch_axes(sizes: dict[str, int], b: int):
    batch = tuple(a for a in BATCH_AXES if sizes.get(a, 1) > 1)
    return None if not batch or b % math.prod(sizes[a] for a in batch) else batch


def _split_axes(sizes: dict[str, int], b: int, h: int):
    """The mesh axes :func:`per_device` splits [B, S, H, D] operands on: (batch axes, head axes), None where not
    split (no such axis > 1, or it does not divide its dim)."""
    heads = tuple(a for a in HEAD_AXES if sizes.get(a, 1) > 1)
    if not heads or h % math.prod(sizes[a] for a in heads):
        heads = None
    return _batch_axes(sizes, b), heads


def _device_rows(mesh) -> P:
    """A leading axis with one entry per device of ``mesh``, in its order (:func:`per_device_tables`' rows)."""
    return P(tuple(mesh.axis_names))


def per_device(fn: Callable[..., jax.Array], bshd: Sequence[jax.Array], per_head: Sequence[jax.Array] = (),
               per_call: Sequence[jax.Array] = ()):
    """``fn(*bshd, *per_head, *per_call)`` -> [B, S, H, D], run on each device's own batch rows and heads under
    the context mesh (``jax.set_mesh``; :func:`dfa2_jax.parallel.sharded.shard_denoise` sets it), else called as is.

    Attention is independent per (batch row, head), so it needs no collectives: ``jax.shard_map`` splits the
    [B, S, H, D] operands on B over the mesh's ``cfg``/``data`` axes and on H over ``heads`` and ``seq`` (where
    the operands come in split on tokens — the ``seq`` axis — the partitioner moves them with an all-to-all),
    and the [H] operands on the same head axes. Custom calls (the Pallas kernel, cuDNN) then see local shapes
    instead of being gathered by the partitioner. An axis that does not divide its dim is left replicated.
    ``per_call``: arrays made by :func:`per_device_tables` for operands of this shape ([devices, ...]); ``fn``
    gets its device's row."""
    mesh, sizes = mesh_sizes()
    batch, heads = _split_axes(sizes, bshd[0].shape[0], bshd[0].shape[2]) if sizes else (None, None)
    if batch is None and heads is None:
        return fn(*bshd, *per_head, *(t[0] for t in per_call))
    n = len(bshd) + len(per_head)

    def local(*args):
        return fn(*args[:n], *(t[0] for t in args[n:]))

    x, hs, dev = P(batch, None, heads, None), P(heads), _device_rows(mesh)
    return jax.shard_map(local, mesh=mesh, in_specs=(x,) * len(bshd) + (hs,) * len(per_head) + (dev,) * len(per_call),
                         out_specs=x, check_vma=False)(*bshd, *per_head, *per_call)


def per_device_tables(fn: Callable[..., jax.Array | None], shape: Sequence[int], per_head: Sequence[jax.Array] = ()):
    """What each device's :func:`per_device` call on [B, S, H, D] operands of ``shape`` needs, computed once:
    ``fn(local_shape, *per_head)`` with the device's own [B, S, H, D] shape and its heads of the ``per_head``
    arrays ([..., H], split on the last axis as per_device splits H) -> [devices, ...], one row per device in
    the mesh's order (index it on later axes and pass it as ``per_call``). Without a mesh, or one that splits
    nothing at this shape: ``fn(shape, *per_head)[None]``. None when ``fn`` returns None (decided from shapes)."""
    mesh, sizes = mesh_sizes()
    batch, heads = _split_axes(sizes, shape[0], shape[2]) if sizes else (None, None)
    local_shape = list(shape)
    if batch is not None:
        local_shape[0] //= math.prod(sizes[a] for a in batch)
    if heads is not None:
        local_shape[2] //= math.prod(sizes[a] for a in heads)
    local_shape = tuple(local_shape)
    if batch is None and heads is None:
        out = fn(local_shape, *per_head)
        return None if out is None else out[None]
    if jax.eval_shape(lambda *a: fn(local_shape, *a), *per_head) is None:
        return None
    hs = [P(*([None] * (a.ndim - 1)), heads) for a in per_head]
    return jax.shard_map(lambda *a: fn(local_shape, *a)[None], mesh=mesh, in_specs=tuple(hs),
                         out_specs=_device_rows(mesh), check_vma=False)(*per_head)


def token_split(x: jax.Array | None) -> jax.Array | None:
    """``x`` [B, S, ...] constrained to be split on its tokens (dim 1) over the context mesh's ``seq`` axis
    (and on B over the batch axes), when there is one: the Ulysses-style sequence parallel layout of the
    residual streams. Models call it on their streams and on each attention output before its projection,
    so everything outside attention runs on 1/n of the tokens per device. No ``seq`` axis: ``x`` as is."""
    if x is None:
        return x
    _, sizes = mesh_sizes()
    if sizes.get(SEQ_AXIS, 1) <= 1:
        return x
    spec = P(_batch_axes(sizes, x.shape[0]), SEQ_AXIS, *([None] * (x.ndim - 2)))
    return jax.lax.with_sharding_constraint(x, spec)


def heads_axis_size() -> int:
    """The size of the context mesh's ``heads`` axis (1 without a mesh or such an axis)."""
    return mesh_sizes()[1].get("heads", 1)


def heads_replicated(w: jax.Array) -> jax.Array:
    """A weight ``w`` held whole on every device under the context mesh's ``heads`` axis (when there is one),
    before :func:`head_split_rows` takes blocks of its rows. Without both constraints the FLUX single blocks'
    ``proj_out`` row blocks were built (a concatenate + dynamic-slice per block, 45 MiB at 2048²) at the top of
    the sampler's step and all kept alive: 2.6 GiB of temp at ``heads=2`` instead of 0.9. (The partitioner still
    splits a sliced weight's rows in equal blocks first and exchanges the misaligned rows — two 9 MiB
    collective-permutes per single block and step at 2048², about 1 ms of NVLink.)"""
    if heads_axis_size() <= 1:
        return w
    return jax.lax.with_sharding_constraint(w, P(*([None] * w.ndim)))


def head_split_rows(w: jax.Array) -> jax.Array:
    """A block of rows of a row-split (Megatron) projection, ``w`` [K, N], constrained to be split on its rows
    over the context mesh's ``heads`` axis when there is one and it divides K: the layout of an input split on
    its features over ``heads``. Otherwise ``w`` as is."""
    n = heads_axis_size()
    if n <= 1 or w.shape[0] % n:
        return w
    return jax.lax.with_sharding_constraint(w, P("heads", *([None] * (w.ndim - 1))))


__all__ = ["BATCH_AXES", "HEAD_AXES", "SEQ_AXIS", "mesh_sizes", "per_device", "per_device_tables", "token_split",
           "heads_axis_size", "heads_replicated", "head_split_rows"]
