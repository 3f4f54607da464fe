"""A random-init Hugging Face Llama with a byte-level BPE tokenizer trained on given text.

The reference model for parity tests and benchmarks against lm-evaluation-harness's ``hf`` backend: any HF
causal LM works there, and one built here needs no model hub. The tokenizer adds BOS like Llama's.
"""

from __future__ import annotations

from pathlib import Path

import torch


def random_hf_llama(out: Path, texts: list[str], vocab_size: int, hidden_size: int, intermediate_size: int,
                    num_layers: int, num_heads: int, num_kv_heads: int, max_positions: int, seed: int = 0) -> Path:
    """Train the tokenizer on ``texts``, draw the model from ``seed``, save both to ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                      max_position_embeddings=max_positions, bos_token_id=0, eos_token_id=1,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(out)
    return out
