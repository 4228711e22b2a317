"""Image-quality metrics that need learned weights, read from local files (never downloaded):
:mod:`dfa2_jax.metrics.lpips` (LPIPS v0.1, AlexNet / VGG16) and :mod:`dfa2_jax.metrics.clip_score` (CLIP score
with a transformers ``CLIPModel`` folder). ``dfa2 eval`` finds them under ``--metrics-dir`` /
``$DFA2_METRICS_DIR`` (:func:`dfa2_jax.evaluate.metrics_status`)."""
