"""Arrow attention on Hopper: the Mosaic GPU backend of :func:`pallas_kernels.arrow_attention`.

Same arguments, semantics (:mod:`pallas_kernels.reference`) and visit schedule (:mod:`pallas_kernels.common`) as
the Triton kernel (:mod:`pallas_kernels.triton`); what differs is how the tiles run. The kernel is persistent
(one CTA per SM, each running its own list of tiles, longest first: by default a cost-balanced assignment,
each tile onto the least-loaded CTA, or every n-th tile of the longest-first order, see :func:`assign_ctas`); a
tile is 2 × ``block_q`` query rows of one (batch, head), and each CTA runs three warpgroups, FlashAttention-3
style:

* a memory warpgroup streams each tile's Q (double-buffered) and key/value blocks with TMA into a ring of
  ``max_concurrent_steps`` shared-memory slots, running ahead across tile boundaries; the block sequence (text
  blocks, then the head's band) comes from a per-program table computed in the wrapper
  (:func:`pallas_kernels.common.visit_ranges`, vectorised over programs), so blocks outside the band are never
  loaded;
* two compute warpgroups (``block_q`` rows each) run QKᵀ and PV as asynchronous wgmma from shared memory, with a
  schedule barrier that lets one warpgroup's softmax overlap the other's matmuls;
* only edge blocks (band edges, text/image boundary, padding) are masked element-wise; interior band blocks and
  pure-text blocks run the unmasked body;
* a cached head (half-window 0 with ``cache`` given) loads no K/V: the output is written over the cache, so its
  tile is loaded in place of Q and stored back unchanged (the balanced schedule leaves such tiles out).

Inputs must be bfloat16 or float16 with head_dim a multiple of 64 (wgmma operand tiles); the sequence is padded
to a multiple of 2 × ``block_q`` and ``block_kv``. :func:`supported` says whether a call can take this path; the
dispatcher (:func:`pallas_kernels.resolve_implementation`) picks the Triton kernel otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from ._jax_compat import interpret_gpu_params
from .common import MASK_KINDS, launch_order, on_cache_rows, pad_cache, text_blocks, validate, visit_ranges

_LOG2E = math.log2(math.e)
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: see pallas_kernels.triton._MASK_VALUE
_COMPUTE_WGS = 2
_MGPU_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# The cost model of the balanced schedule, in unmasked key-block steps: a step by the mask its block needs (the
# element-wise test on the scores; measured with the kernel's on-device profile: band 1.24-1.32, general 1.70) and
# a tile's fixed part (its Q wait, the output's normalisation and store: ~1 step measured; 3 keeps the few long
# tiles of a CTA from being underrated).
_STEP_COST = {"clean": 1.0, "tail": 1.15, "band": 1.3, "general": 1.7}
_TILE_COST = 3.0
_HEADER = 2  # header columns of the program table's first num_ctas rows: (first row, tile count) of each CTA


@dataclasses.dataclass(frozen=True, slots=True)
class MosaicGpuConfig:
    """block_q: query rows per compute warpgroup (a tile holds two); block_kv: keys per streamed block;
    max_concurrent_steps: shared-memory ring slots for K and V (≥ 2); num_ctas: persistent CTAs (0: one per
    SM); group_by_mask: the compute warpgroups loop once per mask kind (clean, tail, band, general: a smaller module,
    faster to compile) instead of once per key-block range of the visit schedule; balance: tiles go to the CTAs
    by estimated cost, longest first onto the least-loaded CTA, and cached tiles are left out (default True;
    False: every num_ctas-th tile of the longest-first order, "round-robin"). Computing the balanced assignment
    is a sequential loop (~0.8 ms for FLUX.1 at 2048² on an H100, once per sampler step for all layers, or once
    per call without a precomputed ``schedule``); it shortens the kernel of mixed plans by 8–15%
    (docs/PERFORMANCE.md). profile_dir, profile_events: record the kernel's phases (its named scopes: c_* in the
    compute warpgroups, m_* in the memory one) with jax's Mosaic GPU on-device profiler, up to ``profile_events``
    scopes per warpgroup (in shared memory: more than a CTA records overwrites other data), one Perfetto trace per
    call in ``profile_dir``; scripts/profile_kernel.py sizes and reads them."""

    block_q: int = 64
    block_kv: int = 128
    max_concurrent_steps: int = 2
    num_ctas: int = 0  # persistent CTAs; 0 = one per SM
    group_by_mask: bool = True
    balance: bool = True
    profile_dir: str = ""
    profile_events: int = 0

    def __post_init__(self):
        for name in ("block_q", "block_kv"):
            b = getattr(self, name)
            if not (isinstance(b, int) and b >= 64 and b % 64 == 0 and b & (b - 1) == 0):
                raise ValueError(f"MosaicGpuConfig.{name}={b!r} must be a power of two and a multiple of 64 "
                                 "(wgmma tiles)")
        if not (isinstance(self.max_concurrent_steps, int) and self.max_concurrent_steps >= 2):
            raise ValueError(f"MosaicGpuConfig.max_concurrent_steps={self.max_concurrent_steps!r} must be an int >= 2")
        if not (isinstance(self.num_ctas, int) and self.num_ctas >= 0):
            raise ValueError(f"MosaicGpuConfig.num_ctas={self.num_ctas!r} must be an int >= 0 (0: one per SM)")
        for name in ("group_by_mask", "balance"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MosaicGpuConfig.{name}={getattr(self, name)!r} must be a bool")
        if not (isinstance(self.profile_events, int) and self.profile_events >= 0 and isinstance(self.profile_dir, str)
                and bool(self.profile_events) == bool(self.profile_dir)):
            raise ValueError(f"MosaicGpuConfig: profile_dir={self.profile_dir!r} and profile_events="
                             f"{self.profile_events!r} must be set together (a folder and an int > 0) or not at all")

    @property
    def tile_q(self) -> int:
        return _COMPUTE_WGS * self.block_q


def heuristic_config(head_dim: int) -> MosaicGpuConfig:
    """128-key blocks and a 2-slot ring at head_dim 128 (the ring of 256-key blocks does not fit in 227 KB of
    shared memory); 3 slots at head_dim 64."""
    return MosaicGpuConfig(block_q=64, block_kv=128, max_concurrent_steps=2 if head_dim > 64 else 3)


def supported(q, *, interpret: bool = False) -> bool:
    """Whether this path can run these inputs: bf16/f16, head_dim a multiple of 64 (≤ 256), and a Hopper GPU
    (compute capability 9.x) unless ``interpret``."""
    d = q.shape[-1]
    if jnp.dtype(q.dtype) not in _MGPU_DTYPES or d % 64 or d > 256:
        return False
    if interpret:
        return True
    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return False
    if dev.platform != "gpu":
        return False
    cc = getattr(dev, "compute_capability", None)
    if cc is not None:
        return str(cc).split(".")[0] == "9"
    return any(name in dev.device_kind for name in ("H100", "H200", "H800", "H20", "GH200"))


def _kernel(table_ref, q_ref, k_ref, v_ref, *refs, cfg: MosaicGpuConfig, head_dim: int, seq_len: int,
            text_len: int, text_first: bool, scale: float, has_cache: bool, num_ranges: int, masked: tuple[str, ...],
            interpret: bool):
    """One persistent CTA: its rows of the table (:func:`program_table`: the header row ``cta`` names them), each a
    2·block_q-row query tile. Warpgroups
    0 and 1 compute (block_q rows each), warpgroup 2 issues every TMA load: each tile's Q (or, for a cached
    head, its cache tile) into a double-buffered Q/O slot, then its K/V blocks into the ring. Its step counter
    runs across tiles, so the next tile's loads overlap the current tile's last steps and its output store."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    if has_cache:  # the output is written over the cache (a ref aliased in and out, see _mgpu_call)
        cache_ref, *scratch = refs
        out_ref = cache_ref
    else:
        cache_ref = None
        out_ref, *scratch = refs
    (qo_smem, k_smem, v_smem), (k_bars, v_bars, q_bars), (k_used, v_used, qo_free), sched = scratch
    bq, bkv, ring = cfg.block_q, cfg.block_kv, cfg.max_concurrent_steps
    dtype = q_ref.dtype
    cta = lax.axis_index("cta")
    wg = lax.axis_index("wg")
    first_row, n_tiles = table_ref[cta, 0], table_ref[cta, 1]  # this CTA's rows of the table, longest first
    # GPU interpret mode (CPU tests) lacks four GPU-only pieces: layout annotations (identity there), layout-typed
    # iotas, run_state and transposed wgmma operands. There the two matmuls are jnp.dot on the same shared-memory
    # tiles; the TMA ring, barriers, visit schedule, masks and cache copies are the GPU code's.
    layout = (lambda x, _: x) if interpret else plgpu.layout_cast
    iota = ((lambda axis: lax.broadcasted_iota(jnp.int32, (bq, bkv), axis)) if interpret else
            (lambda axis: plgpu.broadcasted_iota(jnp.int32, (bq, bkv), axis, layout=plgpu.Layout.WGMMA)))
    # Step counters are never negative; unsigned, the slot is a mask (or a multiply-high) without the sign fix-ups
    # of a signed remainder, a few instructions off every key-block step.
    ring_slot = lambda g: lax.rem(g.astype(jnp.uint32), jnp.uint32(ring)).astype(jnp.int32)
    # With group_by_mask, both warpgroup kinds visit the ranges grouped by mask kind (clean, tail, band, general; the
    # softmax is order-free), so the compute warpgroups hold one loop body per kind instead of one per range: half
    # the kernel's code, and XLA compiles each kernel instance of the sampler (57 in FLUX.1) about twice as fast.
    # Without it, one loop per range in the schedule's order.
    if cfg.group_by_mask:
        order = sorted(range(num_ranges), key=lambda r: MASK_KINDS.index(masked[r]))
    else:
        order = list(range(num_ranges))
    groups = []  # (mask kind, positions in visit order)
    for pos, r in enumerate(order):
        if cfg.group_by_mask and groups and groups[-1][0] == masked[r]:
            groups[-1][1].append(pos)
        else:
            groups.append((masked[r], [pos]))

    def block_at(i, lo, starts, positions):
        """The K/V block of tile-local step i, which lies in one of the ranges at ``positions``."""
        kb = lo[positions[0]] + (i - starts[positions[0]])
        for pos in positions[1:]:
            kb = jnp.where(i >= starts[pos], lo[pos] + (i - starts[pos]), kb)
        return kb

    def tile_info(j):
        p = first_row + j
        col = lambda c: table_ref[p, c]
        lo = [col(5 + 2 * r) for r in order]
        hi = [col(6 + 2 * r) for r in order]
        starts = [jnp.int32(0)]  # tile-local step index of each range's first block (visit order)
        for r in range(num_ranges):
            starts.append(starts[-1] + (hi[r] - lo[r]))
        return dict(b=col(0), h=col(1), qt=col(2), w=col(3), cached=col(4) != 0, lo=lo, hi=hi, starts=starts)

    def sched_sync():
        plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(sched)

    @pl.when(wg < _COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")

        def tile(j, g0):
            with jax.named_scope("c_info"):
                t = tile_info(j)
            lo, starts, w = t["lo"], t["starts"], t["w"]
            n_steps = starts[-1]
            par = lax.rem(j, 2)
            qo = qo_smem.at[wg, par]
            row0 = t["qt"] * cfg.tile_q + wg * bq
            with jax.named_scope("c_qwait"):
                plgpu.barrier_wait(q_bars.at[wg * 2 + par])  # this tile's Q (or cache tile) is in qo

            with jax.named_scope("c_storewait"):
                @pl.when(j >= 1)
                def _():  # the previous tile's output has left its buffer: the memory warpgroup may refill it
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    plgpu.barrier_arrive(qo_free.at[wg * 2 + 1 - par])

            acc = layout(jnp.full((bq, head_dim), 0, jnp.float32), plgpu.Layout.WGMMA)
            m_i = layout(jnp.full((bq,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            l_i = layout(jnp.full((bq,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))

            with jax.named_scope("c_k0"):
                @pl.when(n_steps > 0)
                def _():
                    plgpu.barrier_wait(k_bars.at[ring_slot(g0)])

                pl.when(wg == 1)(sched_sync)
            w_eff = jnp.where(w < 0, jnp.int32(seq_len), w)
            mask_value = _MASK_VALUE / max(scale, 1.0)  # a masked score stays finite once scaled
            t_lo, t_hi = (0, text_len) if text_first else (seq_len - text_len, seq_len)

            def step(i, carry, *, positions, masked):  # i: tile-local step
                acc, m_i, l_i = carry
                slot = ring_slot(g0 + i)

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, qo, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                    sched_sync()
                    return acc_ref[...]

                if interpret:  # the interpreter's wgmma takes no transposed operand
                    s = jnp.dot(qo[...], k_smem[slot].T, preferred_element_type=jnp.float32)
                    sched_sync()
                else:
                    s = pl.run_scoped(qk, plgpu.ACC((bq, bkv), jnp.float32))
                plgpu.barrier_arrive(k_used.at[slot])
                # The scores stay unscaled: the running max is kept in scaled units and the scale enters p's exponent
                # as one fused multiply-add per score (s·scale − m), not a multiply and a subtract.
                if masked != "clean":
                    kb = block_at(i, lo, starts, positions)
                    if masked == "tail":  # every real key allowed: only the padding is masked
                        allowed = iota(1) < seq_len - kb * bkv
                    else:  # band test on positions: image rows and keys differ by as much as their image indices
                        diff = iota(0) - iota(1) + (row0 - kb * bkv)
                        allowed = (diff <= w_eff) & (diff >= -w_eff)
                    if masked == "general":  # text/image boundary blocks, tiles with image and text rows
                        rows, cols = iota(0) + row0, iota(1) + kb * bkv
                        if text_len:
                            allowed = allowed | ((rows >= t_lo) & (rows < t_hi)) | ((cols >= t_lo) & (cols < t_hi))
                        allowed = allowed & (cols < seq_len)
                    elif masked == "band" and text_first and seq_len % bkv:  # band edges: image keys, maybe padding
                        allowed = allowed & (iota(1) + kb * bkv < seq_len)
                    s = jnp.where(allowed, s, mask_value)
                m_new = jnp.maximum(m_i, s.max(axis=1) * scale)
                alpha = jnp.exp2(m_i - m_new)
                pr = jnp.exp2(s * scale - lax.broadcast_in_dim(m_new, s.shape, [0]))
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                l_i = l_i * alpha + pr.sum(axis=1)
                p16 = pr.astype(dtype)
                acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
                plgpu.barrier_arrive(sched)  # softmax done
                plgpu.barrier_wait(v_bars.at[slot])
                plgpu.barrier_wait(sched)  # the tensor cores are free

                def wait_next_k():
                    @pl.when(i + 1 < n_steps)
                    def _():
                        plgpu.barrier_wait(k_bars.at[ring_slot(g0 + i + 1)])

                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                    wait_next_k()

                if interpret:
                    acc = acc + jnp.dot(p16, v_smem[slot], preferred_element_type=jnp.float32)
                    wait_next_k()
                else:  # PV accumulates into acc inside the wgmma
                    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_used.at[slot])
                return acc, m_new, l_i

            carry = (acc, m_i, l_i)
            with jax.named_scope("c_steps"):
                for kind, positions in groups:
                    body = functools.partial(step, positions=positions, masked=kind)
                    with jax.named_scope(f"c_{kind}"):
                        carry = lax.fori_loop(starts[positions[0]], starts[positions[-1] + 1], body, carry)
            acc, m_i, l_i = carry
            with jax.named_scope("c_drain"):
                pl.when(wg == 0)(sched_sync)

            with jax.named_scope("c_out"):
                @pl.when(jnp.logical_not(t["cached"]))  # a cached tile's buffer already holds its output
                def _():
                    l_safe = jnp.where(l_i == 0.0, 1.0, l_i)  # all-padding rows (sliced off by the wrapper)
                    qo[...] = (acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])).astype(dtype)
                    plgpu.commit_smem()

                plgpu.copy_smem_to_gmem(qo, out_ref.at[t["b"], pl.ds(row0, bq), t["h"]])
            return g0 + n_steps

        lax.fori_loop(0, n_tiles, tile, jnp.int32(0))
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")

        def tile(j, g0):
            with jax.named_scope("m_info"):
                t = tile_info(j)
            lo, starts = t["lo"], t["starts"]
            n_steps = starts[-1]
            par = lax.rem(j, 2)
            for c in range(_COMPUTE_WGS):  # Q rows of compute warpgroup c (the cache tile for a cached head)
                with jax.named_scope("m_qfree"):
                    @pl.when(j >= 2)
                    def _():
                        plgpu.barrier_wait(qo_free.at[c * 2 + par])

                rows = (t["b"], pl.ds(t["qt"] * cfg.tile_q + c * bq, bq), t["h"])
                dst, bar = qo_smem.at[c, par], q_bars.at[c * 2 + par]
                if has_cache:
                    @pl.when(t["cached"])
                    def _():
                        plgpu.copy_gmem_to_smem(cache_ref.at[rows], dst, bar)

                @pl.when(jnp.logical_not(t["cached"]))
                def _():
                    plgpu.copy_gmem_to_smem(q_ref.at[rows], dst, bar)

            def block_of(i):
                return block_at(i, lo, starts, list(range(num_ranges)))

            with jax.named_scope("m_kv"):
                @pl.loop(jnp.int32(0), n_steps)
                def _(i):
                    g = g0 + i
                    slot = ring_slot(g)
                    sl = (t["b"], pl.ds(block_of(i) * bkv, bkv), t["h"])

                    @pl.when(g >= ring)
                    def _():
                        plgpu.barrier_wait(k_used.at[slot])

                    plgpu.copy_gmem_to_smem(k_ref.at[sl], k_smem.at[slot], k_bars.at[slot])

                    @pl.when(g >= ring)
                    def _():
                        plgpu.barrier_wait(v_used.at[slot])

                    plgpu.copy_gmem_to_smem(v_ref.at[sl], v_smem.at[slot], v_bars.at[slot])

            return g0 + n_steps

        g_end = lax.fori_loop(0, n_tiles, tile, jnp.int32(0))

        # Take every arrival not yet waited for (the last consumed arrivals of each used ring slot, the last
        # tile's buffer release), so that no completed barrier phase is left when the CTA exits: the GPU would not
        # mind, the interpreter checks it.
        @pl.loop(jnp.maximum(g_end - ring, 0), g_end)
        def _(g):
            plgpu.barrier_wait(k_used.at[ring_slot(g)])
            plgpu.barrier_wait(v_used.at[ring_slot(g)])

        @pl.when(n_tiles >= 2)
        def _():
            for c in range(_COMPUTE_WGS):
                plgpu.barrier_wait(qo_free.at[c * 2 + lax.rem(n_tiles, 2)])


def _smem_shapes(cfg: MosaicGpuConfig, head_dim: int) -> tuple[tuple[int, ...], ...]:
    """The kernel's shared-memory buffers: two Q/O tiles per compute warpgroup, the K ring, the V ring."""
    ring = cfg.max_concurrent_steps
    return (_COMPUTE_WGS, 2, cfg.block_q, head_dim), (ring, cfg.block_kv, head_dim), (ring, cfg.block_kv, head_dim)


def smem_bytes(config: MosaicGpuConfig, head_dim: int, dtype=jnp.bfloat16) -> int:
    """Bytes of the kernel's shared-memory buffers (its barriers and the compiler's scratch come on top)."""
    return sum(math.prod(shape) for shape in _smem_shapes(config, head_dim)) * jnp.dtype(dtype).itemsize


def _scratch(cfg: MosaicGpuConfig, head_dim: int, dtype):
    import jax.experimental.pallas.mosaic_gpu as plgpu

    transforms = (plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(128))
    ring = cfg.max_concurrent_steps
    smem = tuple(plgpu.SMEM(shape, dtype, transforms=transforms) for shape in _smem_shapes(cfg, head_dim))
    loaded = (plgpu.Barrier(num_barriers=ring), plgpu.Barrier(num_barriers=ring),
              plgpu.Barrier(num_barriers=2 * _COMPUTE_WGS))
    released = (plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=ring),) * 2 + (
        plgpu.Barrier(num_barriers=2 * _COMPUTE_WGS),)
    return smem, loaded, released, plgpu.Barrier(num_arrivals=_COMPUTE_WGS)


def num_ctas(n_prog: int, config: MosaicGpuConfig) -> int:
    """Persistent CTAs: ``config.num_ctas`` if set, else one per SM of the device (132 if unknown)."""
    n = config.num_ctas
    if not n:
        try:
            n = int(getattr(jax.devices()[0], "core_count", 0) or 0)
        except RuntimeError:
            n = 0
        n = n or 132
    return max(1, min(n, n_prog))


def assign_ctas(cost, n_cta: int):
    """The balanced schedule's CTA of each program: ``cost`` float32 [P] in launch order (longest first; 0 = no
    work) -> int32 [P], −1 for a program left out.

    Longest processing time first: each program goes to the least-loaded CTA so far, taken ``n_cta // 2``
    programs at a time (the chunk's longest onto the least loaded; a sequential loop of P / (n_cta / 2) steps
    rather than P, and on the benchmark plans the same makespan as one at a time); zero-cost programs left out.
    (The round-robin schedule needs no assignment: program p runs on CTA p mod n_cta, see :func:`program_table`.)"""
    p = cost.shape[0]
    k = max(1, n_cta // 2)
    n_chunks = -(-p // k)
    jobs = jnp.pad(cost.astype(jnp.float32), (0, n_chunks * k - p)).reshape(n_chunks, k)

    def chunk(load, c):
        least = jnp.argsort(load, stable=True)[:k].astype(jnp.int32)  # least-loaded CTAs first
        return load.at[least].add(c), least

    _, cta = lax.scan(chunk, jnp.zeros((n_cta,), jnp.float32), jobs)
    return jnp.where(cost > 0, cta.reshape(-1)[:p], -1)


def _tile_cost(bounds, masks, cached):
    """The balanced schedule's cost model of tiles: key-block steps of each range (``bounds``: (lo, hi) per range,
    ``masks``: the mask kind its blocks need), each weighted by _STEP_COST of its mask, plus _TILE_COST; cached
    tiles cost nothing. Works on jnp and numpy arrays alike."""
    work = sum((hi - lo) * _STEP_COST[m] for (lo, hi), m in zip(bounds, masks))
    return (work + _TILE_COST) * (1 - cached)


def program_table(half_window, *, batch: int, seq_len: int, s_pad: int, text_len: int, text_first: bool,
                  has_cache: bool, tile_q: int, block_kv: int, n_cta: int = 1, balance: bool = False):
    """The kernel's schedule: int32 [n_cta + programs, 5 + 2·ranges], and the static mask kind of each range
    (:func:`pallas_kernels.common.visit_ranges`).

    Rows n_cta… are the programs (batch, head, query tile, half-window, cached, range bounds…) grouped by CTA,
    each CTA's longest first; header row c (c < n_cta) holds CTA c's first row and tile count in its first two
    columns. Launch order (ties in the Triton kernel's order: text-row tiles of every head, then head by head:
    L2 reuse), then longest first, then :func:`assign_ctas`: with ``balance`` by estimated cost (key-block steps
    weighted by their mask, plus a fixed part per tile; cached tiles cost nothing and are left out), else by key
    blocks and round-robin. Computed with jnp from the runtime half-windows (a few thousand rows: negligible next
    to the kernel)."""
    h = half_window.shape[0]
    n_qt = s_pad // tile_q
    tq0, tq1 = text_blocks(seq_len, text_len, text_first, tile_q)
    prog = jnp.arange(batch * h * n_qt, dtype=jnp.int32)
    bh, qt = launch_order(prog, batch * h, n_qt, tq0, tq1)
    hd = lax.rem(bh, h)
    w = half_window.astype(jnp.int32)[hd]
    ranges, cached = visit_ranges(w, qt * tile_q, s_pad=s_pad, seq_len=seq_len, text_len=text_len,
                                  text_first=text_first, block_q=tile_q, block_k=block_kv, has_cache=has_cache)
    cols = [bh // h, hd, qt, w, cached]
    for (r_lo, r_hi), _ in ranges:
        cols += [r_lo, r_hi]
    cols = [jnp.broadcast_to(c, prog.shape).astype(jnp.int32) for c in cols]
    table = jnp.stack(cols, axis=1)
    if balance:  # estimated cost; cached tiles cost nothing
        cost = jnp.broadcast_to(_tile_cost([r for r, _ in ranges], [m for _, m in ranges],
                                           jnp.asarray(cached, jnp.float32)), prog.shape)
    else:  # key blocks; every tile runs, cached ones too
        cost = jnp.broadcast_to(sum(r_hi - r_lo for (r_lo, r_hi), _ in ranges), prog.shape)
    # Longest job first (stable: equal work keeps the head-by-head order), then each CTA's rows together.
    order = jnp.argsort(-cost, stable=True)
    table = table[order]
    if balance:
        cta = assign_ctas(cost[order], n_cta)
        key = jnp.where(cta < 0, n_cta, cta)
        table = table[jnp.argsort(key, stable=True)]
        counts = jnp.zeros((n_cta + 1,), jnp.int32).at[key].add(1)[:n_cta]
    else:  # round-robin: a fixed permutation (CTA c's rows c, c + n_cta, …), no sort at run time
        rr = np.arange(table.shape[0]) % n_cta
        table = table[np.argsort(rr, kind="stable")]
        counts = jnp.asarray(np.bincount(rr, minlength=n_cta), jnp.int32)
    header = jnp.zeros((n_cta, table.shape[1]), jnp.int32)
    header = header.at[:, 0].set(n_cta + jnp.cumsum(counts) - counts).at[:, 1].set(counts)
    return jnp.concatenate([header, table]), tuple(kind for _, kind in ranges)


def padded_length(shape, config: MosaicGpuConfig | None = None) -> int:
    """The sequence length the kernel works on for q of ``shape`` [B, S, H, D]: S rounded up to whole query tiles
    and key blocks (Mosaic GPU's tiled TMA copies need blocks inside their arrays). A cache of this length is
    updated in place with no padded copy, and the output keeps it (:func:`arrow_attention_mosaic_gpu`)."""
    config = config or heuristic_config(shape[-1])
    unit = math.lcm(config.tile_q, config.block_kv)
    return pl.cdiv(shape[1], unit) * unit


def table_args(shape, config: MosaicGpuConfig, *, text_len: int, text_first: bool, has_cache: bool) -> dict:
    """:func:`program_table`'s static arguments for q of ``shape`` [B, S, H, D]."""
    bsz, s, h = shape[0], shape[1], shape[2]
    s_pad = padded_length(shape, config)
    return dict(batch=bsz, seq_len=s, s_pad=s_pad, text_len=text_len, text_first=text_first, has_cache=has_cache,
                tile_q=config.tile_q, block_kv=config.block_kv,
                n_cta=num_ctas(bsz * h * (s_pad // config.tile_q), config), balance=config.balance)


def schedules(q, half_windows, *, text_len: int, text_first: bool, has_cache: bool,
              config: MosaicGpuConfig | None = None):
    """The program tables of many calls at once: half_windows int32 [L, H] (one row per call on q's shape) ->
    int32 [L, programs, columns], row l to pass as ``schedule=`` to the call with ``half_windows[l]``.

    One vectorised computation instead of one per call: in a sampler step with 57 kernel calls (FLUX.1), the
    per-call tables (an argsort and a few gathers each) were 57 separate sets of small XLA kernels, about half
    of the plan sampler's compile time."""
    config = config or heuristic_config(q.shape[-1])
    kw = table_args(q.shape, config, text_len=int(text_len), text_first=bool(text_first), has_cache=has_cache)
    return jax.vmap(lambda w: program_table(w, **kw)[0])(jnp.asarray(half_windows, jnp.int32))


def cta_loads(half_window, shape, *, text_len: int, text_first: bool, has_cache: bool,
              config: MosaicGpuConfig | None = None) -> np.ndarray:
    """Each persistent CTA's estimated work under ``config``'s schedule for one call with q of ``shape`` [B, S, H, D]:
    float64 [n_cta], in unmasked key-block steps by the balanced schedule's cost model (a step weighted by its
    mask kind, a fixed 3 per tile, a cached tile free). The busiest CTA over the mean is the schedule's tail; for
    the balanced schedule it is also the most that splitting the heaviest tiles over several CTAs could remove."""
    config = config or heuristic_config(shape[-1])
    kw = table_args(shape, config, text_len=int(text_len), text_first=bool(text_first), has_cache=has_cache)
    table, kinds = program_table(jnp.asarray(half_window, jnp.int32), **kw)
    return np.array([_tile_cost(range_bounds(rows, len(kinds)), kinds, (rows[:, 4] > 0).astype(np.float64)).sum()
                     for rows in cta_rows(table, kw["n_cta"])])


def cta_rows(table, n_cta: int) -> list[np.ndarray]:
    """A program table's rows (:func:`program_table`) run by each CTA, in its order, as numpy arrays."""
    table = np.asarray(table)
    return [table[first:first + count] for first, count in table[:n_cta, :_HEADER]]


def range_bounds(rows, num_ranges: int) -> list[tuple]:
    """(lo, hi) key-block columns of each range of program-table rows."""
    return [(rows[:, 5 + 2 * j], rows[:, 6 + 2 * j]) for j in range(num_ranges)]


@functools.partial(jax.jit, static_argnames=("text_len", "text_first", "sm_scale", "interpret", "config"))
def _mgpu_call(q, k, v, half_window, cache, schedule, *, text_len, text_first, sm_scale, interpret,
               config: MosaicGpuConfig):
    import jax.experimental.pallas.mosaic_gpu as plgpu

    bsz, s, h, d = q.shape
    has_cache = cache is not None
    kw = table_args(q.shape, config, text_len=text_len, text_first=text_first, has_cache=has_cache)
    s_pad = kw["s_pad"]  # Mosaic GPU's tiled TMA copies need blocks inside their arrays
    pad = ((0, 0), (0, s_pad - s), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, pad) if s_pad != s else x for x in (q, k, v))
    padded_out = has_cache and cache.shape[1] == s_pad  # a cache carried at the kernel's length: kept padded
    n_cta = kw["n_cta"]
    if schedule is None:
        table, masked = program_table(half_window, **kw)
    else:  # the table's shape and the static mask kinds only: nothing traced twice
        kinds = []

        def table_of(w):
            table, static_kinds = program_table(w, **kw)
            kinds.append(static_kinds)
            return table

        expected = jax.eval_shape(table_of, half_window)
        masked = kinds[0]
        if schedule.shape != expected.shape or schedule.dtype != expected.dtype:
            raise ValueError(f"arrow_attention_mosaic_gpu: schedule must be int32 {expected.shape} for this call (see "
                             f"schedules()), got {schedule.dtype} {schedule.shape}")
        table = schedule
    args = [table, q, k, v]
    if has_cache:
        # Written in place: every tile reads the cache only at the rows it then writes, so the output can take
        # the cache's buffer (a ref, aliased in and out of the kernel) and the sampler's carried head cache is
        # updated without a second buffer or a copy into the carry.
        cache = cache.astype(q.dtype)
        if not padded_out:  # the padded copy must not run before this call's q exists (see pad_cache)
            cache = pad_cache(cache, q, pad)
        args.append(jax.new_ref(cache, memory_space=plgpu.GMEM))
    body = functools.partial(_kernel, cfg=config, head_dim=d, seq_len=s,
                             text_len=text_len, text_first=text_first,
                             scale=sm_scale * _LOG2E, has_cache=has_cache, num_ranges=len(masked), masked=masked,
                             interpret=bool(interpret))
    scratch = _scratch(config, d, q.dtype)

    def kernel_body(*refs):  # what plgpu.kernel adds to pl.kernel: the scratch, shared by the warpgroups
        pl.run_scoped(functools.partial(body, *refs), *scratch, collective_axes="wg")

    # pl.kernel with a Mosaic GPU mesh, not plgpu.kernel: the latter's custom_vmap wrapper rejects a ref operand.
    mesh = plgpu.Mesh(grid=(n_cta,), grid_names=("cta",), num_threads=_COMPUTE_WGS + 1, thread_name="wg")
    out = pl.kernel(
        kernel_body,
        out_type=() if has_cache else (jax.ShapeDtypeStruct((bsz, s_pad, h, d), q.dtype),),
        mesh=mesh,
        compiler_params=plgpu.CompilerParams(approx_math=True, **(dict(
            profile_space=config.profile_events, profile_dir=config.profile_dir) if config.profile_dir else {})),
        interpret=interpret_gpu_params() if interpret else False,
        name="arrow_attention_mgpu",
    )(*args)
    out = jax.freeze(args[-1]) if has_cache else out[0]
    return out if padded_out else out[:, :s]


def arrow_attention_mosaic_gpu(q, k, v, half_window, *, text_len: int, text_first: bool, cache=None, sm_scale=None,
                               interpret: bool = False, config: MosaicGpuConfig | None = None, schedule=None):
    """:func:`pallas_kernels.arrow_attention` on the Mosaic GPU backend (Hopper); same arguments and semantics;
    bf16/f16 inputs with head_dim a multiple of 64 (:func:`supported`). ``schedule``: this call's program table
    precomputed by :func:`schedules` (it must come from the same ``half_window``). A ``cache`` of
    :func:`padded_length` rows is written in place as it is (no padded copy, no slice; the output's rows from S on
    are unspecified); a cache of S rows is padded first and the output sliced back to S."""
    validate(q, k, v, half_window, text_len, cache, kernel=True)
    if not supported(q, interpret=True):
        raise ValueError(f"arrow_attention_mosaic_gpu: needs bfloat16/float16 inputs with head_dim a multiple of 64 "
                         f"(<= 256), got {q.dtype} with head_dim {q.shape[-1]}")
    config = config or heuristic_config(q.shape[-1])
    if not isinstance(config, MosaicGpuConfig):
        raise ValueError(f"arrow_attention_mosaic_gpu: config must be a MosaicGpuConfig, got "
                         f"{type(config).__name__}")
    d = q.shape[-1]
    sm_scale = float(d ** -0.5 if sm_scale is None else sm_scale)

    def call(cache):
        return _mgpu_call(q, k, v, half_window, cache, schedule, text_len=int(text_len), text_first=bool(text_first),
                          sm_scale=sm_scale, interpret=bool(interpret), config=config)

    return on_cache_rows(call, q, cache, in_place_rows=padded_length(q.shape, config))
