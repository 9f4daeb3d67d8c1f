"""DPO training of LoRA adapters on Anthropic HH-RLHF preference pairs: the loop.

    python train.py --beta 0.1

A step: batch -> one forward of chosen and rejected together, the prompt computed once
(data.collate_shared) -> DPO loss against cached reference log-probs -> backward -> clip ->
AdamW step -> learning-rate schedule. The reference model is the same network with its
adapters switched off (lora.adapters_disabled).

The paper's recipe for HH, where no SFT model exists (Section 4): first fine-tune on the
chosen answers, then DPO from there, the SFT model being both start and reference:

    python train.py --loss-type sft --checkpoint-dir checkpoints/sft
    python train.py --beta 0.1 --sft-checkpoint checkpoints/sft/best.pt --checkpoint-dir checkpoints/dpo

Here: the DPO forward and its reference cache, the schedule, validation and the test score,
the run's state, the loop, resume, and the CLI. Not here: the settings (settings.py), where a
model comes from and how its sequences are scored (models.py), the files a run leaves
(checkpoints.py), several processes (ranks.py), the math (dpo.py), the data (data.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
import shlex
import signal
import statistics
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import checkpoints
import cli
import data
import dpo
import lora
import models
import ranks
import report_page
import settings
from data import HUB_DATASET, DataError
from settings import HUB_MODEL, TrainConfig  # the run's settings; train.TrainConfig too


# ---------------------------------------------------------------------------------------
# The DPO forward: policy log-probs, the reference's cached, the loss
# ---------------------------------------------------------------------------------------

class Scorer(nn.Module):
    """batch_logps as a module: the unit DistributedDataParallel wraps, so that backward
    averages the adapters' gradients across processes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *tensors: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # data.Batch's tensors, index last
        return tuple(models.batch_logps(self.model, data.Batch(*tensors)))[:3]  # sum, mean, count: what a loss reads


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
        self.seconds = 0.0  # spent computing reference log-probs: the share of a step or validation a cache saves later

    @torch.no_grad()
    def get(self, model: nn.Module, batch: data.Batch, loss_type: str) -> tuple[Tensor, Tensor]:
        missing = self.values[batch.index].isnan().any(-1)
        if missing.any():
            # Same network, adapters off, no grad (docs/PITFALLS.md 5). Computed for the whole
            # batch, stored only where missing.
            began = time.perf_counter()
            with lora.adapters_disabled(model):
                logps = loss_logps(models.batch_logps(model, batch), loss_type)   # (2B,)
            computed = torch.stack(logps.float().chunk(2), dim=-1).cpu()   # (B, 2); .cpu() waits for the device
            self.values[batch.index[missing]] = computed[missing]
            self.seconds += time.perf_counter() - began
        chosen, rejected = self.values[batch.index].to(batch.input_ids.device).unbind(-1)
        return chosen, rejected


def policy_logps_of(model: nn.Module, batch: data.Batch, scorer: nn.Module | None) -> dpo.SequenceLogps:
    """batch_logps through the DDP-wrapped Scorer under torchrun (scorer), else the model itself."""
    if scorer is None:
        return models.batch_logps(model, batch)
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
# Schedule and validation
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
    means = torch.stack([result.losses.mean(), result.accuracies.mean(), result.margins.mean(),
                         result.chosen_rewards.mean(), result.rejected_rewards.mean()]).tolist()  # one copy from the device
    return dict(zip(("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward"), means))


@torch.no_grad()
def validation_metrics(model: nn.Module, items: list[data.TokenizedPair], reference: ReferenceCache,
                       config: TrainConfig, collate: typing.Callable[[list, list], data.Batch],
                       per_pair: bool = False) -> dict:
    """Validation metrics over all held-out pairs (pairs weighted equally). Batches of pairs of
    similar length: the order of a mean does not matter, and padding is wasted work.
    per_pair: also "pair_rewards", [r(x, y_w), r(x, y_l)] of every pair in the order of items
    (the report picks the pairs it shows by their margins)."""
    order = sorted(range(len(items)), key=lambda i: data.padded_length(items[i]))
    results = []
    for start in range(0, len(items), config.batch_size):
        index = order[start:start + config.batch_size]
        batch = data.to_device(collate([items[i] for i in index], index), model.device)
        results.append(compute_loss(model, batch, reference, config))
    result = type(results[0]).concatenate(results)
    metrics = mean_metrics(result)
    metrics["n"] = len(items)
    if per_pair and isinstance(result, dpo.PreferenceLoss):
        rewards = torch.stack([result.chosen_rewards, result.rejected_rewards], dim=-1)  # (N, 2), in `order`
        metrics["pair_rewards"] = [[round(value, 6) for value in row]
                                   for row in rewards[torch.tensor(order).argsort()].tolist()]  # back in items' order
    return metrics


# ---------------------------------------------------------------------------------------
# What the run will cost on this machine: from its own timings, said once
# ---------------------------------------------------------------------------------------

COST_AFTER_STEPS = 5         # steps timed (after the first, which warms up) before a run says what it will cost
QUICK_RUN_SECONDS = 30 * 60  # a run estimated past this is told the command for one that fits


@dataclass
class Timings:
    """What a run's parts take here, measured as it goes (seconds)."""
    setup: float = 0.0                     # train() called to the first step: load, tokenise, probe, step 0's validation
    steps: list = dataclasses.field(default_factory=list)  # this session's steps: (wall time, of which the reference's log-probs)
    validation: float | None = None        # one validation pass with its reference cached
    forward_per_pair: float | None = None  # one no-grad forward of a pair (the test score takes two: reference, policy)
    said: bool = False

    def observe_validation(self, seconds: float, reference_seconds: float, pairs: int) -> None:
        self.validation = seconds - reference_seconds  # later passes read the cached reference
        self.forward_per_pair = self.validation / pairs

    def ready(self) -> bool:
        return not self.said and len(self.steps) > COST_AFTER_STEPS and self.validation is not None

    def step_seconds(self) -> tuple[float, float]:
        """Mean wall time of a step and of its reference share, the first step left out: a run's
        time is a sum, and batches of longer pairs take longer (a median would miss them)."""
        timed = self.steps[1:]
        return statistics.fmean(wall for wall, _ in timed), statistics.fmean(reference for _, reference in timed)


def seconds_for(timings: Timings, config: TrainConfig, first: int, last: int, total_steps: int,
                batches_per_epoch: int, test_pairs: int) -> float:
    """Steps first..last-1 (0-based) of a run of total_steps, their validations and the test score,
    from measured timings: a step of the first epoch computes its pairs' reference log-probs, a
    later one reads them from the cache."""
    step_seconds, reference_seconds = timings.step_seconds()
    steps = range(first, last)
    cached = sum(1 for step in steps if (step + 1) * config.grad_accum > batches_per_epoch)  # past the first epoch
    validations = sum(1 for step in range(first + 1, last + 1) if step % config.eval_every == 0 or step == total_steps)
    test_forwards = test_pairs * (1 if config.loss_type == "sft" else 2)
    return (len(steps) * step_seconds - cached * reference_seconds + validations * timings.validation
            + test_forwards * timings.forward_per_pair)


def cost_line(run: Run, state: RunState, timings: Timings, asked: TrainConfig, elapsed: float) -> str:
    """The run's estimated wall time here, in one line; past QUICK_RUN_SECONDS, with the command
    for a run that fits (from the same timings) and what it gives up: fewer pairs, or, where
    --max-steps ends the run, fewer steps."""
    config, test_pairs = run.config, len(run.test_items)
    left = seconds_for(timings, config, state.step, run.total_steps, run.total_steps, run.batches_per_epoch, test_pairs)
    step_seconds, _ = timings.step_seconds()
    validation = f"{timings.validation:.0f}" if timings.validation >= 10 else f"{timings.validation:.1f}"
    line = (f"this run: about {minutes(elapsed + left)} in all on this machine, {minutes(left)} from now "
            f"({step_seconds:.2f} s a step, {validation} s a validation, measured on this run"
            f"{'; sooner if early stopping ends it' if config.early_stop_patience else ''}"
            f"{'; report.html after' if config.loss_type == 'sigmoid' else ''})")
    if elapsed + left <= QUICK_RUN_SECONDS or config.resume:
        return line
    pairs_per_step = config.batch_size * run.world_size * config.grad_accum
    by_steps = config.max_steps is not None and run.total_steps == config.max_steps  # --max-steps ends it, not the pairs
    if by_steps:  # the same pairs, fewer of its steps: the schedule and epochs as they are
        fits = lambda steps: timings.setup + seconds_for(timings, config, 0, steps, steps, run.batches_per_epoch,
                                                          test_pairs) <= QUICK_RUN_SECONDS
    else:  # fewer pairs: a shorter epoch, every epoch of it
        fits = lambda steps: timings.setup + seconds_for(timings, config, 0, steps, steps, steps * config.grad_accum // config.epochs,
                                                          test_pairs) <= QUICK_RUN_SECONDS
    steps = largest(fits, run.total_steps - 1)
    pairs = steps * pairs_per_step // config.epochs
    budget = minutes(QUICK_RUN_SECONDS)
    if steps == 0 or (not by_steps and pairs < pairs_per_step):
        return (f"{line}. No shorter run fits {budget} here: loading, validation and the test score alone "
                f"take about {minutes(timings.setup + seconds_for(timings, config, 0, 0, 1, 1, test_pairs))}")
    folder = Path(asked.checkpoint_dir).resolve()
    quicker = dataclasses.replace(asked, **({"max_steps": steps} if by_steps else {"num_examples": pairs}),
                                  checkpoint_dir=os.path.relpath(folder.parent / f"{folder.name or 'checkpoints'}-"
                                                                 f"{steps if by_steps else pairs}-{'steps' if by_steps else 'pairs'}"))
    gives_up = (f"stops at step {steps} of {run.total_steps}" if by_steps else
                f"the first {pairs} pairs of the training split, less any dropped, where this run trains on "
                f"{len(run.train_items)}: fewer pairs learn less; on the Gemma "
                f"stand-in, validation loss 0.690 after 200 pairs, 0.615 after 400: docs/studies.md")
    return f"{line}. Within {budget} here: {command_line(quicker, run.world_size)} ({gives_up})"


def largest(fits: typing.Callable[[int], bool], most: int) -> int:
    """The largest n in 1..most with fits(n), fits being true up to some n and false after
    (0 if none): a binary search, as a run's cost only grows with its steps."""
    low, high = 0, most
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def minutes(seconds: float) -> str:
    seconds = round(seconds)
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 600 else f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 \
        else f"{seconds} s"


def command_line(config: TrainConfig, world_size: int = 1) -> str:
    """The command that gives config: its settings that differ from the defaults, each as
    --flag=value (a value may start with a dash); train.py as this process was started."""
    program = sys.argv[0] if Path(sys.argv[0]).name == "train.py" else "train.py"
    words = ["python", program] if world_size == 1 else ["torchrun", f"--nproc_per_node={world_size}", program]
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        value, flag = getattr(config, field.name), "--" + field.name.replace("_", "-")
        if value == getattr(defaults, field.name) or value is None:
            continue
        words.append((flag if value else "--no-" + flag[2:]) if isinstance(value, bool) else f"{flag}={value}")
    return shlex.join(words)


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
    saved = settings.config_from_dict(checkpoint["config"])
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


def loss_units(batch: data.Batch, loss_type: str) -> int:
    """What a batch's loss is a mean over: its pairs for DPO, its chosen answers' tokens for SFT."""
    pairs = len(batch.index)
    return int(batch.target_mask[:pairs].sum()) if loss_type == "sft" else pairs


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
    tokenizer: typing.Any                # the model's tokenizer (the report decodes its tokens)
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
    base_sha256: str                     # models.weights_sha256 of the base model as loaded: what the reference is
    seen_prompts: dict                   # {"train": ..., "validation": ...}: data.prompt_keys, what no program may call "test"

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
    announce = cli.say if rank == 0 else lambda _: None
    run_dir = Path(config.checkpoint_dir)
    if not config.resume or Path(config.resume).parent.resolve() != run_dir.resolve():
        checkpoints.refuse_used_folder(run_dir)  # a resumed run may move to a new folder, not into another run's
    with checkpoints.writing(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)  # the same LoRA init on every rank
    dropped: dict = {}
    splits = checkpoints.split_data_of(config, dropped)
    config = models.with_measured_dtype(config, device, world_size, announce)  # after the data's checks
    announce(f"loading {config.model}")
    model, tokenizer = models.load_model_and_tokenizer(config.model, config.dtype)
    base_sha256 = models.weights_sha256(model, config.dtype)  # the model the reference comes from: the run's identity
    if sft_stage is not None:  # the SFT run's model, as that run computed with it
        sft_dtype = settings.config_from_dict(sft_stage["config"]).dtype
        checkpoints.check_same_base(sft_stage, sft_stage["checkpoint"], models.weights_sha256(model, sft_dtype), config.model)
    global_batch = config.batch_size * world_size  # pairs per micro-step, all ranks together
    train_items, val_items, test_items = tokenized_splits(config, model, tokenizer, splits, global_batch, dropped, announce)
    checkpoints.fold_sft_stage(model, sft_stage)  # the SFT model: DPO's starting policy and, adapters off, its reference
    lora_config = models.lora_config_of(config, model)
    chosen_by = targets_chosen_by(config, model)  # read off the plain model, before adapters wrap its layers
    trainable, total = lora.add_lora(model, lora_config)
    if initial_adapters is not None:
        try:
            lora.load_adapter_state_dict(model, initial_adapters)
        except ValueError as error:
            raise ValueError(f"--init-adapters {config.init_adapters}: {error}") from None
    model.to(device)
    announce(f"data: {len(train_items)} train / {len(val_items)} validation / {len(test_items)} test pairs; "
             f"dropped: {dropped or 'none'}")
    announce_model(config, lora_config, chosen_by, trainable, total, sft_stage, world_size, announce)
    scorer = None
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel
        # Buffers (rotary tables) are the same on every rank: never re-sent before a forward.
        # Newer torch names that forward_sync_buffers and warns at broadcast_buffers: asked, not assumed.
        accepts = inspect.signature(DistributedDataParallel).parameters
        buffers = {"forward_sync_buffers" if "forward_sync_buffers" in accepts else "broadcast_buffers": False}
        scorer = DistributedDataParallel(Scorer(model), **buffers)
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
    seen = {name: data.prompt_keys(item.prompt_ids for item in items) for name, items in
            (("train", train_items), ("validation", val_items))}
    collate = models.collate_function(config, model, tokenizer.pad_token_id, announce)
    return Run(config, rank, world_size, device, run_dir, train_items, val_items, test_items, dropped, model, tokenizer, collate,
               lora_config, sft_stage, scorer, optimizer, ReferenceCache(len(train_items)), ReferenceCache(len(val_items)),
               batches_per_epoch, total_steps, fingerprints, base_sha256, seen)


def tokenized_splits(config: TrainConfig, model: nn.Module, tokenizer, splits: data.Splits, global_batch: int,
                     dropped: dict, announce: typing.Callable[[str], None]) -> data.Splits:
    """The train, validation and test pairs as token ids (data.tokenize_splits, drops counted), or
    one line saying why they cannot train this model. What a row holds is measured on the run's
    own tokenizer first (docs/PITFALLS.md 19, 21): the special tokens it puts after a text stay
    out of prompts, and a chat template that writes the date renders as of one day (each said);
    a pair whose row would not read as its prompt followed directly by its answer is dropped and
    counted (data.tokenize_pair)."""
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if positions is not None and config.max_length > positions:
        raise ValueError(f"--max-length {config.max_length} exceeds the model's {positions} positions")
    _, after = data.special_tokens_around(tokenizer)
    if after:
        announce(f"the tokenizer puts {tokenizer.decode(list(after))!r} after every text it encodes (add_eos_token): "
                 f"prompts are encoded without it, so nothing stands between a prompt and its answer")
    if data.template_is_dated(tokenizer):
        announce(f"the chat template writes the date it is rendered on: conversations are rendered as of "
                 f"{data.TEMPLATE_DATE:%d %b %Y}, so the run's token ids are the same on any day")
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token, so no answer can be scored as ending (docs/PITFALLS.md 2): "
                        "give it one (eos_token in its tokenizer_config.json)")
    items = data.tokenize_splits(splits, tokenizer, config.max_length, config.max_prompt_length, dropped)
    if len(items[0]) < global_batch or not items[1] or (config.test_size and not items[2]):
        raise DataError(f"too few usable pairs: {len(items[0])} train, {len(items[1])} validation, {len(items[2])} test "
                        f"(dropped: {dropped})")
    return items


def targets_chosen_by(config: TrainConfig, model: nn.Module) -> str:
    """How the LoRA targets were chosen, when not by name: by module type, and which layers were
    left out because they cannot take an adapter (lora.fit), each with why."""
    if config.lora_targets or lora.known_targets(model):
        return ""
    _, left_out = lora.block_linear_targets(model)
    skipped = "; left out: " + "; ".join(f"{name} ({why})" for name, why in sorted(left_out.items())) if left_out else ""
    return (f" (by module type: {model.config.model_type} has no default targets, so every linear layer of its blocks "
            f"that can take an adapter{skipped})")


def announce_model(config: TrainConfig, lora_config: lora.LoRAConfig, chosen_by: str, trainable: int, total: int,
                   sft_stage: dict | None, world_size: int, announce: typing.Callable[[str], None]) -> None:
    """What trains: the model, its adapters, where it starts from, how many processes."""
    announce(f"model: {config.model} ({config.dtype}); LoRA r={lora_config.r} on {list(lora_config.targets)}{chosen_by}: "
             f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")
    if sft_stage is not None:
        announce(f"starting from the SFT model of {sft_stage['checkpoint']}: its adapters merged into the weights "
                 f"are the starting policy and the reference")
    if world_size > 1:
        announce(f"{world_size} processes: global batch {config.batch_size * world_size} x {config.grad_accum} "
                 f"accumulation")


def checkpoint(run: Run, state: RunState, rng: list[dict] | None = None) -> dict:
    """best.pt: what judge.py needs. last.pt (given every rank's random state, rng): also all that
    --resume needs to continue exactly."""
    payload = {"format": checkpoints.CHECKPOINT_FORMAT, "base_model": run.config.model, "lora": lora.lora_config_dict(run.lora_config),
               "adapters": lora.adapter_state_dict(run.model), "config": dataclasses.asdict(run.config),
               "step": state.step, "val_metrics": state.val_metrics, "data_sha256": run.data_sha256,
               "base_sha256": run.base_sha256, "seen_prompts": run.seen_prompts}
    if run.sft_stage is not None:
        payload["sft"] = run.sft_stage
    if rng is not None:
        payload.update(state=dataclasses.asdict(state), optimizer=run.optimizer.state_dict(),
                       rng=rng, total_steps=run.total_steps,
                       world_size=run.world_size, train_reference=run.train_reference.values,
                       val_reference=run.val_reference.values)
    return payload


def validate(run: Run, state: RunState, metrics_file, say, timings: Timings) -> None:
    """Validate (rank 0 only), log a row, keep best.pt, decide early stopping, and time it."""
    run.model.eval()
    began, reference_before = time.perf_counter(), run.val_reference.seconds
    metrics = validation_metrics(run.model, run.val_items, run.val_reference, run.config, run.collate)
    seconds = time.perf_counter() - began
    timings.observe_validation(seconds, run.val_reference.seconds - reference_before, len(run.val_items))
    lora.train_mode(run.model)
    checkpoints.write_metrics(metrics_file, {"step": state.step, "split": "val", **metrics})  # no wall time: a run's rows repeat
    say(f"step {state.step} validation: {format_metrics(metrics)}")
    if state.observe(metrics, run.config.early_stop_patience):
        checkpoints.save_atomic(checkpoint(run, state), run.run_dir / "best.pt")
    if state.stopped_early:
        say(f"early stop: {state.evals_without_improvement} validations without a lower loss")


def restore(run: Run, checkpoint: dict) -> RunState:
    """Put a saved run back as it was when last.pt was written; its state."""
    checkpoints.check_same_data(checkpoint, run.config.resume, lambda: run.data_sha256)
    checkpoints.check_same_base(checkpoint, run.config.resume, run.base_sha256, run.config.model)  # its cached reference's
    checkpoints.check_resume_fits(checkpoint, run.config.resume, run.total_steps, run.world_size, run.device)
    lora.load_adapter_state_dict(run.model, checkpoint["adapters"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.train_reference.values, run.val_reference.values = checkpoint["train_reference"], checkpoint["val_reference"]
    ranks.set_rng_state(checkpoint["rng"][run.rank], run.device)
    state = RunState(**checkpoint["state"])
    if run.is_main:
        checkpoints.move_run_files(Path(run.config.resume).parent, run.run_dir)  # its best.pt and log go on there
        checkpoints.truncate_metrics(run.run_dir / "metrics.jsonl", state.step)  # rows a crash wrote after its last checkpoint
        cli.say(f"resumed from {run.config.resume} at step {state.step} of {run.total_steps}")
    return state


def accumulate_gradients(run: Run, step: int) -> tuple[list, int, int]:
    """Backward through the step's micro-batches: the adapters' gradients become those of the
    step's loss, its micro-batches' and ranks' summed losses over all their pairs (DPO) or all
    their tokens (SFT) (docs/PITFALLS.md 12). (Each micro-batch's result, that count, and the
    tokens of this rank's sequences, for tokens/s.)"""
    config = run.config
    batches = [run.micro_batch(step * config.grad_accum + micro) for micro in range(config.grad_accum)]
    units = ranks.sum_across_ranks(sum(loss_units(batch, config.loss_type) for batch in batches), run.world_size, run.device)
    results = []
    for batch in batches:
        result = compute_loss(run.model, batch, run.train_reference, config, run.scorer)
        (result.total * run.world_size / units).backward()  # DDP averages the ranks' gradients: * world size
        results.append(result)
    return results, units, sum(batch.sequence_tokens for batch in batches)


def optimizer_step(run: Run, step: int, parameters: list[nn.Parameter]) -> tuple[float, float, dict]:
    """One optimizer step: lr -> accumulate -> clip and check -> step. (lr, grad norm, metrics)."""
    config = run.config
    #### learning rate ####
    lr = learning_rate(step, config.lr, config.warmup_steps, run.total_steps, config.schedule)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    #### accumulate ####
    micro_results, units, sequence_tokens = accumulate_gradients(run, step)
    #### clip and check ####
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm).item()  # the step's wait for a GPU
    metrics = mean_metrics(type(micro_results[0]).concatenate(micro_results)) | {"sequence_tokens": sequence_tokens}
    metrics = dict(zip(metrics, ranks.mean_across_ranks(list(metrics.values()), run.world_size, run.device)))
    metrics["sequence_tokens"] = round(metrics["sequence_tokens"] * run.world_size)  # every rank's, prompt counted in both
    if config.loss_type == "sft":  # per token over every rank's tokens, the loss the gradient is of
        total = ranks.sum_across_ranks(sum(result.total.item() for result in micro_results), run.world_size, run.device)
        metrics.update(loss=total / units, perplexity=math.exp(total / units), tokens=units)
    if not (math.isfinite(metrics["loss"]) and math.isfinite(grad_norm)):
        raise TrainingError(f"non-finite loss ({metrics['loss']}) or gradient norm ({grad_norm}) at step "
                            f"{step + 1}: stopped; the last good checkpoint is {run.run_dir / 'last.pt'} (try a lower --lr)")
    #### step ####
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return lr, grad_norm, metrics


def start(config: TrainConfig, rank: int, world_size: int, device: torch.device) -> tuple[Run, RunState]:
    """The run and its state at the first step to take: a new run (from the base model, an SFT
    run or a peft folder; Hub defaults replaced offline), or the one --resume continues."""
    if config.resume:
        resumed = checkpoints.load_resumable(config.resume)
        run = build_run(config_for_resume(config, resumed), rank, world_size, device, resumed.get("sft"))
        return run, restore(run, resumed)  # its SFT stage is the one it saved; its adapters come from last.pt
    sft_stage = initial_adapters = None
    if config.sft_checkpoint:
        config, sft_stage = checkpoints.sft_stage_of(config)
    if config.init_adapters:
        config, initial_adapters = checkpoints.init_adapters_of(config)
    config = models.with_offline_fallbacks(config, announce=rank == 0)
    return build_run(config, rank, world_size, device, sft_stage, initial_adapters), RunState()


def train(config: TrainConfig) -> dict:
    """Train LoRA adapters with DPO; returns the final validation metrics, file paths, what the
    run measured about this machine (dtype, layout, peak memory) and its Timings.

    Under `torchrun --nproc_per_node N`, each rank takes its share of every global batch
    (batch_size pairs per rank), DDP averages the adapters' gradients, and rank 0 alone
    logs, validates and writes checkpoints.
    """
    began = time.time()  # the run's wall time, loading included (its "run" row)
    if config.threads:
        torch.set_num_threads(config.threads)
    rank, world_size, device = ranks.setup_distributed()
    run, state = start(config, rank, world_size, device)
    asked, config = config, run.config  # as given; as resumed, or with its offline stand-ins and measured dtype

    with checkpoints.writing(run.run_dir / "metrics.jsonl"):
        metrics_file = open(run.run_dir / "metrics.jsonl", "a") if run.is_main else None
    stop_requested = []  # Ctrl-C or SIGTERM: finish the current step, save, stop
    previous_handlers = {sig: signal.signal(sig, lambda *_: stop_requested.append(True))
                         for sig in (signal.SIGINT, signal.SIGTERM)}
    from tqdm import tqdm
    progress = tqdm(total=run.total_steps, initial=state.step, desc=config.loss_type.upper().replace("SIGMOID", "DPO"),
                    disable=not (config.progress and run.is_main), dynamic_ncols=True)
    started, interrupted = time.time(), False
    parameters = [p for group in run.optimizer.param_groups for p in group["params"]]  # the adapters' A and B
    timings = Timings()
    try:
        # The starting point. The policy forward repeats the reference's here on purpose: getting
        # loss log 2 and accuracy 0.5 on the real model proves policy == reference (docs/PITFALLS.md 3, 5).
        if state.val_metrics is None and run.is_main:
            validate(run, state, metrics_file, cli.say, timings)
        lora.train_mode(run.model)  # only LoRA's dropout can act: the base model is the reference
        if state.step == 0:
            check_step_zero(run)
        timings.setup = time.time() - began  # what a new run costs before its first step
        while state.step < run.total_steps and not (state.stopped_early or interrupted):
            step_began, reference_before = time.perf_counter(), run.train_reference.seconds
            lr, grad_norm, train_metrics = optimizer_step(run, state.step, parameters)  # lr, accumulate, clip, step
            state.step += 1
            if run.device.type == "cuda":
                torch.cuda.synchronize(run.device)  # the optimizer's kernels belong to this step's time
            timings.steps.append((time.perf_counter() - step_began, run.train_reference.seconds - reference_before))
            #### log ####
            progress.update(1)
            progress.set_postfix(loss=f"{train_metrics['loss']:.3f}", lr=f"{lr:.1e}",
                                 **({"acc": f"{train_metrics['reward_accuracy']:.2f}"} if "reward_accuracy" in train_metrics else {}))
            if run.is_main:
                checkpoints.write_metrics(metrics_file, {"step": state.step, "split": "train", "lr": lr, "grad_norm": grad_norm, **train_metrics})
            #### validate ####
            if run.is_main and (state.step % config.eval_every == 0 or state.step == run.total_steps):
                validate(run, state, metrics_file, progress.write, timings)
            #### what the run will cost, said once ####
            if (run.is_main and timings.ready() and state.step < run.total_steps and not state.stopped_early
                    and not stop_requested):
                progress.write(cost_line(run, state, timings, asked, elapsed=time.time() - began))
                timings.said = True
            #### save ####
            state.stopped_early = ranks.any_rank(state.stopped_early, run.world_size, run.device)
            interrupted = ranks.any_rank(bool(stop_requested), run.world_size, run.device)
            if (state.step % config.checkpoint_every == 0 or state.step == run.total_steps or state.stopped_early
                    or interrupted):
                rng = ranks.rng_states(run.world_size, run.device)  # every rank gives its own
                if run.is_main:
                    checkpoints.save_atomic(checkpoint(run, state, rng), run.run_dir / "last.pt")
    finally:
        progress.close()
        if metrics_file is not None:
            with contextlib.suppress(OSError):  # each row was flushed; a failed one was reported already
                metrics_file.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    return finish(run, state, interrupted, seconds=time.time() - started, began=began) | {"timings": dataclasses.asdict(timings)}


def check_step_zero(run: Run) -> None:
    """Step 0 is the reference (docs/PITFALLS.md 3, 5, 20), measured on the run's first batch in
    the very mode training runs in (train_mode, its dtype, its layout): the reference's log-probs
    repeat bit for bit, so the cache holds what the reference is and not one random draw; and,
    where the adapters start at B = 0, the policy's equal them, so the first loss is log 2. (Its
    random state is put back after: the run draws what it would have drawn without the check.)"""
    batch = run.micro_batch(0)
    with torch.no_grad(), torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        with lora.adapters_disabled(run.model):
            first, second = (models.batch_logps(run.model, batch).sum for _ in range(2))
        starts_at_reference = all(not layer.lora_B.any() for _, layer in lora.lora_layers(run.model))
        policy = models.batch_logps(run.model, batch).sum if starts_at_reference else first
    problem = None
    if not torch.equal(first, second):
        problem = (f"the reference's log-probs of the first batch differ between two forward passes (by up to "
                   f"{(first - second).abs().max().item():.3g}): the model draws random numbers even with its dropout "
                   f"off and in eval mode, so a cached reference would be one random draw")
    elif not torch.equal(policy, first):
        problem = (f"with its adapters at B = 0 the policy's log-probs differ from the reference's (by up to "
                   f"{(policy - first).abs().max().item():.3g}), so the first loss would not be log 2")
    if ranks.any_rank(problem is not None, run.world_size, run.device):
        raise TrainingError(f"step 0 is not the reference: {problem or 'so says another process'}; nothing was trained")


def stop_reason(run: Run, state: RunState, interrupted: bool) -> str:
    """Why the loop ended, in words, for the log and the report."""
    if interrupted:
        return f"interrupted at step {state.step} (Ctrl-C or SIGTERM); --resume continues it"
    if state.stopped_early:
        return f"early stopping: {state.evals_without_improvement} validations without a lower validation loss"
    if run.config.max_steps is not None and state.step >= run.config.max_steps:
        return f"--max-steps {run.config.max_steps} reached"
    return f"all {run.config.epochs} epoch(s) done ({state.step} steps)"


def finish(run: Run, state: RunState, interrupted: bool, seconds: float, began: float) -> dict:
    """The run's summary; rank 0 also scores best.pt on the test pairs (a finished run only),
    plots the curves, logs the session's wall time and why it stopped (a "run" row), writes
    report.html (a finished run) and says how it ended."""
    run.model.eval()
    test_metrics = None
    if run.is_main:
        if interrupted:
            cli.say(f"interrupted: saved step {state.step} to {run.run_dir / 'last.pt'}; "
                    f"continue with --resume {run.run_dir / 'last.pt'} (the test pairs are scored when it finishes)")
        elif run.test_items:
            test_metrics = test_score(run)
        checkpoints.plot_curves(run.run_dir / "metrics.jsonl", run.run_dir / "curves.png")
        with checkpoints.writing(run.run_dir / "metrics.jsonl"), open(run.run_dir / "metrics.jsonl", "a") as metrics_file:
            checkpoints.write_metrics(metrics_file, {"step": state.step, "split": "run", "stopped": stop_reason(run, state, interrupted),
                                                     "seconds": round(time.time() - began, 1), "peak_memory_mib": round(peak_memory_mib(run.device), 1)})
        cli.say(f"done in {seconds:.0f} s, step {state.step}; best validation loss {state.best_val_loss:.4f}; "
                f"last validation: {format_metrics(state.val_metrics)}; peak memory {peak_memory_mib(run.device):,.0f} MiB "
                f"({'CUDA allocated' if run.device.type == 'cuda' else 'resident'})")
        if not interrupted:
            write_report(run)
    layout = "shared" if run.collate.func is data.collate_shared else \
        "logits" if getattr(run.model, "scores_from_logits", False) else "two rows"
    return {"step": state.step, "val_metrics": state.val_metrics, "best_val_loss": state.best_val_loss,
            "test_metrics": test_metrics, "stopped_early": state.stopped_early, "interrupted": interrupted,
            "dropped": run.dropped, "checkpoint_dir": str(run.run_dir), "dtype": run.config.dtype, "layout": layout,
            "pairs": {"train": len(run.train_items), "validation": len(run.val_items), "test": len(run.test_items)},
            "device": str(run.device), "peak_memory_mib": peak_memory_mib(run.device)}


def peak_memory_mib(device: torch.device) -> float:
    """This process's peak: CUDA memory allocated on a GPU, resident memory on a CPU (Linux: KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_score(run: Run) -> dict:
    """best.pt's adapters scored on the test pairs, once, at the end of the run: the one figure of
    a run that nothing was chosen on (best.pt and early stopping were chosen on validation).
    Logged as a "split": "test" row at best.pt's step, with a 95% interval on reward accuracy."""
    best = checkpoints.load_checkpoint(str(run.run_dir / "best.pt"))
    lora.load_adapter_state_dict(run.model, best["adapters"])
    metrics = validation_metrics(run.model, run.test_items, ReferenceCache(len(run.test_items)), run.config, run.collate,
                                 per_pair=True)
    if "reward_accuracy" in metrics:  # Wilson's interval: a share of n pairs ranked as people did
        metrics["reward_accuracy_interval"] = list(dpo.wilson_interval(round(metrics["reward_accuracy"] * metrics["n"]),
                                                                        metrics["n"]))
    with checkpoints.writing(run.run_dir / "metrics.jsonl"), open(run.run_dir / "metrics.jsonl", "a") as metrics_file:
        checkpoints.write_metrics(metrics_file, {"step": best["step"], "split": "test", "checkpoint": "best.pt", **metrics,
                                                 "pairs_sha256": data.fingerprint(run.test_items)})  # whose pair_rewards
    cli.say(f"test ({metrics['n']} pairs nothing was chosen on), best.pt of step {best['step']}: {format_metrics(metrics)}")
    return metrics


def write_report(run: Run) -> None:
    """report.html from the model in memory, best.pt's adapters put on it, its pairs picked by the
    test row's per-pair rewards: seconds, not a second pass over the test pairs. A report that
    fails costs the run nothing: one line says why and how to make it again."""
    if run.config.loss_type != "sigmoid":
        cli.say(f"no report.html: it shows DPO's implicit reward, which a --loss-type {run.config.loss_type} run has not")
        return
    began = time.time()
    try:
        lora.load_adapter_state_dict(run.model, checkpoints.load_checkpoint(str(run.run_dir / "best.pt"))["adapters"])
        path = report_page.write_report(run.run_dir, policy=(run.model, run.tokenizer), samples=0)
    except (OSError, ValueError, RuntimeError) as error:
        cli.say(f"report not written ({error}); make it with: python report.py {run.run_dir}")
        return
    cli.say(f"report: {path} ({time.time() - began:.0f} s; how far the policy moved on its own samples: "
            f"python report.py {run.run_dir} --samples 8)")


def format_metrics(metrics: dict) -> str:
    if "perplexity" in metrics:
        return f"loss {metrics['loss']:.4f}, perplexity {metrics['perplexity']:.2f} on the chosen answers"
    interval = " [{:.3f}, {:.3f}]".format(*metrics["reward_accuracy_interval"]) if "reward_accuracy_interval" in metrics else ""
    return (f"loss {metrics['loss']:.4f}, reward accuracy {metrics['reward_accuracy']:.3f}{interval}, "
            f"margin {metrics['reward_margin']:.4f} (chosen {metrics['chosen_reward']:.4f}, "
            f"rejected {metrics['rejected_reward']:.4f})")


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
# CLI: built from TrainConfig (cli.config_parser), so --help lists every field with its default and meaning
# ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = cli.config_parser(TrainConfig, "train.py", "DPO-train LoRA adapters on Anthropic HH-RLHF preference pairs.")
    try:
        return TrainConfig(**vars(parser.parse_args(argv)))
    except ValueError as error:
        parser.error(str(error))


def last_checkpoint(config: TrainConfig) -> Path:
    """The last.pt that continues the run of these command-line settings: in its folder (a resumed
    run's own, unless --checkpoint-dir moved it), else the one it was resumed from."""
    folder = Path(config.resume).parent if config.resume and config.checkpoint_dir == TrainConfig.checkpoint_dir \
        else Path(config.checkpoint_dir)
    return folder / "last.pt" if (folder / "last.pt").exists() or not config.resume else Path(config.resume)


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
    except checkpoints.WriteFailed as error:  # a full disk: the checkpoint written before stays whole
        last = last_checkpoint(config)
        resume = f"; {last} is whole: free space and continue with --resume {last}" if last.exists() else ""
        print(f"train.py: error: {error}{resume}", file=sys.stderr)
        return 1
    except OSError as error:  # any other file that cannot be read or written (the bundled model on a full disk)
        print(f"train.py: error: {f'{error.filename}: {error.strerror}' if error.filename and error.strerror else error}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the loop or after it (the test score, the report)
        last = last_checkpoint(config)
        print("train.py: interrupted; " + (f"{last} holds the run up to its last saved step: --resume {last} continues "
                                            f"it, and scores the test pairs and writes report.html when it finishes"
                                            if last.exists() else "no checkpoint was written yet: nothing to resume"),
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
