"""The arrow-attention op: one entry point, the implementation chosen by argument.

Implementations (:data:`IMPLEMENTATIONS`):

* ``"mosaic_gpu"``: the Mosaic GPU kernel (:mod:`pallas_kernels.mosaic_gpu`: persistent, warp-specialised,
  TMA + wgmma), Hopper only, bf16/f16 with head_dim a multiple of 64; config :class:`MosaicGpuConfig`;
* ``"triton"``: the Pallas-Triton kernel (:mod:`pallas_kernels.triton`), any NVIDIA GPU, bf16/f16/f32 with
  head_dim a power of two >= 16; config :class:`TritonConfig` (default: the autotuned one cached on disk,
  :mod:`pallas_kernels.tuning`, else :func:`pallas_kernels.triton.heuristic_config`);
* ``"xla"``: the pure-jnp reference (:func:`pallas_kernels.reference.arrow_attention_reference`), anywhere;
  O(S²) memory;
* ``"auto"`` / None: :func:`resolve_implementation`.

A caller carrying a head cache between calls keeps it :func:`cache_length` rows long (no copy per call).

``interpret=True`` runs a Pallas kernel on the CPU (tests; it does not check the GPU compiler's rules).
Semantics of the half-windows and the cache: :mod:`pallas_kernels.reference`.
"""

from __future__ import annotations

import jax

from . import mosaic_gpu, triton
from .common import validate
from .mosaic_gpu import MosaicGpuConfig
from .reference import arrow_attention_reference
from .triton import TritonConfig
from .tuning import tuned_config

IMPLEMENTATIONS = ("auto", "mosaic_gpu", "triton", "xla")
_CONFIGS = {"mosaic_gpu": MosaicGpuConfig, "triton": TritonConfig}


def _on_gpu() -> bool:
    try:
        return jax.devices()[0].platform == "gpu"
    except RuntimeError:
        return False


def resolve_implementation(q, implementation: str | None = None, *, interpret: bool = False, config=None) -> str:
    """The implementation a call on ``q`` (an array or ``jax.ShapeDtypeStruct`` [B, S, H, D]) runs:
    "mosaic_gpu", "triton" or "xla".

    None / "auto": a config picks its backend by type (:class:`TritonConfig` Triton, :class:`MosaicGpuConfig`
    Mosaic GPU); else the Mosaic GPU kernel on Hopper (sm_90) for bf16/f16 with head_dim a multiple of 64, the
    Triton kernel on other GPUs and in interpret mode, the jnp reference ("xla") without a GPU. A named
    implementation is taken as is; its config, if given, must be of its type ("xla" ignores the config).
    Raises ValueError for an unknown name or a config of the wrong type."""
    choice = "auto" if implementation is None else implementation
    if choice not in IMPLEMENTATIONS:
        raise ValueError(f"arrow_attention: implementation={implementation!r} is not one of "
                         f"{', '.join(map(repr, IMPLEMENTATIONS))} (or None)")
    if config is not None and choice in _CONFIGS and not isinstance(config, _CONFIGS[choice]):
        raise ValueError(f"arrow_attention: implementation={choice!r} takes a {_CONFIGS[choice].__name__} config, "
                         f"got {type(config).__name__}")
    if choice != "auto":
        return choice
    if isinstance(config, TritonConfig):
        return "triton"
    if isinstance(config, MosaicGpuConfig):
        return "mosaic_gpu"
    if config is not None:
        raise ValueError(f"arrow_attention: config must be a TritonConfig (Triton) or MosaicGpuConfig (Mosaic GPU), "
                         f"got {type(config).__name__}")
    if interpret:
        return "triton"
    if mosaic_gpu.supported(q):
        return "mosaic_gpu"
    return "triton" if _on_gpu() else "xla"


def arrow_schedules(q, half_windows, *, text_len: int, text_first: bool, has_cache: bool,
                    implementation: str | None = None, config=None, interpret: bool = False):
    """Launch schedules of many :func:`arrow_attention` calls on q's shape and layout, computed at once:
    half_windows int32 [L, H] -> an array [L, ...] whose row l goes to the call with ``half_windows[l]`` as
    ``schedule=``, or None where the resolved implementation needs none (Triton derives its order in the kernel;
    the reference has none). The Mosaic GPU kernel's per-call program table is otherwise computed in each call: a
    sampler step with a schedule per layer compiles one set of small XLA kernels instead of one per layer. Pass
    the same ``implementation``, ``config`` and ``interpret`` as the calls."""
    if resolve_implementation(q, implementation, interpret=interpret, config=config) != "mosaic_gpu":
        return None
    return mosaic_gpu.schedules(q, half_windows, text_len=text_len, text_first=text_first, has_cache=has_cache,
                                config=config)


def cache_length(q, implementation: str | None = None, *, config=None, interpret: bool = False) -> int:
    """The rows of a ``cache`` that :func:`arrow_attention` on ``q`` (an array or ``jax.ShapeDtypeStruct``
    [B, S, H, D]) updates in place with no copy: the Mosaic GPU kernel's padded length (S rounded up to its
    tiles, :func:`pallas_kernels.mosaic_gpu.padded_length`), else S. A caller that carries a cache from call to
    call (a sampler's head cache) keeps it this long: the output then has the same rows, ready to be carried
    again. Pass the same ``implementation``, ``config`` and ``interpret`` as the calls."""
    if resolve_implementation(q, implementation, interpret=interpret, config=config) != "mosaic_gpu":
        return int(q.shape[1])
    return mosaic_gpu.padded_length(q.shape, config)


def arrow_attention(q, k, v, half_window, *, text_len: int, text_first: bool, cache=None, sm_scale=None,
                    implementation: str | None = None, config=None, schedule=None, interpret: bool = False):
    """Arrow attention with per-head half-windows: q, k, v [B, S, H, D] -> [B, S, H, D].

    half_window: int32 [H], runtime data: −1 full, 0 cached when ``cache`` is given (else a band of width 0, see
    :mod:`pallas_kernels.reference`), w > 0 arrow band over the image tokens. cache: [B, S, H, D], or longer
    [B, S' > S, H, D] (rows from S on ignored): the output then has S' rows, its rows from S on unspecified; at
    :func:`cache_length` rows the kernel writes it in place with no padded copy. text_first: FLUX [text, image] when
    True, SD3 [image, text] when False. sm_scale defaults to D ** −0.5.

    implementation: one of :data:`IMPLEMENTATIONS` (:func:`resolve_implementation`). config: the backend's
    :class:`TritonConfig` / :class:`MosaicGpuConfig` (its type picks the backend under "auto"); a Triton call
    without config takes the autotuned choice cached on disk for this shape and device
    (:func:`pallas_kernels.autotune`), else the heuristic. ``schedule``: this call's row of
    :func:`arrow_schedules` (same implementation, config and interpret flag), or None to compute it here.
    interpret=True runs a kernel on CPU (tests). "xla" ignores config, schedule and interpret.
    """
    validate(q, k, v, half_window, text_len, cache, kernel=False)
    impl = resolve_implementation(q, implementation, interpret=interpret, config=config)
    if impl == "xla":
        return arrow_attention_reference(q, k, v, half_window, text_len=text_len, text_first=text_first, cache=cache,
                                         sm_scale=sm_scale)
    if impl == "mosaic_gpu":
        return mosaic_gpu.arrow_attention_mosaic_gpu(q, k, v, half_window, text_len=text_len, text_first=text_first,
                                                     cache=cache, sm_scale=sm_scale, interpret=interpret,
                                                     config=config, schedule=schedule)
    if config is None:
        _, s, _, d = q.shape
        config = (None if interpret else tuned_config(q.shape, q.dtype, text_len, text_first)) or \
            triton.heuristic_config(s, d, q.dtype)
    return triton.arrow_attention_triton(q, k, v, half_window, text_len=text_len, text_first=text_first, cache=cache,
                                         sm_scale=sm_scale, interpret=interpret, config=config)
