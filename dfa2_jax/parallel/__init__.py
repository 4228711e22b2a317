"""Several devices: the mesh vocabulary and per-device attention (:mod:`.mesh`, imported by the models) and the
sharded sampler (:mod:`.sharded`: :func:`~dfa2_jax.parallel.sharded.shard_denoise`). Nothing is imported here,
so that the models can import :mod:`.mesh` without pulling in the sampler."""
