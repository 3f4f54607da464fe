"""T5 v1.1 encoder-decoder (relative position buckets, RMSNorm, gated-GELU, no biases); Switch by config.

``config`` (the YAML ``model`` section), ``model``, ``parallelize`` (tensor-parallel sizes, activation
checkpointing, pipeline cut), ``hf`` (Hugging Face mapping); ``spec`` ties them into the family's
:class:`~pretrain.models.spec.ModelSpec`, registered in :mod:`pretrain.models.registry`.
"""
