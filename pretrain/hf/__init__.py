"""Hugging Face interoperability: export our checkpoints as ``transformers`` models, import public ones.

``export`` / ``importer`` are the CLI commands, ``mapping`` holds the weight tables both use, ``configs`` the
config translation, ``tokenizer`` the sentencepiece -> HF tokenizer conversion, ``smollm2`` a real pretrained
model for tests.
"""
