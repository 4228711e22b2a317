"""The head-wise compression runtime inside the scanned sampler.

A plan becomes int arrays: ``codes`` / ``half_windows`` [steps, layers, heads] (scan inputs: one step's
slice per scan iteration) and ``resid_windows`` [layers, heads] (the ``wars:k`` band of each head). What is
static is the plan's *structure* (:class:`RuntimeSpec`): which layers ever read a head cache, a ``wars``
residual, or can skip their projections (all heads ``cache`` at some step: V1's AST), and which layers are
``full`` throughout (those run the dense path, so the all-``full`` plan compiles to the dense sampler
exactly). One compile serves every plan with the same shape and structure.

Per layer, the carry holds (only what the plan reads): ``heads`` — every head's latest attention output
before the output projection [B, S', H, D], S' = :func:`cache_rows` (the Mosaic GPU kernel's padded length, so
the kernel updates it in place with no copy per step; S elsewhere); ``resid`` — the ``wars`` residual
full − window [B, S, H, D], refreshed at the head's ``full`` steps; ``out``/``ctx`` — the layer's projected
outputs, returned as they are when the layer is skipped.

Per head at one step (:func:`arrow_heads`: the Pallas kernel on a GPU, the pure-jnp reference elsewhere, or
what ``attention_impl`` names):
- full / cfg_share: dense over the joint sequence; arrow / wars / cfg_share+arrow: the arrow band;
- wars: band output + the stored residual; at a full step the residual is refreshed (full − band);
- cfg_share(+arrow): the conditional half's output is used for both CFG halves (batch = [uncond, cond]);
- cache: the stored output of the previous step.

The kernel's launch schedules of every step and layer are computed once per plan, before the scan
(:func:`plan_schedules`), and reach each step as scan inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dfa2_jax.plan import methods as M
from dfa2_jax.models.attention import TokenLayout, dense_attention
from dfa2_jax.parallel.mesh import per_device, per_device_tables
from pallas_kernels import arrow_attention, arrow_schedules, cache_length, resolve_implementation


@dataclasses.dataclass(frozen=True, slots=True)
class RuntimeSpec:
    """Static structure of a plan (hashable: part of the sampler's compile key)."""

    dense_layers: tuple[bool, ...]  # full at every step and head: dense attention, no state
    cache_layers: tuple[bool, ...]  # some head is `cache` at some step, or the layer can be skipped
    resid_layers: tuple[bool, ...]  # some head is `wars`
    skip_layers: tuple[bool, ...]  # every head `cache` at some step: projections skipped then
    cfg_layers: tuple[bool, ...]  # some head is `cfg_share` / `cfg_share+arrow`
    cfg: bool  # the batch is [uncond, cond] (SD3's classifier-free guidance or FLUX's true CFG)
    # How compressed layers' heads run: one of ATTENTION_IMPLS (:func:`check_attention_impl`).
    impl: str = "auto"

    @classmethod
    def from_codes(cls, codes: np.ndarray, *, cfg: bool, impl: str | None = None) -> RuntimeSpec:
        codes = np.asarray(codes)  # [steps, layers, heads]
        if codes.ndim != 3:
            raise ValueError(f"codes must be [steps, layers, heads]; got shape {codes.shape}")
        if not cfg and np.isin(codes, M.CFG_CODES).any():
            raise ValueError("cfg_share methods need classifier-free guidance (SD3 with guidance_scale > 1, or FLUX "
                             "true CFG: a negative_prompt with true_cfg_scale > 1)")
        skip = (codes == M.CACHE).all(axis=2).any(axis=0)
        impl = check_attention_impl(impl)
        return cls(dense_layers=tuple(bool(x) for x in (codes == M.FULL).all(axis=(0, 2))),
                   cache_layers=tuple(bool(x) for x in (codes == M.CACHE).any(axis=(0, 2)) | skip),
                   resid_layers=tuple(bool(x) for x in (codes == M.WARS).any(axis=(0, 2))),
                   skip_layers=tuple(bool(x) for x in skip),
                   cfg_layers=tuple(bool(x) for x in np.isin(codes, M.CFG_CODES).any(axis=(0, 2))), cfg=cfg,
                   impl=impl)

    @property
    def num_layers(self) -> int:
        return len(self.dense_layers)

    def stateful(self, layer: int) -> bool:
        return self.cache_layers[layer] or self.resid_layers[layer]


ATTENTION_IMPLS = ("auto", "xla", "triton", "mosaic_gpu", "interpret")


def check_attention_impl(impl: str | None) -> str:
    """The per-head attention implementation of a plan's compressed layers, checked: "auto" (None) is the Pallas
    kernel on a GPU (Mosaic GPU on Hopper, Triton elsewhere: :func:`pallas_kernels.resolve_implementation`) and the
    pure-jnp reference elsewhere; "xla" the reference everywhere; "triton" / "mosaic_gpu" one kernel backend;
    "interpret" the Triton kernel in Pallas interpret mode (CPU tests of the kernel path)."""
    impl = "auto" if impl is None else impl
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation {impl!r}: expected one of {', '.join(ATTENTION_IMPLS)}")
    return impl


def kernel_call(impl: str, q) -> tuple[str, bool]:
    """(pallas_kernels ``implementation``, ``interpret``) for this call. Head dims the kernels cannot load (not a
    power of two >= 16) take the reference ("xla")."""
    d = q.shape[-1]
    if impl == "xla" or d < 16 or d & (d - 1):
        return "xla", False
    if impl == "interpret":
        return "triton", True
    return impl, False


def uses_kernel(impl: str, q) -> bool:
    """Whether ``impl`` runs a Pallas kernel (not the jnp reference) on operands like ``q``."""
    implementation, interpret = kernel_call(impl, q)
    return implementation != "xla" and resolve_implementation(q, implementation, interpret=interpret) != "xla"


def cache_rows(impl: str, q) -> int:
    """Rows of the head cache carried for calls like ``q`` under ``impl``: the kernel's in-place length
    (:func:`pallas_kernels.cache_length`: the Mosaic GPU kernel's padded S), S for the jnp reference."""
    implementation, interpret = kernel_call(impl, q)
    return cache_length(q, implementation, interpret=interpret)


def arrow_heads(q, k, v, half_windows, layout: TokenLayout, cache, impl: str, schedule=None) -> jax.Array:
    """Per-head arrow attention (half-window −1 = full; 0 with ``cache`` = copy the cached head) through
    :func:`pallas_kernels.arrow_attention` with the chosen implementation (:func:`check_attention_impl`).
    Under a context mesh each device runs its own batch rows and heads (:func:`per_device`). ``schedule``: the
    kernel's precomputed launch schedule for this call, one row per device ([devices, ...]: a layer's slice of
    :func:`plan_schedules`' tables), or None to compute it in the call. A ``cache`` longer than S (:func:`cache_rows`)
    gives an output of its length."""
    implementation, interpret = kernel_call(impl, q)

    def local(q, k, v, *rest):  # rest: ([cache,] half_windows[, schedule]), per_device's operand order
        *cache, hw = rest[:-1] if schedule is not None else rest
        return arrow_attention(q, k, v, hw, text_len=layout.text_len, text_first=layout.text_first,
                               cache=cache[0] if cache else None, implementation=implementation, interpret=interpret,
                               schedule=rest[-1] if schedule is not None else None)

    bshd = (q, k, v) if cache is None else (q, k, v, cache)
    return per_device(local, bshd, (half_windows.astype(jnp.int32),), () if schedule is None else (schedule,))


def _bands(codes, half_windows, with_cache: bool) -> jax.Array:
    """The kernel's per-head half-windows from method codes ([H], or [L, H] for every layer): −1 full, w windowed,
    0 cached (``with_cache``)."""
    band = jnp.where(jnp.isin(codes, jnp.asarray(M.WINDOWED)), half_windows, -1)
    return jnp.where(codes == M.CACHE, 0, band) if with_cache else band


def _per_head(mask_h: jax.Array) -> jax.Array:
    return mask_h[None, None, :, None]  # [H] -> broadcast over [B, S, H, D]


# A kind of kernel call in a step: (q's shape, q's dtype, layout, with a cache). Every layer of one kind shares
# one table of launch schedules.
CallKind = tuple[tuple[int, ...], object, TokenLayout, bool]


def call_kind(spec: RuntimeSpec, layer: int, q, layout: TokenLayout) -> CallKind:
    return tuple(q.shape), q.dtype, layout, spec.cache_layers[layer]


def _schedule_tables(spec: RuntimeSpec, kind: CallKind, bands: jax.Array):
    """The launch schedules of calls of ``kind``, one per row of ``bands`` ([N, H] half-windows), on each device
    (:func:`per_device_tables`) -> [devices, N, ...], or None for the reference or a backend that needs none."""
    shape, dtype, layout, has_cache = kind
    q = jax.ShapeDtypeStruct(shape, dtype)
    if not uses_kernel(spec.impl, q):
        return None
    implementation, interpret = kernel_call(spec.impl, q)

    def tables(local_shape, bands):
        return arrow_schedules(jax.ShapeDtypeStruct(local_shape, dtype), bands, text_len=layout.text_len,
                               text_first=layout.text_first, has_cache=has_cache, implementation=implementation,
                               interpret=interpret)

    return per_device_tables(tables, shape, (bands,))


def plan_schedules(spec: RuntimeSpec, kinds: dict[int, CallKind], codes: jax.Array, half_windows: jax.Array
                   ) -> dict[CallKind, jax.Array]:
    """The kernel's launch schedules of a whole plan, computed at once before the sampler's scan: ``kinds`` maps
    each attention layer that is not dense to its :data:`CallKind` (:class:`ShapeProbe` records them), codes and
    half_windows are the plan's [T, L, H] -> {kind: int32 [T, devices, L, ...]}; step t's slice goes to
    :class:`PlanRuntime` as ``schedules``. Kinds whose calls need no table (the reference, Triton) are left out.
    One computation per kind instead of one per step: the sampler's steps run no schedule kernels."""
    steps, layers, heads = codes.shape
    out: dict[CallKind, jax.Array] = {}
    for kind in dict.fromkeys(kinds.values()):
        bands = _bands(codes, half_windows, kind[3]).reshape(steps * layers, heads)
        table = _schedule_tables(spec, kind, bands)
        if table is not None:  # [devices, T·L, ...] -> [T, devices, L, ...]
            out[kind] = jnp.moveaxis(table.reshape(table.shape[0], steps, layers, *table.shape[2:]), 1, 0)
    return out


class PlanRuntime:
    """The runtime for one step: plan slices for this step, the carried state in, the new state out.

    Models call it through ``joint_attention`` (per-head outputs) and ``run_layer`` (around a whole attention
    site, to skip its projections when every head is cached).
    """

    def __init__(self, spec: RuntimeSpec, codes: jax.Array, half_windows: jax.Array, resid_windows: jax.Array,
                 state: dict[str, dict[str, jax.Array]], schedules: dict[CallKind, jax.Array] | None = None):
        """``schedules``: this step's slice of :func:`plan_schedules` ({kind: [devices, L, ...]}), or None to
        compute the step's schedules in the step."""
        self.spec = spec
        self.codes, self.half_windows, self.resid_windows = codes, half_windows, resid_windows  # [L, H]
        self.state = state
        self.new_state: dict[str, dict[str, jax.Array]] = {}
        self._pending: dict[int, dict[str, jax.Array]] = {}
        self._given = schedules is not None
        # kernel launch schedules of every layer, per kind of call
        self._schedules: dict[CallKind, jax.Array | None] = dict(schedules or {})
        self._in_cond = False  # tracing a skippable layer's lax.cond branch

    # -- per-head attention (called by joint_attention) -------------------------------------------------
    def __call__(self, q, k, v, *, layer: int, layout: TokenLayout) -> jax.Array:
        spec = self.spec
        if spec.dense_layers[layer]:
            return dense_attention(q, k, v)
        codes = self.codes[layer]  # [H]
        old = self.state.get(str(layer), {})
        band = _bands(codes, self.half_windows[layer], spec.cache_layers[layer])
        cache = None
        if spec.cache_layers[layer]:  # cached heads: half-window 0 + the stored output (copied, not computed)
            cache = old["heads"].astype(q.dtype)  # cache_rows(impl, q) rows: the kernel writes it in place
        carried = self._attend(q, k, v, band, layout, cache, self._schedule(layer, q, layout))
        s = q.shape[1]
        o = carried[:, :s] if carried.shape[1] != s else carried
        pending = {}
        if spec.resid_layers[layer]:
            window = self._attend(q, k, v, self.resid_windows[layer], layout, None)
            is_full = _per_head(codes == M.FULL)
            pending["resid"] = jnp.where(is_full, o - window, old["resid"])
            o = jnp.where(_per_head(codes == M.WARS), o + old["resid"], o)
        if spec.cfg_layers[layer]:
            half = o.shape[0] // 2
            shared = jnp.concatenate([o[half:], o[half:]], axis=0)
            o = jnp.where(_per_head(jnp.isin(codes, jnp.asarray(M.CFG_CODES))), shared, o)
        if spec.cache_layers[layer]:  # the kernel's output as it is, unless changed above (then padded again)
            changed = spec.resid_layers[layer] or spec.cfg_layers[layer]
            pending["heads"] = jnp.pad(o, ((0, 0), (0, carried.shape[1] - s), (0, 0), (0, 0))) if changed else carried
        self._pending[layer] = pending
        return o

    def _attend(self, q, k, v, band, layout: TokenLayout, cache, schedule=None):
        return arrow_heads(q, k, v, band, layout, cache, self.spec.impl, schedule)

    def _schedule(self, layer: int, q, layout: TokenLayout):
        """This layer's slice ([devices, ...]) of the kernel launch schedules of all layers: given for the step
        (:func:`plan_schedules`), else computed once in the step for each kind of call and, under a mesh, on each
        device for its own heads (:func:`per_device_tables`) — None for the reference or a backend that needs
        none, or (when computed in the step) inside a skippable layer's lax.cond (a value made there cannot serve
        later layers)."""
        kind = call_kind(self.spec, layer, q, layout)
        if kind not in self._schedules:
            if self._given or self._in_cond:
                return None
            self._schedules[kind] = _schedule_tables(self.spec, kind, _bands(self.codes, self.half_windows, kind[3]))
        table = self._schedules[kind]
        return None if table is None else table[:, layer]

    # -- around an attention site ------------------------------------------------------------------------
    def run_layer(self, layer: int, compute: Callable[[], tuple[jax.Array, jax.Array | None]]):
        """``compute()`` projects q/k/v, calls joint_attention and the output projections -> (out, ctx).
        Skips it (lax.cond on this step's codes) when every head of a skippable layer is ``cache``."""
        spec = self.spec

        def computed():
            out, ctx = compute()
            return out, ctx, self._pending.pop(layer, {})

        if spec.skip_layers[layer]:
            old = self.state[str(layer)]

            def skipped():
                return old["out"], old.get("ctx"), {k: v for k, v in old.items() if k in ("heads", "resid")}

            self._in_cond = True
            try:
                out, ctx, pending = jax.lax.cond(jnp.all(self.codes[layer] == M.CACHE), skipped, computed)
            finally:
                self._in_cond = False
            pending = {**pending, "out": out, **({"ctx": ctx} if ctx is not None else {})}
        else:
            out, ctx, pending = computed()
        if spec.stateful(layer):
            self.new_state[str(layer)] = pending
        return out, ctx


class ShapeProbe:
    """A runtime that runs dense attention and records each stateful layer's state shapes (for the carry's
    initial zeros, under ``jax.eval_shape``) and each compressed layer's :data:`CallKind` (``kinds``, for
    :func:`plan_schedules`)."""

    def __init__(self, spec: RuntimeSpec):
        self.spec = spec
        self.shapes: dict[str, dict[str, jax.Array]] = {}
        self.kinds: dict[int, CallKind] = {}

    def __call__(self, q, k, v, *, layer: int, layout: TokenLayout) -> jax.Array:
        o = dense_attention(q, k, v)
        if not self.spec.dense_layers[layer]:
            self.kinds[layer] = call_kind(self.spec, layer, q, layout)
        if self.spec.stateful(layer):
            entry = self.shapes.setdefault(str(layer), {})
            if self.spec.cache_layers[layer]:
                b, _, h, d = o.shape
                entry["heads"] = jnp.zeros((b, cache_rows(self.spec.impl, q), h, d), o.dtype)
            if self.spec.resid_layers[layer]:
                entry["resid"] = o
        return o

    def run_layer(self, layer: int, compute):
        out, ctx = compute()
        if self.spec.skip_layers[layer]:
            self.shapes[str(layer)].update({"out": out, **({"ctx": ctx} if ctx is not None else {})})
        return out, ctx
