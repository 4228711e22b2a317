"""The plan room: the plan file (:mod:`.format`: :class:`Plan`), the methods it names (:mod:`.methods`), the
attention FLOPs a plan keeps (:mod:`.flops`), summaries and heat-maps (:mod:`.report`) and the official
DiTFastAttn file import/export (:mod:`.official`). Plans are data: nothing here imports the models' runtime,
the sampler or the solver."""

from dfa2_jax.plan.format import (DEFAULT_TEXT_TOKENS, FORMAT, TEXT_POSITION, VERSION, Plan, PlanError, image_tokens,
                                  model_info_for)

__all__ = ["Plan", "PlanError", "model_info_for", "image_tokens", "FORMAT", "VERSION", "DEFAULT_TEXT_TOKENS",
           "TEXT_POSITION"]
