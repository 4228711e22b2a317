"""The package's only contact with jax internals (``jax._src``), kept in one place so that a jax upgrade that
moves a name breaks here, loudly, and is fixed here (tests/test_arrow_kernel_mgpu.py checks it on the installed
jax)."""

from __future__ import annotations

import jax


def interpret_gpu_params_class() -> type:
    """The parameters class of Mosaic GPU interpret mode (CPU simulation of shared memory, warpgroups, barriers
    and TMA). jax 0.10–0.11 do not export it from ``jax.experimental.pallas.mosaic_gpu``: the public name is
    taken if a later jax has it, else the private module. Raises NotImplementedError naming the jax version if
    neither exists."""
    try:
        from jax.experimental.pallas import mosaic_gpu as plgpu

        cls = getattr(plgpu, "InterpretGPUParams", None)
    except ImportError:  # pragma: no cover - a jax without Mosaic GPU
        cls = None
    if cls is not None:
        return cls
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError as e:
        raise NotImplementedError(
            f"this jax ({jax.__version__}) has no Mosaic GPU interpret mode: neither "
            "jax.experimental.pallas.mosaic_gpu.InterpretGPUParams nor "
            "jax._src.pallas.mosaic_gpu.interpret.params.InterpretGPUParams exists "
            "(update pallas_kernels/_jax_compat.py)") from e
    return InterpretGPUParams


def interpret_gpu_params():
    """Default Mosaic GPU interpret-mode parameters (``interpret=`` of ``pl.kernel`` with a Mosaic GPU mesh)."""
    return interpret_gpu_params_class()()
