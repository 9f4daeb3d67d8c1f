"""Tiny random models: fast, offline, and real transformers architectures. Every test runs in a
folder of its own (in_a_folder_of_its_own): never in the clone, whatever a user has run there."""
import string

import pytest
import torch

import lora
from gpt2_offline import gpt2_tokenizer  # noqa: F401 (the tests import it from here)
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM,
                          OPTConfig, OPTForCausalLM, PhimoeConfig, PhimoeForCausalLM, Qwen2Config, Qwen2ForCausalLM)


@pytest.fixture(autouse=True)
def in_a_folder_of_its_own(tmp_path_factory, monkeypatch):
    """The working directory of every test is a new empty folder: the programs' default paths
    (checkpoints/, judgements.jsonl, runs/) are then the test's own, not those a user's runs
    left in the clone, which a test must neither read nor write."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


def tiny(model_class, config, seed: int):
    torch.manual_seed(seed)
    return model_class(config).eval()


def with_nonzero_adapters(model):
    """The model with LoRA adapters (r = 4) whose B is nonzero, drawn from a generator of its own: they matter."""
    lora.add_lora(model, lora.LoRAConfig(r=4))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.1)
    return model


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


def tiny_opt_layerdrop(seed: int = 0, vocab_size: int = 64) -> OPTForCausalLM:
    """OPT with layerdrop: in train mode each layer is skipped at random (no "dropout" in its name)."""
    return tiny(OPTForCausalLM, OPTConfig(vocab_size=vocab_size, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                          num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32,
                                          layerdrop=0.5), seed)


def tiny_phimoe(seed: int = 0, vocab_size: int = 64) -> PhimoeForCausalLM:
    """PhiMoE: in train mode its router jitters its input and samples experts (Gumbel); the
    router is an nn.Linear whose forward returns a tuple, and its experts are no nn.Linear."""
    return tiny(PhimoeForCausalLM, PhimoeConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                                                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                                max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2,
                                                input_jitter_noise=0.01, router_jitter_noise=0.01), seed)


def sentencepiece_style_tokenizer(add_bos: bool = True, add_eos: bool = False, add_prefix_space: bool = True,
                                  merges: tuple = (), chat_template: str | None = None):
    """A Llama-style tokenizer (SentencePiece's Metaspace, byte fallback) with a character
    vocabulary, built here: add_eos as some Llama/Mistral fine-tunes ship it ("add_eos_token":
    true), add_prefix_space as SentencePiece's dummy prefix, merges to make tokens across a seam."""
    from transformers import LlamaTokenizer
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for piece in ["\u2581", *string.printable, *("".join(merge) for merge in merges)]:
        vocab.setdefault(piece, len(vocab))
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    tokenizer = LlamaTokenizer(vocab=vocab, merges=list(merges), add_bos_token=add_bos, add_eos_token=add_eos,
                               add_prefix_space=add_prefix_space)
    tokenizer.chat_template = chat_template
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# Causal LMs of five families, tiny and random: Conv1D, Llama-style names, and three by module type.
FAMILIES = {"gpt2": tiny_gpt2, "llama": tiny_llama, "gpt_neox": tiny_neox, "qwen2": tiny_qwen2, "opt": tiny_opt}


@pytest.fixture
def gpt2_model():
    return tiny_gpt2()


@pytest.fixture
def llama_model():
    return tiny_llama()


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    """A local model folder: tiny random GPT-2 weights with the real GPT-2 tokenizer."""
    path = tmp_path_factory.mktemp("tiny-gpt2")
    tiny_gpt2(vocab_size=50257).save_pretrained(path)
    gpt2_tokenizer().save_pretrained(path)
    return str(path)

