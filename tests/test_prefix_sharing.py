"""Prefix sharing (data.collate_shared): one row a pair, prompt + chosen + rejected, computes
the very log-probs and gradients of the two-row forward (data.collate), on models with
absolute positions (GPT-2, Conv1D) and rotary ones (Llama, Gemma 3, ...), in both attention
implementations that take the block mask. Where a model cannot take it, the run says so once
and reads two rows."""
import functools

import pytest
import torch
from hypothesis import given, settings, strategies as st

import data
import lora
import models
from conftest import FAMILIES, tiny_gemma3, with_nonzero_adapters
from settings import TrainConfig

MODELS = {**FAMILIES, "gemma3": tiny_gemma3}
VOCAB = 64


@functools.cache
def adapted_model(family: str, attention: str):
    """A tiny model of the family with LoRA adapters whose B is nonzero (so they matter)."""
    model = MODELS[family]()
    model.set_attn_implementation(attention)
    return with_nonzero_adapters(model)


def token_lists(min_size: int, max_size: int):
    return st.lists(st.integers(0, VOCAB - 2), min_size=min_size, max_size=max_size)


pairs = st.lists(st.builds(data.TokenizedPair, token_lists(1, 12), token_lists(1, 10), token_lists(1, 10)),
                 min_size=1, max_size=4)


def both_layouts(model, items, pad_id):
    """(two-row log-probs, shared-row log-probs) of the same pairs, and the two batches."""
    index = list(range(len(items)))
    two_rows, shared = data.collate(items, index, pad_id), data.collate_shared(items, index, pad_id)
    return models.batch_logps(model, two_rows), models.batch_logps(model, shared), two_rows, shared


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", MODELS)
@settings(max_examples=15, deadline=None)
@given(items=pairs, pad_id=st.sampled_from([0, VOCAB - 1]))
def test_one_shared_row_a_pair_gives_the_log_probs_of_two_rows(family, attention, items, pad_id):
    """Any prompt and response lengths, any padding, any batch size: the same sum, mean and
    count for every chosen and rejected sequence."""
    model = adapted_model(family, attention)
    with torch.no_grad():
        two_rows, shared, two_row_batch, shared_batch = both_layouts(model, items, pad_id)
    torch.testing.assert_close(shared.sum, two_rows.sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared.mean, two_rows.mean, rtol=1e-5, atol=1e-5)
    assert torch.equal(shared.count, two_rows.count)
    assert shared_batch.sequence_tokens == int(two_row_batch.attention_mask.sum())


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
@settings(max_examples=10, deadline=None)
@given(items=pairs)
def test_one_shared_row_a_pair_gives_the_gradients_of_two_rows(family, items):
    """The DPO-shaped objective (chosen minus rejected) backpropagates to the same adapter
    gradients through both layouts."""
    model = adapted_model(family, "sdpa")
    gradients = []
    for collate in (data.collate, data.collate_shared):
        model.zero_grad(set_to_none=True)
        chosen, rejected = models.batch_logps(model, collate(items, list(range(len(items))), 0)).sum.chunk(2)
        (chosen - rejected).sum().backward()
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-4, atol=1e-5)


def test_the_shared_row_holds_the_prompt_once_with_its_positions_mask_and_scored_tokens():
    """A worked example: prompt [1, 2, 3], chosen [4, 5], rejected [6, 7, 8], and a shorter pair."""
    items = [data.TokenizedPair([1, 2, 3], [4, 5], [6, 7, 8]), data.TokenizedPair([1], [9], [10])]
    batch = data.collate_shared(items, [0, 1], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8], [1, 9, 10, 0, 0, 0, 0, 0]]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]  # rejected starts where chosen did
    seen = batch.attention_mask[0, 0].int().tolist()  # query row t: which keys it sees
    assert seen[4] == [1, 1, 1, 1, 1, 0, 0, 0]       # chosen's 5: the prompt and chosen up to itself
    assert seen[7] == [1, 1, 1, 0, 0, 1, 1, 1]       # rejected's 8: the prompt and rejected, never chosen
    assert batch.attention_mask[1, 0, 5].int().tolist() == [0, 0, 0, 0, 0, 1, 0, 0]  # padding sees itself only
    # sequences 0, 1 chosen; 2, 3 rejected: the hidden state at source predicts the target
    assert batch.source[0].tolist() == [2, 3, 0] and batch.targets[0].tolist()[:2] == [4, 5]
    assert batch.source[2].tolist() == [2, 5, 6] and batch.targets[2].tolist() == [6, 7, 8]
    assert batch.source[3][:1].tolist() == [0] and batch.targets[3][:1].tolist() == [10]
    assert batch.target_mask.sum(-1).tolist() == [2, 1, 3, 1]
    assert batch.sequence_tokens == (3 + 2) + (3 + 3) + (1 + 1) + (1 + 1)


def tiny_of(config_class, model_class, **settings):
    torch.manual_seed(0)
    return model_class(config_class(vocab_size=VOCAB, max_position_embeddings=128, **settings)).eval()


def windowed_gpt_neo(window_size=16):
    """GPT-Neo's local attention: its window is config.window_size (not sliding_window), applied by
    column inside the attention, so a shared row longer than it loses prompt keys that two rows see."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM
    return tiny_of(GPTNeoConfig, GPTNeoForCausalLM, hidden_size=32, num_layers=2, num_heads=2,
                   window_size=window_size, attention_types=[[["global", "local"], 1]])


def gpt_neo_window_past_a_whole_prompt():
    """A window of 80 at max length 48: longer than prompt + two answers of a whole prompt
    (24 + 2 x 24 = 72), shorter than the row of a one-token prompt and two answers of 47 (95)."""
    return windowed_gpt_neo(window_size=80)


def alibi_falcon():
    """Falcon with ALiBi builds its positions from the mask: a (R, 1, T, T) block mask crashes it."""
    from transformers import FalconConfig, FalconForCausalLM
    return tiny_of(FalconConfig, FalconForCausalLM, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   alibi=True)


def scaled_cohere():
    """Cohere multiplies its logits by logit_scale: log_softmax(lm_head(h)) is not its output."""
    from transformers import CohereConfig, CohereForCausalLM
    return tiny_of(CohereConfig, CohereForCausalLM, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1, logit_scale=0.0625)


def scaled_granite():
    """Granite divides its logits by logits_scaling."""
    from transformers import GraniteConfig, GraniteForCausalLM
    return tiny_of(GraniteConfig, GraniteForCausalLM, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1, logits_scaling=8.0)


def capped_gemma2():
    """Gemma 2 caps its logits (tanh soft-cap), which models.output_layer applies: the probe agrees."""
    from transformers import Gemma2Config, Gemma2ForCausalLM
    return tiny_of(Gemma2Config, Gemma2ForCausalLM, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=3.0)


def short_window_gemma3():
    return tiny_gemma3(sliding_window=16)


@pytest.mark.parametrize("make, layout, said", [
    *[(MODELS[family], "shared", None) for family in MODELS],
    (capped_gemma2, "shared", None),
    (windowed_gpt_neo, "two rows", "one shared row a pair gives other log-probs than the model's own forward"),
    (gpt_neo_window_past_a_whole_prompt, "two rows", "one shared row a pair gives other log-probs than the model's"),
    (short_window_gemma3, "two rows", "one shared row a pair gives other log-probs than the model's own forward"),
    (alibi_falcon, "two rows", "one shared row a pair fails on this model (ValueError: too many values to unpack"),
    (scaled_cohere, "logits", "log_softmax(lm_head(hidden)) is not this model's output"),
    (scaled_granite, "logits", "log_softmax(lm_head(hidden)) is not this model's output"),
], ids=[*MODELS, "gemma2 soft-cap", "gpt_neo window", "gpt_neo window 80", "gemma3 short window", "falcon alibi", "cohere logit_scale",
        "granite logits_scaling"])
def test_the_run_measures_which_layout_gives_its_models_own_log_probs_and_says_so_once(make, layout, said):
    """Verify, don't enumerate: the probe, not a list of config names, decides. Whatever it picks,
    the run's log-probs are the model's own (model(...).logits), in fp32 and in bf16 weights alike."""
    model, announced = make(), []
    config = TrainConfig(max_length=48, max_prompt_length=24)
    collate = models.collate_function(config, model, pad_id=0, announce=announced.append)
    assert collate.func is (data.collate_shared if layout == "shared" else data.collate)
    assert model.scores_from_logits == (layout == "logits")
    assert len(announced) == (said is not None) and all(said in line for line in announced)
    items = [data.TokenizedPair(list(range(2)), list(range(46)), list(range(3, 49))),  # other lengths than the
             data.TokenizedPair(list(range(20)), list(range(9)), list(range(1, 5)))]    # probe's, the longest row too
    with torch.no_grad():
        own = models.own_logps(model, data.collate(items, [0, 1], 0)).sum
        torch.testing.assert_close(models.batch_logps(model, collate(items, [0, 1])).sum, own, rtol=1e-5, atol=1e-4)
    assert model.dtype == torch.float32 and models.probe_layout(model.to(torch.bfloat16), 48, 24, 0)[0] == layout
    assert model.dtype == torch.bfloat16  # the probe ran in fp32 and put the weights back


def test_sft_and_prefix_sharing_off_read_two_rows_silently_and_dpo_shares_the_prompt():
    model, said = tiny_gemma3(), []
    layout = lambda **overrides: models.collate_function(TrainConfig(max_length=48, max_prompt_length=24, **overrides),
                                                        model, 0, said.append).func
    assert layout() is data.collate_shared
    assert layout(loss_type="sft") is data.collate and layout(prefix_sharing=False) is data.collate
    assert said == []


def test_the_probe_puts_every_weight_back_bit_for_bit_in_its_own_dtype():
    model = MODELS["gpt2"]().to(torch.bfloat16)
    lora.add_lora(model, lora.LoRAConfig(r=4))  # A and B in fp32 beside bf16 weights
    before = {name: (tensor.dtype, tensor.clone()) for name, tensor in model.state_dict().items()}
    parameters = list(model.parameters())
    assert models.probe_layout(model, 48, 24, 0)[0] == "shared"
    after = model.state_dict()
    assert all(after[name].dtype == dtype and torch.equal(after[name], value) for name, (dtype, value) in before.items())
    assert any(dtype == torch.float32 for dtype, _ in before.values()) and list(model.parameters()) == parameters


def test_the_probe_reads_the_vocabulary_when_lora_wraps_the_output_layer():
    model = MODELS["llama"]()
    lora.add_lora(model, lora.LoRAConfig(r=4, targets=("q_proj", "lm_head")))
    assert models.probe_layout(model, 48, 24, 0)[0] == "shared"
