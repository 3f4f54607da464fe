"""Decoder-only GPT: Llama flavour (RMSNorm, RoPE, SwiGLU, GQA) or GPT-2 flavour (LayerNorm, learned positions).

``config`` (the YAML ``model`` section), ``model``, ``parallelize`` (tensor-parallel sizes, activation
checkpointing, pipeline cut), ``hf`` (Hugging Face mapping); ``spec`` ties them into the family's
:class:`~pretrain.models.spec.ModelSpec`, registered in :mod:`pretrain.models.registry`.
"""
