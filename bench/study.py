"""The defaults study: full runs of `python train.py`, one flag changed at a time, chosen on
validation, reported on test.

    python bench/study.py                 # every run below not done yet, one after another, then the table
    python bench/study.py --table         # only the table of the runs done so far
    python bench/study.py --only all-pairs lr-2e-4
    python bench/study.py --score checkpoints/best.pt   # a checkpoint (an older one too) on today's validation and test pairs

Each run is `python train.py --beta 0.1 <flags> --checkpoint-dir runs/study/<name>` in a
process of its own, its wall time measured around it; results go to runs/study/results.jsonl
as each run ends, so a study stopped half way goes on where it stopped. The table shows, per
run: its validation loss and accuracy at best.pt (what a choice may look at) and best.pt's
test figures (what nothing may be chosen on; shown so the note can report them).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import dataclasses  # noqa: E402

import checkpoints  # noqa: E402
import data  # noqa: E402
import dpo  # noqa: E402
import models  # noqa: E402
import settings  # noqa: E402
import train  # noqa: E402

STUDY = REPO / "runs" / "study"
RUNS = {  # name -> the flags that differ from the defaults; the first is the defaults themselves
    "defaults": [],
    "all-pairs": ["--num-examples", "0"],  # ~400 steps: over the 30-minute budget here
    "two-epochs": ["--epochs", "2"],  # all training pairs twice: ~400 steps, over the 30-minute budget here
    "two-epochs-400": ["--num-examples", "400", "--epochs", "2"],  # a second epoch within the budget: 400 pairs twice
    "beta-0.3": ["--beta", "0.3"],
    "beta-0.05": ["--beta", "0.05"],
    "lr-1e-4": ["--lr", "1e-4"],
    "lr-1e-3": ["--lr", "1e-3"],
    "rank-16": ["--lora-r", "16", "--lora-alpha", "32"],
    "rank-4": ["--lora-r", "4", "--lora-alpha", "8"],
    "sft-then-dpo": ["--sft-checkpoint", "runs/study/sft/best.pt"],  # after: python train.py --loss-type sft --checkpoint-dir runs/study/sft
    "seed-1": ["--seed", "1"],  # the spread: data order and LoRA init; the split stays (--split-seed)
    "seed-2": ["--seed", "2"],
}


def run(name: str, flags: list[str], threads: int = 0) -> dict:
    """One full run in its own process; its summary read back from the files it left. threads > 0
    gives it that many torch threads (two runs side by side on two cores: --threads 1 each)."""
    folder = STUDY / name
    beta = [] if "--beta" in flags else ["--beta", "0.1"]  # the README's command, unless the run changes beta
    command = [sys.executable, "train.py", *beta, *flags, "--checkpoint-dir", str(folder), "--no-progress"]
    if (folder / "last.pt").exists():  # stopped half way: continue it
        command = [sys.executable, "train.py", "--resume", str(folder / "last.pt"), "--no-progress"]
    command += ["--threads", str(threads)] if threads else []
    started = time.time()
    with open(STUDY / f"{name}.log", "a") as log:
        returncode = subprocess.call(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if returncode != 0:
        raise SystemExit(f"{name}: train.py exited {returncode}; see {STUDY / f'{name}.log'}")
    return {"name": name, "flags": flags, "seconds": time.time() - started, "threads": threads, **summary(folder)}


def summary(folder: Path) -> dict:
    rows = checkpoints.read_log(folder / "metrics.jsonl")
    val = [row for row in rows if row["split"] == "val"]
    test = [row for row in rows if row["split"] == "test"][-1]
    best = min(val, key=lambda row: row["loss"])
    return {"steps": max(row["step"] for row in rows), "validations": [(r["step"], r["loss"], r["reward_accuracy"]) for r in val],
            "best_step": best["step"], "val_loss": best["loss"], "val_accuracy": best["reward_accuracy"],
            "test_loss": test["loss"], "test_accuracy": test["reward_accuracy"],
            "test_interval": test["reward_accuracy_interval"], "test_n": test["n"]}


def table(results: list[dict]) -> str:
    lines = ["| run | flags | wall | steps | best.pt step | val loss / acc at best.pt | val loss / acc by step | "
             "test acc [95%] / loss (best.pt) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        by_step = "; ".join(f"{step}: {loss:.3f} / {accuracy:.3f}" for step, loss, accuracy in r["validations"])
        low, high = r["test_interval"]
        lines.append(f"| {r['name']} | `{' '.join(r['flags']) or '(defaults)'}` | {r['seconds'] / 60:.1f} min | {r['steps']} "
                     f"| {r['best_step']} | {r['val_loss']:.3f} / {r['val_accuracy']:.3f} | {by_step} "
                     f"| {r['test_accuracy']:.3f} [{low:.3f}, {high:.3f}] / {r['test_loss']:.3f} |")
    return "\n".join(lines)


def score(path: str, test_size: int = 200) -> None:
    """A DPO checkpoint's adapters on its run's validation and test pairs, as train.py splits
    them today. A checkpoint without a test split (--test-size 0, or older) gets the shuffle's
    last test_size pairs, checked: refused if its run trained on any of them (it may have, with
    --num-examples 0)."""
    checkpoint = checkpoints.load_checkpoint(path)
    config = settings.config_from_dict(checkpoint["config"])
    if config.loss_type == "sft":
        raise SystemExit(f"{path} is an SFT run: it has no reward accuracy to score")
    trained_on = {pair.prompt for pair in checkpoints.split_data_of(config).train}
    config = dataclasses.replace(config, test_size=config.test_size or test_size)
    splits = checkpoints.split_data_of(config)
    if overlap := sum(pair.prompt in trained_on for pair in splits.test):
        raise SystemExit(f"{path}: its run trained on {overlap} of the {len(splits.test)} pairs that would be its test "
                         f"pairs: no test figure can be made for it")
    model, tokenizer = checkpoints.load_policy(checkpoint, models.with_measured_dtype(config, torch.device("cpu"), 1, print).dtype)
    collate = models.collate_function(config, model, tokenizer.pad_token_id)
    tokenized = data.tokenize_splits(splits, tokenizer, config.max_length, config.max_prompt_length, {})
    for name in ("validation", "test"):
        items = getattr(tokenized, name)
        metrics = train.validation_metrics(model, items, train.ReferenceCache(len(items)), config, collate)
        low, high = dpo.wilson_interval(round(metrics["reward_accuracy"] * metrics["n"]), metrics["n"])
        print(f"{path} (step {checkpoint['step']}) on {metrics['n']} {name} pairs: loss {metrics['loss']:.4f}, "
              f"reward accuracy {metrics['reward_accuracy']:.3f} [{low:.3f}, {high:.3f}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="run only these (names: " + ", ".join(RUNS) + ")")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for each run, passed as train.py --threads (default: torch's choice); 1 to run two studies side by side on two cores")
    parser.add_argument("--table", action="store_true", help="print the table of the runs done, run nothing")
    parser.add_argument("--score", nargs="*", default=[], help="score these checkpoints on validation and test, run nothing")
    args = parser.parse_args()
    if args.score:
        for path in args.score:
            score(path)
        return
    STUDY.mkdir(parents=True, exist_ok=True)
    results_file = STUDY / "results.jsonl"
    done = {r["name"]: r for r in map(json.loads, results_file.read_text().splitlines())} if results_file.exists() else {}
    for name in ([] if args.table else args.only or list(RUNS)):
        if name not in done:
            beta = "" if "--beta" in RUNS[name] else "--beta 0.1 "
            print(f"{name}: python train.py {beta}{' '.join(RUNS[name])}", file=sys.stderr, flush=True)
            done[name] = run(name, RUNS[name], args.threads)
            with open(results_file, "a") as f:
                f.write(json.dumps(done[name]) + "\n")
    print(table([done[name] for name in RUNS if name in done]))


if __name__ == "__main__":
    main()
