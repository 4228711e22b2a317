"""Arrow attention (DiTFastAttnV2's head-wise arrow mask) as a standalone op with one Pallas kernel per backend.

``arrow_attention(q, k, v, half_window, text_len=..., text_first=..., implementation=...)`` runs the Mosaic GPU
kernel (Hopper), the Pallas-Triton kernel (other NVIDIA GPUs, or interpret mode on CPU) or the pure-jnp reference
("xla"); see :mod:`pallas_kernels.api`. Modules: ``api`` (dispatch), ``reference`` (the arrow mask and the jnp
reference), ``common`` (validation, visit schedule, launch order), ``triton`` and ``mosaic_gpu`` (one backend
each, with its frozen config), ``tuning`` (the Triton autotuner and its disk cache).
"""

from .api import IMPLEMENTATIONS, arrow_attention, arrow_schedules, cache_length, resolve_implementation
from .mosaic_gpu import MosaicGpuConfig
from .reference import arrow_attention_reference, arrow_mask, token_roles
from .triton import TritonConfig
from .tuning import autotune, tune_cache_path

__all__ = ["IMPLEMENTATIONS", "MosaicGpuConfig", "TritonConfig", "arrow_attention", "arrow_attention_reference",
           "arrow_mask", "arrow_schedules", "autotune", "cache_length", "resolve_implementation", "token_roles",
           "tune_cache_path"]
