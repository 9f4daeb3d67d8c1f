"""bench/gpu_check.py on a machine without a GPU: one line says so, the CPU half runs and passes,
the table is written where the user stands, and the exit status is 0."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the check runs its GPU half too: minutes, run it by hand")
def test_without_a_gpu_the_check_says_so_once_runs_the_cpu_half_and_writes_its_table_here():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("gpu_check.py: no GPU: ") and sum("no GPU: torch" in line for line in lines) == 2  # said, and tabled
    table = Path("gpu_check.txt").read_text()
    assert done.stdout.rstrip().endswith(f"{table}written to {Path('gpu_check.txt').resolve()}")
    rows = {line[:16].strip(): line for line in table.splitlines()[2:]}
    assert list(rows) == ["device tests", "GPT-2's shape", "ours vs TRL", "first-step loss"]
    assert re.search(r"cpu only: \d+ passed in ", rows["device tests"]) and "failed" not in rows["device tests"]
    assert rows["GPT-2's shape"].endswith("skipped: no GPU") and rows["ours vs TRL"].endswith("skipped: no GPU")
    loss = float(re.search(r"cpu fp32 ([0-9.]+)", rows["first-step loss"]).group(1))
    assert 0 < loss and abs(loss - 0.69315) > 1e-2  # nonzero adapters: the check is not at log 2, where it would prove nothing
