"""tutorial/dpo.ipynb: run top to bottom in a real Jupyter kernel (nbclient, ipykernel), offline,
as a learner runs it; and the copy in the repository carries the outputs of one such run."""
import base64
import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

import models

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "tutorial" / "dpo.ipynb"


def text_of(cell) -> str:
    return "".join(output.get("text", "") for output in cell.outputs if output.output_type == "stream")


def kinds_of(cell) -> set[str]:
    return {kind for output in cell.outputs if output.output_type == "display_data" for kind in output.data}


def test_the_tutorial_runs_top_to_bottom_offline_in_a_real_kernel_and_shows_what_each_step_computes(monkeypatch):
    """Any error in any cell fails it (nbclient raises CellExecutionError). The kernel's folder is
    this test's own: the run the notebook trains lands there, not in the clone."""
    for name in models.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # no Hub: nothing listens there
    monkeypatch.setenv("DPO_PROJECT", str(ROOT))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": os.getcwd()}}).execute()
    cells = {cell.metadata["tags"][0]: cell for cell in notebook.cells if cell.cell_type == "code"}
    printed = {tag: text_of(cell) for tag, cell in cells.items()}
    assert printed["setup"].startswith("Using the bundled Gemma 3 270M") and "on the CPU" in printed["setup"]
    assert "training" in printed["pair"] and "y_w (chosen)" in printed["pair"]
    assert "image/png" in kinds_of(cells["positions"]) and "image/png" in kinds_of(cells["weight"])
    assert "log π_ref" in printed["logps"]
    assert printed["eq7"].startswith("loss 0.6931 (log 2 = 0.6931)")  # policy = reference at the start
    assert printed["by_hand"].startswith("by hand 0.5544, dpo.dpo_loss 0.5544")
    assert "bit for bit: True" in printed["lora"]
    assert "step 16 validation" in printed["run"] and "image/png" in kinds_of(cells["run"])
    assert "text/html" in kinds_of(cells["tokens"]) and "step 1's pair" in printed["tokens"]
    assert "KL(π ‖ π_ref)" in printed["kl"]
    *_, people, trust = printed["win_rate"].rstrip().splitlines()
    assert people.startswith("Judge agreement with people") and "harmless-base" in people and trust.startswith("Trust: ")
    assert not any("it/s]" in text for text in printed.values())  # progress=False: no bar in what it keeps
    assert "This notebook ran in" in printed["clock"]
    run_dirs = list((Path.cwd() / "runs").iterdir())
    assert len(run_dirs) == 1 and {"best.pt", "report.html", "judgements.jsonl"} <= {p.name for p in run_dirs[0].iterdir()}


def test_the_committed_notebook_holds_one_run_top_to_bottom_without_an_error_and_stays_small():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))  # one run, in order
    assert all(cell.outputs for cell in code if cell.metadata["tags"] != ["install"])  # it prints what it installs
    assert not any(output.output_type == "error" for cell in code for output in cell.outputs)
    pictures = [base64.b64decode(output.data["image/png"]) for cell in code for output in cell.outputs
                if output.output_type == "display_data" and "image/png" in output.data]
    assert len(pictures) == 3 and all(len(picture) < 150_000 for picture in pictures)
    assert NOTEBOOK.stat().st_size < 500_000
