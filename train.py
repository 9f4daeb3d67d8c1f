"""DPO training of LoRA adapters on Anthropic HH-RLHF preference pairs.

    python train.py --beta 0.1

A step: batch -> one forward of chosen and rejected together -> DPO loss against cached
reference log-probs -> backward -> clip -> AdamW step -> learning-rate schedule. The
reference model is the same network with its adapters switched off (lora.adapters_disabled).
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import Tensor, nn

import dpo
import lora

ASSISTANT = "\n\nAssistant:"
CHECKPOINT_FORMAT = "dpo-lora/1"


class DataError(ValueError):
    """Bad input data: the message names the file and line."""


@dataclass
class TrainConfig:
    # data
    data: str | None = None            # local .jsonl/.jsonl.gz pairs file; None = Anthropic/hh-rlhf from the Hub
    data_dir: str = "harmless-base"    # Hub subset of Anthropic/hh-rlhf (harmless-base, helpful-base, ...)
    num_examples: int | None = None    # use only the first N training pairs
    val_size: int = 200                # held-out validation pairs
    skip_bad_lines: bool = False       # count and skip malformed lines instead of stopping
    max_length: int = 256              # prompt + response tokens per sequence
    max_prompt_length: int = 128       # prompt tokens kept (the last ones)
    # model and adapters
    model: str = "gpt2"                # Hub id, local model folder, or local .gguf file
    dtype: str = "bfloat16"            # base weights: bfloat16 (run under autocast, fast on CPU) or float32; log-probs fp32
    lora_r: int = 8                    # LoRA rank
    lora_alpha: float = 16.0           # LoRA scale alpha (update multiplied by alpha / r)
    lora_dropout: float = 0.0          # dropout on the adapter input
    lora_targets: str = ""             # comma-separated module names; empty = architecture defaults
    # objective
    beta: float = 0.1                  # DPO temperature: strength of the pull towards the reference
    label_smoothing: float = 0.0       # conservative DPO eps in [0, 0.5)
    loss_type: str = "sigmoid"         # sigmoid (DPO) or ipo
    # optimisation
    lr: float = 5e-4                   # peak learning rate (LoRA needs far more than full fine-tuning)
    batch_size: int = 4                # pairs per micro-batch
    grad_accum: int = 1                # micro-batches per optimizer step
    epochs: int = 1                    # passes over the training pairs
    max_steps: int | None = None       # stop after this many optimizer steps
    warmup_steps: int = 10             # linear warmup steps
    schedule: str = "cosine"           # after warmup: constant or cosine decay to 0
    weight_decay: float = 0.0          # AdamW weight decay
    max_grad_norm: float = 1.0         # gradient clipping
    seed: int = 0                      # data split, data order, LoRA init
    threads: int = 0                   # CPU threads for torch; 0 = torch's default (on a busy machine fewer is faster)
    # evaluation and checkpoints
    eval_every: int = 25               # validate every N optimizer steps
    early_stop_patience: int = 0       # stop after N validations without a lower loss; 0 = never
    checkpoint_dir: str = "checkpoints"  # best.pt, last.pt, metrics.jsonl, curves.png
    checkpoint_every: int = 25         # write last.pt every N steps
    resume: str | None = None          # continue the run saved in this last.pt
    progress: bool = True              # show a progress bar


# ---------------------------------------------------------------------------------------
# Data: records -> (prompt, chosen, rejected) -> token ids
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pair:
    prompt: str    # the dialogue up to and including the last "\n\nAssistant:"
    chosen: str    # y_w, the answer people preferred
    rejected: str  # y_l


def split_prompt(chosen: str, rejected: str) -> Pair | str:
    """Split an HH-RLHF record into prompt and two responses, or say why it is dropped.

    The prompt ends at the *last* "\\n\\nAssistant:" (not at a longest common prefix, which
    can run on into words both answers share; PITFALLS 1).
    """
    cut = chosen.rfind(ASSISTANT)
    if cut < 0:
        return "no Assistant turn"
    prompt = chosen[:cut + len(ASSISTANT)]
    if not rejected.startswith(prompt) or ASSISTANT in rejected[len(prompt):]:
        return "prompts differ"
    chosen_response, rejected_response = chosen[len(prompt):], rejected[len(prompt):]
    if not chosen_response.strip() or not rejected_response.strip():
        return "empty response"
    if chosen_response == rejected_response:
        return "identical responses"
    return Pair(prompt, chosen_response, rejected_response)


def bad_line(message: str, skip_bad_lines: bool, counts: dict) -> None:
    """Stop with file:line and the reason, or (--skip-bad-lines) count the line as dropped."""
    if not skip_bad_lines:
        raise DataError(message)
    counts["malformed line"] = counts.get("malformed line", 0) + 1


def read_jsonl(path: str, skip_bad_lines: bool, counts: dict) -> Iterator[tuple[int, dict]]:
    """(line number, record) from a .jsonl or .jsonl.gz file; bad lines stop with file:line."""
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    opener = gzip.open if path.endswith(".gz") else open
    line_no = 0
    try:
        with opener(path, "rb") as lines:
            for line_no, raw in enumerate(lines, 1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw.decode("utf-8"))
                    if not isinstance(record, dict):
                        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
                except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError; absurd nesting
                    bad_line(f"{path}:{line_no}: malformed line ({error})", skip_bad_lines, counts)
                    continue
                yield line_no, record
    except (OSError, EOFError) as error:  # truncated or corrupt gzip
        raise DataError(f"{path}:{line_no + 1}: cannot read ({error})") from None


def records_to_pairs(records: Iterable[tuple[int, dict]], source: str, skip_bad_lines: bool,
                     counts: dict) -> list[Pair]:
    """The one path every record takes, from a local file or from the Hub."""
    pairs = []
    for line_no, record in records:
        chosen, rejected = record.get("chosen"), record.get("rejected")
        reason = None
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            reason = "'chosen' and 'rejected' must be strings"
        elif not is_valid_text(chosen + rejected):
            reason = "text is not valid Unicode (a lone surrogate escape)"
        if reason is not None:
            bad_line(f"{source}:{line_no}: malformed record ({reason})", skip_bad_lines, counts)
            continue
        pair = split_prompt(chosen, rejected)
        if isinstance(pair, str):
            counts[pair] = counts.get(pair, 0) + 1
        else:
            pairs.append(pair)
    return pairs


def is_valid_text(text: str) -> bool:
    """JSON may escape lone surrogates ("\\ud800") that no tokenizer can encode."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def load_pairs(data: str | None, data_dir: str = "harmless-base", split: str = "train",
               skip_bad_lines: bool = False, counts: dict | None = None) -> list[Pair]:
    """Pairs from a local .jsonl(.gz) file (data=path) or from Anthropic/hh-rlhf on the Hub."""
    counts = {} if counts is None else counts
    if data is not None:
        return records_to_pairs(read_jsonl(data, skip_bad_lines, counts), data, skip_bad_lines, counts)
    import datasets  # the Hub path only
    hub = datasets.load_dataset("Anthropic/hh-rlhf", data_dir=data_dir, split=split)
    return records_to_pairs(enumerate(hub, 1), f"Anthropic/hh-rlhf/{data_dir}/{split}", skip_bad_lines, counts)


def split_data(config: TrainConfig, counts: dict | None = None) -> tuple[list[Pair], list[Pair]]:
    """(train, validation). One local file: a seeded held-out split. Hub: its train and test splits."""
    counts = {} if counts is None else counts
    if config.data is not None:
        pairs = load_pairs(config.data, skip_bad_lines=config.skip_bad_lines, counts=counts)
        random.Random(config.seed).shuffle(pairs)
        if len(pairs) <= config.val_size:
            raise DataError(f"{config.data}: {len(pairs)} usable pairs, not enough for {config.val_size} validation pairs")
        validation, train_pairs = pairs[:config.val_size], pairs[config.val_size:]
    else:
        train_pairs = load_pairs(None, config.data_dir, "train", config.skip_bad_lines, counts)
        validation = load_pairs(None, config.data_dir, "test", config.skip_bad_lines, counts)
        random.Random(config.seed).shuffle(validation)
        validation = validation[:config.val_size]
    if config.num_examples is not None:
        train_pairs = train_pairs[:config.num_examples]
    return train_pairs, validation


def held_out_pairs(config: dict) -> list[Pair]:
    """The validation pairs of a run, from the config dict saved in its checkpoint."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return split_data(TrainConfig(**{k: v for k, v in config.items() if k in fields}))[1]


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def keep_prompt_end(prompt_ids: list[int], bos_token_id: int | None, max_prompt_length: int) -> list[int]:
    """The prompt's BOS (if the tokenizer adds one) and its last tokens: the turns that matter."""
    bos = prompt_ids[:1] if prompt_ids and prompt_ids[0] == bos_token_id else []
    return bos + prompt_ids[len(bos):][-(max_prompt_length - len(bos)):]


def tokenize_pair(pair: Pair, tokenizer, max_length: int, max_prompt_length: int) -> TokenizedPair | str:
    """Token ids of prompt and responses, tokenised *separately* (PITFALLS 1), or a drop reason.

    The prompt keeps its last max_prompt_length tokens (the turns that matter, PITFALLS 11)
    and its BOS if the tokenizer adds one; responses get EOS (PITFALLS 2) and keep their
    start. A response cut by max_length loses its EOS: it did not end there.
    """
    prompt_ids = keep_prompt_end(tokenizer(pair.prompt).input_ids, tokenizer.bos_token_id, max_prompt_length)
    budget = max_length - len(prompt_ids)
    eos = [tokenizer.eos_token_id]
    chosen_ids = (tokenizer(pair.chosen, add_special_tokens=False).input_ids + eos)[:budget]
    rejected_ids = (tokenizer(pair.rejected, add_special_tokens=False).input_ids + eos)[:budget]
    if budget <= 0 or not chosen_ids or not rejected_ids:
        return "no response token left after truncation"
    return TokenizedPair(prompt_ids, chosen_ids, rejected_ids)


def tokenize_pairs(pairs: list[Pair], tokenizer, config: TrainConfig, counts: dict) -> list[TokenizedPair]:
    tokenized = []
    for pair in pairs:
        item = tokenize_pair(pair, tokenizer, config.max_length, config.max_prompt_length)
        if isinstance(item, str):
            counts[item] = counts.get(item, 0) + 1
        else:
            tokenized.append(item)
    return tokenized


@dataclass
class Batch:
    input_ids: Tensor       # (2B, T): B chosen sequences, then their B rejected ones
    attention_mask: Tensor  # (2B, T): 1 on prompt and response, 0 on padding
    response_mask: Tensor   # (2B, T): True on response tokens only (EOS included)
    index: Tensor           # (B,): which pairs, for the reference cache


def collate(items: list[TokenizedPair], index: list[int], pad_id: int) -> Batch:
    """Right-padded (PITFALLS 4): positions start at 0 in every row, as GPT-2's absolute
    position embeddings expect. Padding is found from lengths, never by comparing ids with
    pad_id, which may equal EOS (PITFALLS 2)."""
    sequences = [(it.prompt_ids, it.chosen_ids) for it in items] + [(it.prompt_ids, it.rejected_ids) for it in items]
    width = max(len(p) + len(r) for p, r in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    response_mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, (prompt, response) in enumerate(sequences):
        n = len(prompt) + len(response)
        input_ids[row, :n] = torch.tensor(prompt + response)
        attention_mask[row, :n] = 1
        response_mask[row, len(prompt):n] = True
    return Batch(input_ids, attention_mask, response_mask, torch.tensor(index))


def to_device(batch: Batch, device: torch.device) -> Batch:
    return Batch(batch.input_ids.to(device), batch.attention_mask.to(device), batch.response_mask.to(device), batch.index)


def epoch_batches(items: list[TokenizedPair], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch as lists of pair indices: a seeded shuffle, then pairs of similar
    length grouped into a batch (less padding), then the batches shuffled. A function of
    (seed, epoch) only, so a resumed run sees the same order."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(items)))
    rng.shuffle(order)
    length = lambda i: len(items[i].prompt_ids) + max(len(items[i].chosen_ids), len(items[i].rejected_ids))
    window = batch_size * 16  # sort within windows, so batches still mix the data
    order = [i for start in range(0, len(order), window) for i in sorted(order[start:start + window], key=length)]
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


# ---------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------

def load_model_and_tokenizer(name: str, dtype: str | torch.dtype = "float32"):
    """A Hub id, a local model folder, or a local .gguf file (transformers dequantises it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    name = str(name)
    looks_local = name.endswith(".gguf") or os.path.sep in name or name.startswith(".")
    if looks_local and not os.path.exists(name):
        raise FileNotFoundError(f"model not found: {name}")
    folder, gguf = (os.path.split(os.path.abspath(name)) if name.endswith(".gguf") else (name, None))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=dtype)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"cannot load model {name!r}: {str(error).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # only ever used as filler: masks come from lengths
    disable_dropout(model)
    return model.eval(), tokenizer


def disable_dropout(model: nn.Module) -> None:
    """The base model's dropout off (PITFALLS 3): with it, policy != reference at step 0."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    for name in ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout"):
        if hasattr(model.config, name):
            setattr(model.config, name, 0.0)


def output_layer(model: nn.Module):
    """hidden (N, H) -> logits (N, V), with the model's final logit soft-cap if it has one."""
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if not cap:
        return head
    return lambda hidden: torch.tanh(head(hidden) / cap) * cap


def batch_logps(model: nn.Module, batch: Batch) -> dpo.SequenceLogps:
    """log pi(y|x) of every sequence of the batch: one forward pass for chosen and rejected.

    With bf16 weights the forward runs under autocast, as mixed-precision training does: the
    matmuls in bf16, the precision-sensitive ops in fp32. Plain bf16 moved a Gemma loss by 0.02
    from fp32; autocast stays within 1e-3 of it and equals TRL's bf16 loss (bench/).
    """
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=model.dtype == torch.bfloat16):
        hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state  # (2B, T, H)
        return dpo.sequence_logps_from_hidden(hidden, output_layer(model), batch.input_ids, batch.response_mask)


class Scorer(nn.Module):
    """batch_logps as a module: the unit DistributedDataParallel wraps, so that backward
    averages the adapters' gradients across processes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return tuple(batch_logps(self.model, Batch(input_ids, attention_mask, response_mask, torch.empty(0))))


def loss_logps(logps: dpo.SequenceLogps, loss_type: str) -> Tensor:
    """DPO compares sums over the response; IPO compares per-token means (PITFALLS 6)."""
    return logps.mean if loss_type == "ipo" else logps.sum


class ReferenceCache:
    """Reference log-probs, computed once per pair: the reference never changes.

    values: (N, 2) for (chosen, rejected), NaN until computed. Saved in last.pt so a
    resumed run uses the very same numbers.
    """

    def __init__(self, size: int):
        self.values = torch.full((size, 2), float("nan"))

    @torch.no_grad()
    def get(self, model: nn.Module, batch: Batch, loss_type: str) -> tuple[Tensor, Tensor]:
        missing = self.values[batch.index].isnan().any(-1)
        if missing.any():
            # Same network, adapters off, no grad (PITFALLS 5). Computed for the whole
            # batch, stored only where missing.
            with lora.adapters_disabled(model):
                logps = loss_logps(batch_logps(model, batch), loss_type)   # (2B,)
            computed = torch.stack(logps.float().chunk(2), dim=-1).cpu()   # (B, 2)
            self.values[batch.index[missing]] = computed[missing]
        chosen, rejected = self.values[batch.index].to(batch.input_ids.device).unbind(-1)
        return chosen, rejected


def compute_loss(model: nn.Module, batch: Batch, reference: ReferenceCache, config: TrainConfig,
                 scorer: nn.Module | None = None) -> dpo.PreferenceLoss:
    """The DPO loss of a batch. scorer: the DDP-wrapped Scorer under torchrun; None = the model itself."""
    reference_chosen_logps, reference_rejected_logps = reference.get(model, batch, config.loss_type)
    if scorer is None:
        policy_logps = batch_logps(model, batch)
    else:
        policy_logps = dpo.SequenceLogps(*scorer(batch.input_ids, batch.attention_mask, batch.response_mask))
    policy_logps = loss_logps(policy_logps, config.loss_type)
    policy_chosen_logps, policy_rejected_logps = policy_logps.chunk(2)   # (B,) each
    return dpo.dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, config.beta, config.label_smoothing, config.loss_type)


# ---------------------------------------------------------------------------------------
# Schedule, evaluation, checkpoints
# ---------------------------------------------------------------------------------------

def learning_rate(step: int, peak_lr: float, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Linear warmup, then constant or cosine decay.

        warmup (s < W):  lr = peak * (s + 1) / W
        constant:        lr = peak
        cosine:          lr = peak * 0.5 * (1 + cos(pi * (s - W) / (S - W)))   for W <= s < S
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return peak_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def summarize(result: dpo.PreferenceLoss) -> dict:
    return {"loss": result.losses.mean().item(), "reward_accuracy": result.accuracies.mean().item(),
            "reward_margin": result.margins.mean().item(), "chosen_reward": result.chosen_rewards.mean().item(),
            "rejected_reward": result.rejected_rewards.mean().item()}


@torch.no_grad()
def evaluate(model: nn.Module, items: list[TokenizedPair], reference: ReferenceCache, config: TrainConfig,
             pad_id: int) -> dict:
    """Validation metrics over all held-out pairs (pairs weighted equally)."""
    results = []
    for start in range(0, len(items), config.batch_size):
        index = list(range(start, min(start + config.batch_size, len(items))))
        batch = to_device(collate([items[i] for i in index], index, pad_id), model.device)
        results.append(compute_loss(model, batch, reference, config))
    merged = dpo.PreferenceLoss(*(torch.cat(parts) for parts in zip(*results)))
    metrics = summarize(merged)
    metrics["n"] = len(items)
    return metrics


def save_atomic(payload: dict, path: Path) -> None:
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    temporary = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)


def load_checkpoint(path: str) -> dict:
    """A checkpoint of ours, loaded safely (weights_only=True), or one clear error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # pickle, zip and unpickler errors all mean "not a checkpoint"
        raise ValueError(f"{path} is not a checkpoint of this project ({type(error).__name__})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint of this project")
    return checkpoint


def lora_config_of(config: TrainConfig, model: nn.Module) -> lora.LoRAConfig:
    targets = tuple(t for t in config.lora_targets.split(",") if t) or lora.default_targets(model)
    return lora.LoRAConfig(config.lora_r, config.lora_alpha, config.lora_dropout, targets)


def load_policy(checkpoint: dict, dtype: str | torch.dtype = torch.float32):
    """The base model named in a checkpoint, with the checkpoint's adapters on it."""
    model, tokenizer = load_model_and_tokenizer(checkpoint["base_model"], dtype)
    settings = checkpoint["lora"]
    lora.add_lora(model, lora.LoRAConfig(settings["r"], settings["alpha"], settings["dropout"], tuple(settings["targets"])))
    lora.load_adapter_state_dict(model, checkpoint["adapters"])
    return model.eval(), tokenizer


def plot_curves(metrics_path: Path, png_path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if r["split"] == "train"]
    val_rows = [r for r in rows if r["split"] == "val"]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    window = max(1, len(train_rows) // 20)  # a few pairs a step are noisy: show a running mean too
    for axis, key in ((loss_axis, "loss"), (accuracy_axis, "reward_accuracy")):
        steps, values = [r["step"] for r in train_rows], [r[key] for r in train_rows]
        axis.plot(steps, values, "-", color="tab:blue", alpha=0.25, label="train")
        smooth = [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]
        axis.plot(steps, smooth, "-", color="tab:blue", label=f"train, mean of {window} steps")
        axis.plot([r["step"] for r in val_rows], [r[key] for r in val_rows], "o-", color="tab:orange", label="validation")
    loss_axis.axhline(math.log(2), color="grey", linestyle=":", label="log 2 (policy = reference)")
    accuracy_axis.axhline(0.5, color="grey", linestyle=":", label="chance")
    loss_axis.set(xlabel="optimizer step", ylabel="DPO loss", title="DPO loss")
    accuracy_axis.set(xlabel="optimizer step", ylabel="reward accuracy", title="implicit reward accuracy")
    loss_axis.legend(), accuracy_axis.legend()
    figure.tight_layout()
    figure.savefig(png_path, dpi=110)
    plt.close(figure)


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------

def validate_config(config: TrainConfig) -> None:
    checks = [
        (config.beta > 0, f"--beta must be > 0, got {config.beta}"),
        (config.lr > 0, f"--lr must be > 0, got {config.lr}"),
        (0 <= config.label_smoothing < 0.5, f"--label-smoothing must be in [0, 0.5), got {config.label_smoothing}"),
        (config.loss_type in dpo.LOSS_TYPES, f"--loss-type must be one of {dpo.LOSS_TYPES}"),
        (config.schedule in ("constant", "cosine"), "--schedule must be constant or cosine"),
        (config.dtype in ("float32", "bfloat16"), "--dtype must be float32 or bfloat16"),
        (0 < config.max_prompt_length < config.max_length, "--max-prompt-length must be in (0, --max-length)"),
        (config.batch_size >= 1 and config.grad_accum >= 1 and config.epochs >= 1, "--batch-size, --grad-accum and --epochs must be >= 1"),
        (config.val_size >= 1, "--val-size must be >= 1"),
        (config.threads >= 0, "--threads must be >= 0"),
        (config.eval_every >= 1 and config.checkpoint_every >= 1, "--eval-every and --checkpoint-every must be >= 1"),
        (config.warmup_steps >= 0 and config.early_stop_patience >= 0, "--warmup-steps and --early-stop-patience must be >= 0"),
        (config.max_steps is None or config.max_steps >= 1, "--max-steps must be >= 1"),
        (config.num_examples is None or config.num_examples >= 1, "--num-examples must be >= 1"),
        (config.lora_r >= 1 and 0 <= config.lora_dropout < 1, "--lora-r must be >= 1 and --lora-dropout in [0, 1)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss or gradient); the last good checkpoint stays."""


RESUMABLE = ("resume", "progress", "max_steps", "checkpoint_dir", "threads")  # what --resume may change


def config_for_resume(config: TrainConfig, checkpoint: dict) -> TrainConfig:
    """The saved run's config. A setting given on the command line that contradicts it is an
    error (another model, another LoRA shape...), not something to guess around."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = TrainConfig(**{k: v for k, v in checkpoint["config"].items() if k in names})
    defaults = TrainConfig()
    for name in names - set(RESUMABLE):
        given = getattr(config, name)
        if given != getattr(defaults, name) and given != getattr(saved, name):
            raise ValueError(f"{config.resume} was trained with --{name.replace('_', '-')} "
                             f"{getattr(saved, name)}, not {given}")
    resumed = dataclasses.replace(saved, **{k: getattr(config, k) for k in RESUMABLE})
    if config.checkpoint_dir == defaults.checkpoint_dir:  # not given: continue in the run's own folder
        resumed.checkpoint_dir = saved.checkpoint_dir
    return resumed


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun: gloo on CPU, NCCL on GPUs."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if world_size == 1:
        return 0, 1, device
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world_size, device


def mean_across_ranks(values: list[float], world_size: int) -> list[float]:
    if world_size == 1:
        return values
    import torch.distributed as dist
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return (tensor / world_size).tolist()


def any_rank(flag: bool, world_size: int) -> bool:
    """True on every rank if it is True on one: all ranks stop at the same step."""
    if world_size == 1:
        return flag
    import torch.distributed as dist
    tensor = torch.tensor([float(flag)])
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def train(config: TrainConfig) -> dict:
    """Train LoRA adapters with DPO; returns the final validation metrics and file paths.

    Under `torchrun --nproc_per_node N`, each rank takes its share of every global batch
    (batch_size pairs per rank), DDP averages the adapters' gradients, and rank 0 alone
    logs, validates and writes checkpoints.
    """
    validate_config(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    rank, world_size, device = setup_distributed()
    is_main = rank == 0
    resumed = load_checkpoint(config.resume) if config.resume else None
    if resumed is not None:
        config = config_for_resume(config, resumed)
    run_dir = Path(config.checkpoint_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)  # the same LoRA init on every rank

    counts: dict = {}
    train_pairs, val_pairs = split_data(config, counts)
    model, tokenizer = load_model_and_tokenizer(config.model, config.dtype)
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if positions is not None and config.max_length > positions:
        raise ValueError(f"--max-length {config.max_length} exceeds the model's {positions} positions")
    train_items = tokenize_pairs(train_pairs, tokenizer, config, counts)
    val_items = tokenize_pairs(val_pairs, tokenizer, config, counts)
    global_batch = config.batch_size * world_size  # pairs per micro-step, all ranks together
    if len(train_items) < global_batch or not val_items:
        raise DataError(f"too few usable pairs: {len(train_items)} train, {len(val_items)} validation (dropped: {counts})")
    lora_config = lora_config_of(config, model)
    trainable, total = lora.add_lora(model, lora_config)
    model.to(device)
    if is_main:
        log(f"data: {len(train_items)} train / {len(val_items)} validation pairs; dropped: {counts or 'none'}")
        log(f"model: {config.model} ({config.dtype}); LoRA r={lora_config.r} on {list(lora_config.targets)}: "
            f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")
        if world_size > 1:
            log(f"{world_size} processes: global batch {global_batch} x {config.grad_accum} accumulation")

    scorer = None
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel
        scorer = DistributedDataParallel(Scorer(model), broadcast_buffers=False)
    torch.manual_seed(config.seed + rank)  # LoRA dropout masks differ across ranks
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    train_reference, val_reference = ReferenceCache(len(train_items)), ReferenceCache(len(val_items))
    batches_per_epoch = len(train_items) // global_batch  # an incomplete last batch is left out
    total_steps = config.epochs * batches_per_epoch // config.grad_accum
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    step, best_val_loss, evals_without_improvement, val_metrics = 0, math.inf, 0, None
    if resumed is not None:
        lora.load_adapter_state_dict(model, resumed["adapters"])
        optimizer.load_state_dict(resumed["optimizer"])
        train_reference.values, val_reference.values = resumed["train_reference"], resumed["val_reference"]
        torch.set_rng_state(resumed["rng"])
        step, best_val_loss = resumed["step"], resumed["best_val_loss"]
        evals_without_improvement, val_metrics = resumed["evals_without_improvement"], resumed["val_metrics"]
        if is_main:
            truncate_metrics(run_dir / "metrics.jsonl", step)  # rows a crashed run wrote after its last checkpoint
            log(f"resumed from {config.resume} at step {step}")

    def checkpoint(extra: bool) -> dict:
        payload = {"format": CHECKPOINT_FORMAT, "base_model": config.model, "lora": lora.lora_config_dict(lora_config),
                   "adapters": lora.adapter_state_dict(model), "config": dataclasses.asdict(config), "step": step,
                   "val_metrics": val_metrics}
        if extra:  # everything a resumed run needs to continue exactly
            payload.update(optimizer=optimizer.state_dict(), rng=torch.get_rng_state(), best_val_loss=best_val_loss,
                           evals_without_improvement=evals_without_improvement,
                           train_reference=train_reference.values, val_reference=val_reference.values)
        return payload

    stop_requested = []  # Ctrl-C or SIGTERM: finish the current step, save, stop
    previous_handlers = {sig: signal.signal(sig, lambda *_: stop_requested.append(True))
                         for sig in (signal.SIGINT, signal.SIGTERM)}
    metrics_file = open(run_dir / "metrics.jsonl", "a") if is_main else None
    from tqdm import tqdm
    progress = tqdm(total=total_steps, initial=step, desc="DPO", disable=not (config.progress and is_main), dynamic_ncols=True)
    # The starting point. The policy forward repeats the reference's here on purpose: getting
    # loss log 2 and accuracy 0.5 on the real model proves policy == reference (PITFALLS 3, 5).
    if val_metrics is None and is_main:
        val_metrics = evaluate(model, val_items, val_reference, config, tokenizer.pad_token_id)
        write_metrics(metrics_file, {"step": 0, "split": "val", **val_metrics})
        log(f"step 0 validation: {format_metrics(val_metrics)}")
        best_val_loss = val_metrics["loss"]
        save_atomic(checkpoint(extra=False), run_dir / "best.pt")
    started, stopped_early, current_epoch = time.time(), False, None
    try:
        model.train()  # only LoRA dropout can act: the base model's dropout is off
        while step < total_steps:
            lr = learning_rate(step, config.lr, config.warmup_steps, total_steps, config.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_results = []
            for micro in range(config.grad_accum):
                epoch, offset = divmod(step * config.grad_accum + micro, batches_per_epoch)
                if epoch != current_epoch:
                    current_epoch, batches = epoch, epoch_batches(train_items, global_batch, config.seed, epoch)
                index = batches[offset][rank * config.batch_size:(rank + 1) * config.batch_size]  # this rank's share
                batch = to_device(collate([train_items[i] for i in index], index, tokenizer.pad_token_id), device)
                result = compute_loss(model, batch, train_reference, config, scorer)
                (result.losses.mean() / config.grad_accum).backward()  # mean over micro-batches (PITFALLS 12)
                step_results.append(result)
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
            train_metrics = summarize(dpo.PreferenceLoss(*(torch.cat(parts) for parts in zip(*step_results))))
            train_metrics = dict(zip(train_metrics, mean_across_ranks(list(train_metrics.values()), world_size)))
            if not (math.isfinite(train_metrics["loss"]) and torch.isfinite(grad_norm)):
                raise TrainingError(f"non-finite loss ({train_metrics['loss']}) or gradient norm ({grad_norm.item()}) "
                                    f"at step {step + 1}: stopped; the last good checkpoint is {run_dir / 'last.pt'} "
                                    f"(try a lower --lr)")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            progress.update(1)
            progress.set_postfix(loss=f"{train_metrics['loss']:.3f}", acc=f"{train_metrics['reward_accuracy']:.2f}", lr=f"{lr:.1e}")
            if is_main:
                write_metrics(metrics_file, {"step": step, "split": "train", "lr": lr, "grad_norm": grad_norm.item(), **train_metrics})
            if is_main and (step % config.eval_every == 0 or step == total_steps):
                model.eval()
                val_metrics = evaluate(model, val_items, val_reference, config, tokenizer.pad_token_id)
                model.train()
                write_metrics(metrics_file, {"step": step, "split": "val", **val_metrics})
                progress.write(f"step {step} validation: {format_metrics(val_metrics)}")
                if val_metrics["loss"] < best_val_loss:
                    best_val_loss, evals_without_improvement = val_metrics["loss"], 0
                    save_atomic(checkpoint(extra=False), run_dir / "best.pt")
                else:
                    evals_without_improvement += 1
                if config.early_stop_patience and evals_without_improvement >= config.early_stop_patience:
                    progress.write(f"early stop: {evals_without_improvement} validations without a lower loss")
                    stopped_early = True
            stopped_early = any_rank(stopped_early, world_size)
            interrupted = any_rank(bool(stop_requested), world_size)
            if is_main and (step % config.checkpoint_every == 0 or step == total_steps or stopped_early or interrupted):
                save_atomic(checkpoint(extra=True), run_dir / "last.pt")
            if stopped_early or interrupted:
                break
    finally:
        progress.close()
        if metrics_file is not None:
            metrics_file.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    model.eval()
    summary = {"step": step, "val_metrics": val_metrics, "best_val_loss": best_val_loss, "stopped_early": stopped_early,
               "interrupted": bool(stop_requested), "dropped": counts, "checkpoint_dir": str(run_dir)}
    if not is_main:
        return summary
    if stop_requested:
        log(f"interrupted: saved step {step} to {run_dir / 'last.pt'}; continue with --resume {run_dir / 'last.pt'}")
    plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    log(f"done in {time.time() - started:.0f} s, step {step}; best validation loss {best_val_loss:.4f}; "
        f"last validation: {format_metrics(val_metrics)}")
    return summary


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the rows up to the resumed step, so a crash never leaves duplicated rows."""
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(row + "\n" for row in rows))


def write_metrics(file, row: dict) -> None:
    file.write(json.dumps(row) + "\n")
    file.flush()


def format_metrics(metrics: dict) -> str:
    return (f"loss {metrics['loss']:.4f}, reward accuracy {metrics['reward_accuracy']:.3f}, "
            f"margin {metrics['reward_margin']:.4f} (chosen {metrics['chosen_reward']:.4f}, "
            f"rejected {metrics['rejected_reward']:.4f})")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# CLI: built from TrainConfig, so --help lists every field with its default and meaning
# ---------------------------------------------------------------------------------------

def field_help(config_class: type) -> dict[str, str]:
    """The one-line comment after each dataclass field becomes its --help text."""
    import inspect
    import re
    return {match.group(1): match.group(2) for line in inspect.getsource(config_class).splitlines()
            if (match := re.match(r"\s+(\w+): .*?#\s*(.*)$", line))}


class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")  # one line and exit code 2, not the whole usage


def config_parser(config_class: type, prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one option per dataclass field (a field without default is positional)."""
    parser = OneLineErrorParser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    helps = field_help(config_class)
    for f in dataclasses.fields(config_class):
        flag = "--" + f.name.replace("_", "-")
        if f.default is dataclasses.MISSING:
            parser.add_argument(f.name, help=helps[f.name])
        elif f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=helps[f.name])
        else:
            kind = {"int": int, "float": float, "str": str, "int | None": int, "str | None": str}[f.type]
            parser.add_argument(flag, type=kind, default=f.default, help=helps[f.name])
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = config_parser(TrainConfig, "train.py", "DPO-train LoRA adapters on Anthropic HH-RLHF preference pairs.")
    config = TrainConfig(**vars(parser.parse_args(argv)))
    try:
        validate_config(config)
    except ValueError as error:
        parser.error(str(error))
    return config


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        train(config)
    except FileNotFoundError as error:  # a model or checkpoint path that is not there: misuse
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    except (ValueError, TrainingError) as error:  # bad data (DataError), an unusable checkpoint, a diverged run
        print(f"train.py: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
