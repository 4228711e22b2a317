"""The sampler on a ``jax.sharding`` mesh: data, CFG and head parallel, params replicated or FSDP-style.

Arrays are placed with :class:`~jax.sharding.NamedSharding` (``jax.device_put``) and the existing jitted
sampler (:func:`dfa2_jax.sample.run_sampler`) is called on them under ``jax.set_mesh(mesh)``; XLA
propagates the shardings and inserts the collectives (no hand-written ones). Attention itself — the Pallas
kernel and cuDNN are custom calls the partitioner cannot split — runs in a ``jax.shard_map`` over the batch and
head axes (:func:`dfa2_jax.models.attention.per_device`), so each device attends over its own rows and heads.

Mesh axes (any subset, ``parse_mesh("data=2,heads=4")``):

- ``data``: latents, conditioning and the plan's carried caches split on the batch;
- ``cfg`` (classifier-free guidance only: SD3's CFG or FLUX's true CFG; size 1 or 2): the model batch [uncond; cond] split in its
  two halves (a sharding constraint on the doubled batch inside ``velocity``); the model batch axis is
  sharded over ``("cfg", "data")``;
- ``seq``: Ulysses-style sequence parallel: params replicated, the residual streams split on their tokens
  (:func:`dfa2_jax.models.attention.token_split` at every block boundary and on each attention output before
  its projection), so every projection, MLP, norm and modulation runs on 1/n of the tokens; attention itself
  splits the heads over the axis (the partitioner moves q/k/v and the output with all-to-alls). The plan's
  per-head arrays and the head caches are split on H over it, like ``heads``. ``heads`` and ``seq`` exclude
  each other;
- ``heads``: Megatron-style head parallel attention — to_q/to_k/to_v/add_{q,k,v}_proj kernels and biases
  column-split on their H·D output dim (each device holds whole heads), to_out / to_add_out kernels
  row-split; the MLPs the same way (``ff`` / ``ff_context``: net[0].proj column-split on the hidden dim,
  net[2] row-split; FLUX single blocks' ``proj_mlp`` column-split), so every big matmul and the attention
  divide by the axis size and each block needs one all-reduce per stream. The plan's per-head arrays and the
  carried head caches [B, S, H, D] are split on H. FLUX single blocks' ``proj_out`` (packed rows
  [attention H·D; MLP hidden]) stays replicated; it is applied as one dot per part
  (:meth:`~dfa2_jax.models.layers.Linear.concat_in`), so both parts stay split and XLA sums the partials.

``fsdp=True`` additionally shards each parameter's largest axis that divides by the ``data`` size (and is not
already head-split) over ``data``; GSPMD gathers it where it is used.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dfa2_jax.parallel.mesh import BATCH_AXES, HEAD_AXES
from dfa2_jax.sample import PlanArrays, run_sampler, plan_inputs

AXES = ("data", "cfg", "heads", "seq")  # the mesh's axis order (batch-like axes major)

_COLUMN = {"to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"}  # out dim = H·D
_ROW = {"to_out", "to_add_out"}  # in dim = H·D
_FF = {"ff", "ff_context"}  # FeedForward: net[0].proj column-split on the hidden dim, net[2] row-split


def parse_mesh(spec: str) -> dict[str, int]:
    """``"data=2,heads=4"`` -> ``{"data": 2, "heads": 4}`` (axes: data, cfg, heads)."""
    out: dict[str, int] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, eq, size = part.partition("=")
        name = name.strip()
        if not eq:
            raise ValueError(f"mesh {spec!r}: expected axis=size entries such as data=2,heads=4; got {part!r}")
        if name not in AXES:
            raise ValueError(f"mesh {spec!r}: unknown axis {name!r} (expected one of {', '.join(AXES)})")
        if name in out:
            raise ValueError(f"mesh {spec!r}: axis {name!r} given twice")
        try:
            n = int(size)
        except ValueError:
            raise ValueError(f"mesh {spec!r}: size of {name!r} must be an integer; got {size!r}") from None
        if n < 1:
            raise ValueError(f"mesh {spec!r}: size of {name!r} must be >= 1; got {n}")
        out[name] = n
    if not out:
        raise ValueError(f"mesh {spec!r}: no axes given (e.g. data=2,heads=4)")
    return out


def make_mesh(spec: str | dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A :class:`Mesh` with the given axes (in the order data, cfg, heads) over ``devices`` (default: all).

    The product of the sizes must equal the number of devices given; with ``devices=None`` it may be at most
    the number available, and the first ones are used."""
    sizes = parse_mesh(spec) if isinstance(spec, str) else dict(spec)
    for name, n in sizes.items():
        if name not in AXES:
            raise ValueError(f"unknown mesh axis {name!r} (expected one of {', '.join(AXES)})")
        if int(n) < 1:
            raise ValueError(f"mesh axis {name!r}: size must be >= 1; got {n}")
    names = tuple(a for a in AXES if a in sizes)
    shape = tuple(int(sizes[a]) for a in names)
    total = math.prod(shape)
    if devices is None:
        available = jax.devices()
        if total > len(available):
            raise ValueError(f"mesh {sizes} needs {total} devices; {len(available)} available "
                             f"({available[0].platform})")
        devices = available[:total]
    elif total != len(devices):
        raise ValueError(f"mesh {sizes} needs {total} devices; {len(devices)} given")
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), names)


def _size(mesh: Mesh, axis: str) -> int:
    return int(mesh.shape[axis]) if axis in mesh.axis_names else 1


def validate(sizes: dict[str, int], *, batch: int, heads: int, family: str, do_cfg: bool) -> None:
    """Clear errors for a mesh that does not fit the work (before any device is touched)."""
    data, cfg, h, seq = sizes.get("data", 1), sizes.get("cfg", 1), sizes.get("heads", 1), sizes.get("seq", 1)
    if batch % data:
        raise ValueError(f"batch {batch} is not divisible by the data axis size {data}")
    if heads % h:
        raise ValueError(f"{heads} attention heads are not divisible by the heads axis size {h}")
    if h > 1 and seq > 1:
        raise ValueError(f"use either the heads axis (Megatron, size {h}) or the seq axis (Ulysses, size {seq}), "
                         "not both: their layouts outside attention differ")
    if heads % seq:
        raise ValueError(f"{heads} attention heads are not divisible by the seq axis size {seq} (inside attention "
                         "the seq axis splits the heads)")
    if cfg > 1:
        if not do_cfg:
            raise ValueError(f"the cfg axis (size {cfg}) needs classifier-free guidance (SD3 with guidance_scale > 1, "
                             f"FLUX with a negative prompt and true_cfg_scale > 1; family {family!r})")
        if cfg != 2:
            raise ValueError(f"the cfg axis splits [uncond; cond]: its size must be 1 or 2; got {cfg}")


def _head_axes(mesh: Mesh):
    """The mesh axes the heads are split over inside attention (plan arrays and head caches with them)."""
    axes = tuple(a for a in HEAD_AXES if _size(mesh, a) > 1)
    return axes if axes else None


def _batch_axes(mesh: Mesh, model_batch: bool):
    """The mesh axes the batch dim is sharded over (model batch: the doubled CFG batch)."""
    axes = tuple(a for a in (BATCH_AXES if model_batch else ("data",)) if _size(mesh, a) > 1)
    return axes if axes else None


def _key_name(k) -> Any:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return str(k)


def param_spec(path: tuple, shape: tuple[int, ...], mesh: Mesh, *, fsdp: bool) -> P:
    """The PartitionSpec of one parameter (``path``: its names, e.g. ('transformer_blocks', 0, 'attn',
    'to_q', 'kernel'))."""
    names = [n for n in path if n != "value"]
    leaf = names[-1] if names else None
    in_attn = any(isinstance(n, str) and n.startswith("attn") for n in names)
    module = next((n for n in reversed(names[:-1]) if isinstance(n, str)), None)  # to_out[0] -> to_out
    spec: list[Any] = [None] * len(shape)
    heads = _size(mesh, "heads")
    in_ff = any(n in _FF for n in names)
    column = (in_attn and module in _COLUMN) or module == "proj_mlp" or (in_ff and module == "proj")
    row = (in_attn and module in _ROW) or (in_ff and module == "net")  # ff.net[2]: [hidden, D]
    if heads > 1 and leaf in ("kernel", "bias") and column and shape[-1] % heads == 0:
        spec[-1] = "heads"
    elif heads > 1 and leaf == "kernel" and row and shape[0] % heads == 0:
        spec[0] = "heads"
    data = _size(mesh, "data")
    if fsdp and data > 1:
        free = [i for i in range(len(shape)) if spec[i] is None and shape[i] % data == 0]
        if free:
            spec[max(free, key=lambda i: shape[i])] = "data"
    return P(*spec)


def place_params(state, mesh: Mesh, *, fsdp: bool = False):
    """The transformer state on the mesh: replicated, head-split projections, FSDP on ``data`` if asked."""
    def put(path, x):
        names = tuple(_key_name(k) for k in path)
        return jax.device_put(x, NamedSharding(mesh, param_spec(names, x.shape, mesh, fsdp=fsdp)))

    return jax.tree_util.tree_map_with_path(put, state)


def _batch_put(x, mesh: Mesh, axes, batch: int):
    """Arrays whose leading dim is ``batch`` are split on it over ``axes``; anything else is replicated."""
    x = jnp.asarray(x)
    if axes is not None and x.ndim >= 1 and x.shape[0] == batch:
        return jax.device_put(x, NamedSharding(mesh, P(axes)))
    return jax.device_put(x, NamedSharding(mesh, P()))


def place_plan(plan_in: dict, mesh: Mesh, *, model_axes):
    """Plan arrays split on their head axis; carried caches: batch over ``model_axes``, heads over heads."""
    heads = _head_axes(mesh)
    return {
        "codes": jax.device_put(plan_in["codes"], NamedSharding(mesh, P(None, None, heads))),
        "half_windows": jax.device_put(plan_in["half_windows"], NamedSharding(mesh, P(None, None, heads))),
        "resid_windows": jax.device_put(plan_in["resid_windows"], NamedSharding(mesh, P(None, heads))),
        "state": place_carry(plan_in["state"], mesh, model_axes),
    }


def _num_heads(graphdef, state) -> int:
    from flax import nnx

    model = nnx.merge(graphdef, state)
    return int(model.config.num_attention_heads)


def resolve_mesh(mesh, *, batch: int, heads: int, family: str, do_cfg: bool, devices=None) -> Mesh | None:
    """A Mesh from ``mesh``: a Mesh, a spec ("data=2,heads=4" or a dict) checked against the work first (its
    errors name the real misfit), "auto" (every local device on the data axis when the batch divides over
    them, else None = one device) or None / "none" (one device)."""
    if mesh is None or (isinstance(mesh, str) and mesh.strip().lower() in ("none", "")):
        return None
    if isinstance(mesh, str) and mesh.strip().lower() == "auto":
        n = len(devices if devices is not None else jax.local_devices())
        if n <= 1 or batch % n:
            return None
        return make_mesh({"data": n}, devices=devices or jax.local_devices())
    if isinstance(mesh, (str, dict)):
        sizes = parse_mesh(mesh) if isinstance(mesh, str) else dict(mesh)
        validate(sizes, batch=batch, heads=heads, family=family, do_cfg=do_cfg)
        return make_mesh(sizes, devices=devices)
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, a spec such as 'data=2,heads=4', 'auto' or None; "
                         f"got {type(mesh).__name__}")
    return mesh


@dataclasses.dataclass
class Placed:
    """Sampler inputs on a mesh (:func:`place_inputs`)."""

    state: Any
    latents: jax.Array
    cond: dict[str, Any]
    model_axes: Any  # mesh axes of the model batch (the doubled CFG batch for SD3 with CFG)
    data_axes: Any  # mesh axes of the latents' batch
    cfg_model: bool

    @property
    def carry_axes(self):
        """Batch axes of per-layer carried state ([B_model, S, H, D] caches)."""
        return self.model_axes if self.cfg_model else self.data_axes


def place_inputs(mesh: Mesh, state, latents, cond: dict[str, Any], *, family: str, do_cfg: bool, fsdp: bool,
                 num_heads: int) -> Placed:
    """Validate ``mesh`` against the work, then place params, latents and conditioning on it."""
    latents = jnp.asarray(latents)
    batch = latents.shape[0]
    validate({a: _size(mesh, a) for a in mesh.axis_names}, batch=batch, heads=num_heads, family=family,
             do_cfg=do_cfg)
    cfg_model = do_cfg  # the model batch is [uncond; cond]: SD3's CFG or FLUX's true CFG
    model_batch = 2 * batch if cfg_model else batch
    model_axes = _batch_axes(mesh, model_batch=True)
    data_axes = _batch_axes(mesh, model_batch=False)
    replicated = NamedSharding(mesh, P())
    state = place_params(state, mesh, fsdp=fsdp)
    x = jax.device_put(latents, NamedSharding(mesh, P(data_axes)))
    cond_batch, cond_axes = (model_batch, model_axes) if cfg_model else (batch, data_axes)
    cond = {k: (None if v is None else
                jax.tree.map(lambda a: jax.device_put(jnp.asarray(a), replicated), v) if k == "rope" else
                tuple(_batch_put(a, mesh, cond_axes, cond_batch) for a in v) if isinstance(v, tuple) else
                _batch_put(v, mesh, cond_axes, cond_batch)) for k, v in cond.items()}
    return Placed(state, x, cond, model_axes, data_axes, cfg_model)


def place_carry(tree, mesh: Mesh, batch_axes):
    """Per-layer carried state on the mesh: [B, S, H, D] head caches split on batch and heads, [B, ...]
    layer outputs on batch."""
    heads = _head_axes(mesh)

    def put(x):
        spec = P(batch_axes, None, heads, None) if x.ndim == 4 else P(batch_axes)
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree.map(put, tree)


def shard_denoise(mesh: Mesh, graphdef, state, latents, cond: dict[str, Any], timesteps, sigmas, *, family: str,
                  do_cfg: bool = False, plan: PlanArrays | None = None, fsdp: bool = False, report: bool = False,
                  num_heads: int | None = None, attention_impl: str = "auto"):
    """:func:`dfa2_jax.sample.denoise` on ``mesh``: places params, latents, conditioning and the plan (see the
    module docstring), then runs the same jitted sampler; returns the latents (sharded on ``data``)."""
    args, kwargs = sharded_sampler_inputs(mesh, graphdef, state, latents, cond, timesteps, sigmas, family=family,
                                          do_cfg=do_cfg, plan=plan, fsdp=fsdp, report=report, num_heads=num_heads,
                                          attention_impl=attention_impl)
    with jax.set_mesh(mesh):  # attention runs per device under it (dfa2_jax.models.attention.per_device)
        return run_sampler(*args, **kwargs)


def sharded_sampler_inputs(mesh: Mesh, graphdef, state, latents, cond: dict[str, Any], timesteps, sigmas, *,
                           family: str, do_cfg: bool = False, plan: PlanArrays | None = None, fsdp: bool = False,
                           report: bool = False, num_heads: int | None = None, attention_impl: str = "auto"
                           ) -> tuple[tuple, dict]:
    """The placed (args, kwargs) of the jitted sampler that :func:`shard_denoise` runs under ``jax.set_mesh(mesh)``
    (also what scripts/aot_memory.py compiles for GPUs that are not attached)."""
    heads = num_heads if num_heads is not None else _num_heads(graphdef, state)
    spec, plan_in = plan_inputs(graphdef, state, jnp.asarray(latents), cond, timesteps, plan, family=family,
                                do_cfg=do_cfg, attention_impl=attention_impl)
    pl_ = place_inputs(mesh, state, latents, cond, family=family, do_cfg=do_cfg, fsdp=fsdp, num_heads=heads)
    replicated = NamedSharding(mesh, P())
    if plan_in is not None:
        plan_in = place_plan(plan_in, mesh, model_axes=pl_.carry_axes)
    batch_sharding = (NamedSharding(mesh, P(pl_.model_axes)) if pl_.cfg_model and pl_.model_axes is not None
                      else None)
    args = (graphdef, pl_.state, pl_.latents, pl_.cond, jax.device_put(jnp.asarray(timesteps), replicated),
            jax.device_put(jnp.asarray(sigmas), replicated), plan_in)
    return args, dict(family=family, do_cfg=do_cfg, report=report, spec=spec, batch_sharding=batch_sharding)
