"""Encoder-only masked language models: BERT, RoBERTa and a ModernBERT-style encoder, as one family.

``config`` (the YAML ``model`` section, ``flavour`` picks the architecture), ``model``, ``parallelize``
(tensor-parallel sizes, activation checkpointing, pipeline cut), ``hf`` (Hugging Face mapping: BertForMaskedLM,
RobertaForMaskedLM, ModernBertForMaskedLM); ``spec`` ties them into the family's
:class:`~pretrain.models.spec.ModelSpec`, registered in :mod:`pretrain.models.registry` as ``encoder``.
"""
