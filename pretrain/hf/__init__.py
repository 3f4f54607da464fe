"""Hugging Face interoperability: export our checkpoints as ``transformers`` models, import public ones.

``export`` / ``importer`` are the CLI commands; each model family's spec brings its own config translation and
weight tables (``pretrain/models/<family>/hf.py``), made of ``mapping``'s rules and ``configs``' checks;
``tokenizer`` the sentencepiece -> HF tokenizer conversion, ``smollm2`` a real pretrained
model for tests.
"""
