"""train.py: data rules, tokenisation traps, schedule, the loop, checkpoints and resume."""
import dataclasses
import gzip
import json
import math
import random
import re
import shlex
import signal
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import checkpoints
import cli
import data
import dpo
import lora
import models
import train
from conftest import gpt2_tokenizer, tiny_gpt2
from settings import config_from_dict

H, A = "\n\nHuman:", "\n\nAssistant:"


def record(prompt, chosen, rejected):
    return {"chosen": prompt + chosen, "rejected": prompt + rejected}


def write_jsonl(path, rows, gz=False):
    lines = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(lines)
    else:
        path.write_text(lines)
    return str(path)


def tiny_config(data, model_dir, run_dir, **overrides):
    settings = dict(data=data, model=model_dir, dtype="float32", val_size=4, test_size=4, max_length=48, max_prompt_length=24,
                    batch_size=2, lr=5e-3, warmup_steps=2, eval_every=2, checkpoint_every=2,
                    checkpoint_dir=str(run_dir), progress=False)
    return train.TrainConfig(**{**settings, **overrides})


def synthetic_rows(n, seed=0):
    """Dialogues where the chosen answer is polite and the rejected one rude, in varied words."""
    rng = random.Random(seed)
    topics = ["the weather", "a recipe", "my homework", "a poem", "the news", "a trip", "my cat", "music"]
    rows = []
    for i in range(n):
        prompt = f"{H} Can you help me with {rng.choice(topics)}?{A} Sure.{H} Thanks, number {i}.{A}"
        rows.append(record(prompt, " You are welcome, happy to help.", " Go away, I will not help you."))
    return rows


# ----- splitting records --------------------------------------------------------------

def test_prompt_ends_at_the_last_assistant_turn():
    prompt = f"{H} hi{A} hello{H} how are you?{A}"
    pair = data.split_prompt(prompt + " Fine, thanks.", prompt + " Fine. Go away.")
    assert pair == data.Pair(prompt, " Fine, thanks.", " Fine. Go away.")
    # not the longest common prefix, which would run into " Fine" (docs/PITFALLS.md 1)
    assert pair.prompt.endswith(A) and pair.chosen.startswith(" Fine")


@pytest.mark.parametrize("chosen, rejected, reason", [
    (f"{H} hi there", f"{H} hi there", "no Assistant turn"),
    (f"{H} hi{A} a", f"{H} hello{A} b", "prompts differ"),
    (f"{H} hi{A} a", f"{H} hi{A} b{H} more{A} c", "prompts differ"),
    (f"{H} hi{A}", f"{H} hi{A} b", "empty response"),
    (f"{H} hi{A} a", f"{H} hi{A}   ", "empty response"),
    (f"{H} hi{A} same", f"{H} hi{A} same", "identical responses"),
])
def test_bad_pairs_are_dropped_with_a_reason(chosen, rejected, reason):
    assert data.split_prompt(chosen, rejected) == reason


def test_drops_are_counted_not_trained_on(tmp_path):
    rows = synthetic_rows(5) + [record(f"{H} x{A}", " same", " same"), {"chosen": f"{H} a{A} b", "rejected": f"{H} c{A} d"}]
    counts = {}
    pairs = data.load_pairs(write_jsonl(tmp_path / "d.jsonl.gz", rows, gz=True), counts=counts)
    assert len(pairs) == 5 and counts == {"identical responses": 1, "prompts differ": 1}


@pytest.mark.parametrize("bad_line, reason", [
    ("{not json", "malformed line"),
    ("[1, 2]", "expected a JSON object"),
    ('{"chosen": 3, "rejected": "x"}', "must be strings"),
    ('{"chosen": "x"}', "must be strings"),
])
def test_a_malformed_line_stops_with_file_and_line(tmp_path, bad_line, reason):
    path = write_jsonl(tmp_path / "d.jsonl", synthetic_rows(2) + [bad_line] + synthetic_rows(1))
    with pytest.raises(data.DataError, match=rf"d\.jsonl:3: .*{reason}"):
        data.load_pairs(path)
    counts = {}
    assert len(data.load_pairs(path, skip_bad_lines=True, counts=counts)) == 3
    assert counts == {"malformed line": 1}


def test_missing_data_file_is_a_clear_error(tmp_path):
    with pytest.raises(data.DataError, match="data file not found"):
        data.load_pairs(str(tmp_path / "nope.jsonl"))


def test_truncated_gzip_is_a_clear_error(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    write_jsonl(path, synthetic_rows(200), gz=True)
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(data.DataError, match="cannot read"):
        data.load_pairs(str(path))


def test_single_file_gives_seeded_disjoint_validation_and_test_splits(tmp_path):
    config = train.TrainConfig(data=write_jsonl(tmp_path / "d.jsonl", synthetic_rows(30)), val_size=8, test_size=6,
                               num_examples=10)
    train_pairs, val_pairs, test_pairs = checkpoints.split_data_of(config)
    assert (len(train_pairs), len(val_pairs), len(test_pairs)) == (10, 8, 6)
    assert not set(train_pairs) & set(val_pairs) and not set(train_pairs) & set(test_pairs)
    assert not set(val_pairs) & set(test_pairs)
    assert checkpoints.split_data_of(config) == (train_pairs, val_pairs, test_pairs)
    assert checkpoints.split_data_of(dataclasses.replace(config, seed=5)) == (train_pairs, val_pairs, test_pairs)  # split_seed's
    assert checkpoints.held_out_pairs({"config": vars(config)}, "old.pt") == test_pairs  # no fingerprint: said, not refused


# ----- tokenisation ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


def test_prompt_and_responses_are_tokenised_separately(tokenizer):
    """' Hi' after 'Assistant:' must not merge with the prompt's last token (docs/PITFALLS.md 1)."""
    pair = data.Pair(f"{H} hello{A}", " Hi there", " No")
    item = data.tokenize_pair(pair, tokenizer, 64, 32)
    assert item.prompt_ids == tokenizer(pair.prompt).input_ids
    assert item.chosen_ids == tokenizer(" Hi there").input_ids + [tokenizer.eos_token_id]
    assert item.rejected_ids == tokenizer(" No").input_ids + [tokenizer.eos_token_id]


def test_long_prompts_keep_their_last_tokens_and_responses_their_first(tokenizer):
    prompt = H + " one two three four five six seven eight nine ten" + A
    pair = data.Pair(prompt, " a b c d e f g h", " x")
    prompt_ids = tokenizer(prompt).input_ids
    item = data.tokenize_pair(pair, tokenizer, max_length=12, max_prompt_length=6)
    assert item.prompt_ids == prompt_ids[-6:]
    assert item.chosen_ids == tokenizer(" a b c d e f g h").input_ids[:6]   # cut: no EOS, it did not end there
    assert item.rejected_ids == tokenizer(" x").input_ids + [tokenizer.eos_token_id]


@settings(max_examples=200, deadline=None)
@given(prompt_ids=st.lists(st.integers(0, 9), min_size=1, max_size=12), bos=st.booleans(), keep=st.integers(1, 14))
def test_a_kept_prompt_is_its_bos_and_last_tokens_never_longer_than_asked(prompt_ids, bos, keep):
    """With a BOS-adding tokenizer and a budget of 1, the old slice [-0:] kept the whole prompt."""
    ids = ([99] if bos else []) + prompt_ids
    kept = data.keep_prompt_end(ids, 99, keep)
    assert len(kept) == min(len(ids), max(keep, int(bos)))
    rest = kept[1:] if bos else kept
    assert not bos or kept[0] == 99  # the BOS stays
    assert rest == ids[len(ids) - len(rest):]  # the end of the dialogue


def test_the_cli_reads_any_plain_field_type_or_says_which_it_cannot():
    @dataclasses.dataclass
    class Knobs:
        ratio: float | None = None   # a float or nothing
        name: str = "x"              # a name
        on: bool = False             # a switch
    parsed = cli.config_parser(Knobs, "k", "").parse_args(["--ratio", "0.5", "--on"])
    assert (parsed.ratio, parsed.name, parsed.on) == (0.5, "x", True)

    @dataclasses.dataclass
    class Odd:
        sizes: list[int] = dataclasses.field(default_factory=list)  # sizes
    with pytest.raises(TypeError, match="Odd.sizes: the CLI reads int, float, str, bool"):
        cli.config_parser(Odd, "k", "")


def test_eos_is_scored_even_when_pad_equals_eos(tokenizer):
    """GPT-2 pads with EOS; the mask comes from lengths, so the response's EOS still counts (docs/PITFALLS.md 2)."""
    assert tokenizer.pad_token_id in (None, tokenizer.eos_token_id)
    items = [data.tokenize_pair(data.Pair(f"{H} q{A}", " yes", " no no no no"), tokenizer, 32, 16)]
    batch = data.collate(items, [0], pad_id=tokenizer.eos_token_id)
    chosen_row = batch.input_ids[0]
    eos_positions = (chosen_row == tokenizer.eos_token_id).nonzero().flatten()
    first_eos = int(eos_positions[0])  # the chosen response's own EOS, padding follows it
    assert batch.response_mask[0, first_eos] and not batch.response_mask[0, first_eos + 1:].any()
    assert batch.attention_mask[0].sum() == first_eos + 1


def test_collate_puts_chosen_first_and_masks_only_responses(tokenizer):
    items = [data.tokenize_pair(data.Pair(f"{H} q{i}{A}", " yes" * (i + 1), " no"), tokenizer, 32, 16) for i in range(3)]
    batch = data.collate(items, [0, 1, 2], pad_id=0)
    assert batch.input_ids.shape[0] == 6
    for row, item in enumerate(items):
        for offset, response in ((0, item.chosen_ids), (3, item.rejected_ids)):
            mask = batch.response_mask[row + offset]
            assert batch.input_ids[row + offset][mask].tolist() == response
            assert not mask[:len(item.prompt_ids)].any()


# ----- schedule ---------------------------------------------------------------------------

def test_learning_rate_schedule_values():
    lr = lambda step, schedule="cosine": train.learning_rate(step, 1.0, 4, 14, schedule)
    assert [lr(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr(4) == 1.0 and lr(9) == pytest.approx(0.5) and lr(14) == pytest.approx(0.0)
    assert lr(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    assert all(lr(s, "constant") == 1.0 for s in range(4, 20))
    assert all(lr(s) >= lr(s + 1) for s in range(4, 20))


# ----- the model path -----------------------------------------------------------------------

def test_logps_from_response_hidden_states_equal_full_logits(tokenizer):
    """The fast path (output layer on response positions only) computes the same numbers."""
    model = tiny_gpt2(vocab_size=50257)
    items = [data.tokenize_pair(data.Pair(f"{H} q {i}{A}", " yes" * (i + 1), " no"), tokenizer, 32, 16) for i in range(3)]
    batch = data.collate(items, [0, 1, 2], pad_id=tokenizer.eos_token_id)
    with torch.no_grad():
        fast = models.batch_logps(model, batch)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        full = dpo.sequence_logps(logits, batch.input_ids, batch.response_mask)
    torch.testing.assert_close(fast.sum, full.sum, rtol=1e-5, atol=1e-4)
    assert torch.equal(fast.count, full.count)
    torch.testing.assert_close(fast.tokens[batch.target_mask], full.tokens[batch.response_mask[:, 1:].bool()],
                               rtol=1e-5, atol=1e-4)  # term by term, in each answer's order


def test_loaded_model_has_no_dropout_so_policy_equals_reference_at_step_zero(tiny_gpt2_dir, tokenizer):
    """docs/PITFALLS.md 3 and 5: in train mode, with dropout off, loss is log 2 and rewards 0 exactly."""
    model, _ = models.load_model_and_tokenizer(tiny_gpt2_dir, "float32")
    lora.add_lora(model, lora.LoRAConfig(r=4, dropout=0.0))
    model.train()
    items = [data.tokenize_pair(p, tokenizer, 48, 24) for p in data.records_to_pairs(
        enumerate(synthetic_rows(4), 1), "x", False, {})]
    batch = data.collate(items, list(range(4)), tokenizer.eos_token_id)
    config = train.TrainConfig(beta=0.1)
    result = train.compute_loss(model, batch, train.ReferenceCache(4), config)
    assert torch.equal(result.losses, torch.full((4,), math.log(2)))
    assert torch.equal(result.chosen_rewards, torch.zeros(4)) and torch.equal(result.accuracies, torch.full((4,), 0.5))


@pytest.mark.parametrize("loss_type", ["sigmoid", "sft"])
def test_training_steps_lower_the_loss_on_a_fixed_batch(tiny_gpt2_dir, tokenizer, loss_type):
    """DPO from log 2 (policy = reference), SFT (the chosen answers' NLL per token) from the base model's."""
    model, _ = models.load_model_and_tokenizer(tiny_gpt2_dir, "float32")
    lora.add_lora(model, lora.LoRAConfig(r=4))
    items = [data.tokenize_pair(p, tokenizer, 48, 24) for p in data.records_to_pairs(
        enumerate(synthetic_rows(4), 1), "x", False, {})]
    batch = data.collate(items, list(range(4)), tokenizer.eos_token_id)
    config, reference = train.TrainConfig(loss_type=loss_type), train.ReferenceCache(4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(4):  # B = 0 at the first step, so the first update moves B only
        result = train.compute_loss(model, batch, reference, config)
        losses.append(result.loss.item())
        if step < 3:
            result.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    assert losses[3] < losses[2] < losses[1] < losses[0]
    if loss_type == "sigmoid":
        assert losses[0] == pytest.approx(math.log(2))
    else:
        assert result.count.tolist() == [len(it.chosen_ids) for it in items]  # the chosen answers only


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model not found"):
        models.load_model_and_tokenizer(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="model not found"):
        models.load_model_and_tokenizer("./no/such/folder")


# ----- the whole loop: checkpoints, resume, early stopping ----------------------------------

def test_training_learns_and_writes_loadable_checkpoints(tmp_path, tiny_gpt2_dir):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_rows(24))
    result = train.train(tiny_config(data, tiny_gpt2_dir, tmp_path / "run", epochs=3))
    assert result["val_metrics"]["loss"] < math.log(2) and result["val_metrics"]["reward_accuracy"] > 0.5
    for name in ("best.pt", "last.pt", "metrics.jsonl", "curves.png"):
        assert (tmp_path / "run" / name).exists()
    best = checkpoints.load_checkpoint(str(tmp_path / "run" / "best.pt"))  # weights_only=True inside
    assert best["base_model"] == tiny_gpt2_dir and best["lora"]["targets"] == ["c_attn", "c_proj", "c_fc"]
    assert set(best) >= {"adapters", "config", "step", "val_metrics"} and "optimizer" not in best
    model, _ = checkpoints.load_policy(best)
    assert all(torch.equal(t, lora.adapter_state_dict(model)[k]) for k, t in best["adapters"].items())
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {**rows[0], "step": 0, "split": "val", "loss": pytest.approx(math.log(2)), "reward_accuracy": 0.5}
    test_row, run_row = rows[-2:]  # best.pt on the test pairs, once, with Wilson's interval; the run's time
    assert test_row["split"] == "test" and test_row["step"] == best["step"] and test_row["n"] == 4
    assert result["test_metrics"] == {k: v for k, v in test_row.items() if k not in ("step", "split", "checkpoint", "pairs_sha256")}
    assert run_row["split"] == "run" and run_row["step"] == result["step"] and (tmp_path / "run" / "report.html").exists()
    low, high = test_row["reward_accuracy_interval"]
    assert (low, high) == dpo.wilson_interval(round(4 * test_row["reward_accuracy"]), 4) and low <= test_row["reward_accuracy"] <= high
    assert [r["split"] for r in rows].count("test") == 1


def with_test_answers_swapped(path, config):
    """The same file with every test pair's answers swapped: other test figures, and nothing else
    a run can read before its end should differ."""
    test_prompts = {pair.prompt for pair in checkpoints.split_data_of(config).test}
    rows = [json.loads(line) for line in open(path)]
    rows = [{"chosen": r["rejected"], "rejected": r["chosen"]} if data.split_prompt(r["chosen"], r["rejected"]).prompt
            in test_prompts else r for r in rows]
    return write_jsonl(Path(path).with_name("swapped.jsonl"), rows)


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(patience=st.integers(0, 2), split_seed=st.integers(0, 9))
def test_validation_and_early_stopping_never_see_the_test_pairs(tmp_path_factory, tiny_gpt2_dir, patience, split_seed):
    """Two runs whose test pairs state opposite preferences: every row before the end, every
    early-stopping decision and best.pt's adapters are the same bit for bit; the test row differs."""
    folder = tmp_path_factory.mktemp("unseen")
    original = write_jsonl(folder / "d.jsonl", synthetic_rows(24))
    runs = []
    for name in ("original", "swapped"):
        config = tiny_config(original, tiny_gpt2_dir, folder / name, epochs=2, eval_every=1,
                             early_stop_patience=patience, split_seed=split_seed)
        if name == "swapped":
            config = dataclasses.replace(config, data=with_test_answers_swapped(original, config))
        summary = train.train(config)
        rows = [row for row in checkpoints.read_log(folder / name / "metrics.jsonl") if row["split"] != "run"]  # wall time
        runs.append((summary, rows, checkpoints.load_checkpoint(str(folder / name / "best.pt"))))
    (first, first_rows, first_best), (second, second_rows, second_best) = runs
    assert first_rows[:-1] == second_rows[:-1] and first["stopped_early"] == second["stopped_early"]
    assert all(torch.equal(first_best["adapters"][k], second_best["adapters"][k]) for k in first_best["adapters"])
    assert first_rows[-1]["split"] == second_rows[-1]["split"] == "test"
    assert first_rows[-1]["reward_accuracy"] + second_rows[-1]["reward_accuracy"] == pytest.approx(1.0)  # mirrored


def test_a_run_resumed_into_another_folder_scores_its_own_best_pt_and_never_enters_another_run(tmp_path, tiny_gpt2_dir):
    data_file = write_jsonl(tmp_path / "d.jsonl", synthetic_rows(24))
    train.train(tiny_config(data_file, tiny_gpt2_dir, tmp_path / "a", max_steps=4, checkpoint_every=1))
    train.train(tiny_config(data_file, tiny_gpt2_dir, tmp_path / "other", max_steps=1))
    with pytest.raises(ValueError, match="holds another run"):
        train.train(train.TrainConfig(resume=str(tmp_path / "a" / "last.pt"), checkpoint_dir=str(tmp_path / "other")))
    train.train(train.TrainConfig(resume=str(tmp_path / "a" / "last.pt"), checkpoint_dir=str(tmp_path / "b"), progress=False))
    rows = checkpoints.read_log(tmp_path / "b" / "metrics.jsonl")
    original = checkpoints.read_log(tmp_path / "a" / "metrics.jsonl")
    sessions = [row for row in rows if row["split"] == "run"]  # the wall time of each: a's, then b's
    assert len(sessions) == 2 and sessions[0] == original[-1] and rows[-1] == sessions[1]
    rows, original = ([row for row in log if row["split"] != "run"] for log in (rows, original))
    assert rows == original  # the whole log, its test row of the same best.pt, once
    assert [row["split"] for row in rows].count("test") == 1
    assert rows[-1]["step"] == checkpoints.load_checkpoint(str(tmp_path / "b" / "best.pt"))["step"]


def test_a_test_split_asked_for_and_left_empty_is_one_line_not_a_silent_run_without_it(tmp_path, tiny_gpt2_dir):
    """Every test pair dropped (here: its prompt has no token) would leave no test figure."""
    order = list(range(24))
    random.Random(0).shuffle(order)  # the seeded shuffle split_data uses: the test pairs are its last 4
    rows = [{"prompt": "" if i in order[-4:] else f"{H} Question {i}?{A}", "chosen": " Yes.", "rejected": " No."}
            for i in range(24)]
    data_file = write_jsonl(tmp_path / "d.jsonl", rows)
    config = tiny_config(data_file, tiny_gpt2_dir, tmp_path / "run", max_steps=1)
    assert all(pair.prompt == "" for pair in checkpoints.split_data_of(config).test)
    with pytest.raises(data.DataError, match=r"too few usable pairs: \d+ train, 4 validation, 0 test"):
        train.train(config)


def test_an_old_checkpoint_without_a_test_split_loads_and_says_so(tmp_path, tiny_gpt2_dir, capsys):
    """Written before Dec 2026: no test_size nor split_seed (seed made the split), no test fingerprint."""
    data_file = write_jsonl(tmp_path / "d.jsonl", synthetic_rows(20))
    train.train(tiny_config(data_file, tiny_gpt2_dir, tmp_path / "run", max_steps=1, test_size=0, seed=3, split_seed=3))
    new = checkpoints.load_checkpoint(str(tmp_path / "run" / "best.pt"))
    old = {**new, "config": {k: v for k, v in new["config"].items() if k not in ("test_size", "split_seed")}}
    assert set(old["data_sha256"]) == {"train", "validation"}
    capsys.readouterr()
    held_out = checkpoints.held_out_pairs(old, "old.pt")
    assert held_out == checkpoints.split_data_of(config_from_dict(new["config"])).validation and len(held_out) == 4
    assert "old.pt has no test split (--test-size 0, or an older train.py): its validation pairs instead" in capsys.readouterr().err
    summary = train.train(dataclasses.replace(config_from_dict(old["config"]), checkpoint_dir=str(tmp_path / "again"),
                                              max_steps=1))
    assert summary["test_metrics"] is None  # and its split is the old one: seed 3's
    assert checkpoints.load_checkpoint(str(tmp_path / "again" / "best.pt"))["data_sha256"] == new["data_sha256"]


# --max-steps 7 sets the cosine schedule's length (8 steps of data): a bare --resume must keep it.
RESUME_SETTINGS = dict(epochs=2, max_steps=7, lora_dropout=0.1, grad_accum=2, warmup_steps=2, eval_every=3,
                       checkpoint_every=2)
UNINTERRUPTED = {}  # stage -> the run that never stopped, trained once for all the examples below


def run_rows(run_dir):
    return [(r["step"], r["split"], r["loss"]) for r in checkpoints.read_log(run_dir / "metrics.jsonl") if r["split"] != "run"]


def stop_at(step, monkeypatch):
    """Ctrl-C right after the train row of `step` is written: the real signal handler takes it."""
    write = checkpoints.write_metrics

    def write_then_interrupt(file, row):
        write(file, row)
        if row["split"] == "train" and row["step"] == step:
            signal.raise_signal(signal.SIGINT)
    monkeypatch.setattr(checkpoints, "write_metrics", write_then_interrupt)


def stage_settings(stage, tmp_path_factory, data, model_dir):
    """The settings of a run of this stage: DPO alone, SFT, or DPO after an SFT run (made once)."""
    if stage == "sft":
        return dict(loss_type="sft")
    if stage == "dpo after sft":
        if "sft checkpoint" not in UNINTERRUPTED:
            run = tmp_path_factory.mktemp("sft-stage")
            train.train(tiny_config(data, model_dir, run, loss_type="sft", epochs=2))
            UNINTERRUPTED["sft checkpoint"] = str(run / "best.pt")
        return dict(sft_checkpoint=UNINTERRUPTED["sft checkpoint"])
    return {}


@pytest.mark.parametrize("stage", ["dpo", "sft", "dpo after sft"])
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stop_step=st.integers(1, 6))
def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path_factory, tiny_gpt2_dir, stage, stop_step):
    """Stopped at any step (warmup or cosine decay, LoRA dropout on, 2 micro-batches a step) of a
    DPO, SFT or after-SFT DPO run, then continued with a bare --resume: the same rows and
    bit-identical adapters as a run never stopped."""
    data_dir = tmp_path_factory.getbasetemp() / "resume-data"
    data_dir.mkdir(exist_ok=True)
    data = write_jsonl(data_dir / "d.jsonl", synthetic_rows(24))  # 16 train pairs: 4 steps an epoch
    settings = {**RESUME_SETTINGS, **stage_settings(stage, tmp_path_factory, data, tiny_gpt2_dir)}
    if stage not in UNINTERRUPTED:
        run = tmp_path_factory.mktemp("uninterrupted")
        UNINTERRUPTED[stage] = dict(summary=train.train(tiny_config(data, tiny_gpt2_dir, run, **settings)),
                                    rows=run_rows(run), adapters=torch.load(run / "last.pt", weights_only=True)["adapters"])
    uninterrupted = UNINTERRUPTED[stage]
    run = tmp_path_factory.mktemp("stopped")
    with pytest.MonkeyPatch.context() as monkeypatch:
        stop_at(stop_step, monkeypatch)
        stopped = train.train(tiny_config(data, tiny_gpt2_dir, run, **settings))
    assert stopped["interrupted"] and stopped["step"] == stop_step
    assert train.main(["--resume", str(run / "last.pt"), "--no-progress"]) == 0
    assert run_rows(run) == uninterrupted["rows"] and uninterrupted["summary"]["step"] == 7
    sessions = [(r["step"], r["stopped"]) for r in checkpoints.read_log(run / "metrics.jsonl") if r["split"] == "run"]
    assert sessions == [(stop_step, f"interrupted at step {stop_step} (Ctrl-C or SIGTERM); --resume continues it"),
                        (7, "--max-steps 7 reached")]  # each session's wall time, and why it stopped
    adapters = torch.load(run / "last.pt", weights_only=True)["adapters"]
    assert all(torch.equal(adapters[k], uninterrupted["adapters"][k]) for k in adapters)


# ----- the supervised stage, and DPO after it ------------------------------------------------

def test_dpo_after_sft_starts_from_the_sft_model_as_policy_and_reference(tmp_path, tiny_gpt2_dir, tokenizer):
    """The SFT adapters merged into the weights: adapters off is the SFT model (exactly the network
    judge.py rebuilds, and the unmerged SFT model to float rounding), DPO's first loss is log 2."""
    data_file = write_jsonl(tmp_path / "d.jsonl", synthetic_rows(24))
    sft = train.train(tiny_config(data_file, tiny_gpt2_dir, tmp_path / "sft", loss_type="sft", epochs=2))
    sft_rows = checkpoints.read_log(tmp_path / "sft" / "metrics.jsonl")
    assert sft_rows[0]["perplexity"] > sft["val_metrics"]["perplexity"]  # it learned the chosen answers
    assert sft["val_metrics"]["loss"] == pytest.approx(math.log(sft["val_metrics"]["perplexity"]))
    sft_best = checkpoints.load_checkpoint(str(tmp_path / "sft" / "best.pt"))
    dpo = train.train(tiny_config(data_file, "gpt2", tmp_path / "dpo", sft_checkpoint=str(tmp_path / "sft" / "best.pt"),
                                  max_steps=2))  # --model left at its default: the SFT run's model
    rows = checkpoints.read_log(tmp_path / "dpo" / "metrics.jsonl")
    assert rows[0]["step"] == 0 and rows[0]["loss"] == torch.tensor(math.log(2)).item()  # log 2 in fp32, exactly
    assert rows[0]["chosen_reward"] == rows[0]["rejected_reward"] == 0.0 and rows[0]["reward_accuracy"] == 0.5
    best = checkpoints.load_checkpoint(str(tmp_path / "dpo" / "best.pt"))
    assert best["base_model"] == tiny_gpt2_dir and best["config"]["model"] == tiny_gpt2_dir
    assert all(torch.equal(best["sft"]["adapters"][k], t) for k, t in sft_best["adapters"].items())

    items = [data.tokenize_pair(p, tokenizer, 48, 24) for p in checkpoints.split_data_of(config_from_dict(best["config"]))[1]]
    batch = data.collate(items, list(range(len(items))), tokenizer.eos_token_id)
    policy, _ = checkpoints.load_policy(best)
    with torch.no_grad(), lora.adapters_disabled(policy):
        reference = models.batch_logps(policy, batch).sum
    sft_model, _ = models.load_model_and_tokenizer(tiny_gpt2_dir, "float32")
    checkpoints.fold_sft_stage(sft_model, best["sft"])
    sft_unmerged, _ = checkpoints.load_policy(sft_best)
    with torch.no_grad():
        assert torch.equal(reference, models.batch_logps(sft_model, batch).sum)
        torch.testing.assert_close(reference, models.batch_logps(sft_unmerged, batch).sum, rtol=1e-5, atol=1e-4)
        assert not torch.allclose(reference, models.batch_logps(models.load_model_and_tokenizer(tiny_gpt2_dir)[0], batch).sum)
    assert dpo["step"] == 2


@pytest.mark.parametrize("change, message", [
    ({"loss_type": "sigmoid"}, "is a sigmoid run, not an SFT run"),
    ({"split_seed": 1}, "held out other validation or test pairs"),
    ({"model": "other-model"}, "drop --model"),
])
def test_dpo_after_sft_refuses_what_would_not_be_the_sft_model(tmp_path, tiny_gpt2_dir, change, message):
    data_file = write_jsonl(tmp_path / "d.jsonl", synthetic_rows(12))
    sft_settings = {"loss_type": "sft", "max_steps": 1, **({"loss_type": "sigmoid"} if "loss_type" in change else {})}
    train.train(tiny_config(data_file, tiny_gpt2_dir, tmp_path / "first", **sft_settings))
    dpo_settings = {k: v for k, v in change.items() if k != "loss_type"}
    with pytest.raises(ValueError, match=message):
        train.train(tiny_config(data_file, tiny_gpt2_dir, tmp_path / "dpo",
                                sft_checkpoint=str(tmp_path / "first" / "best.pt"), **dpo_settings))
    with pytest.raises(ValueError, match="drop --sft-checkpoint"):
        train.TrainConfig(loss_type="sft", sft_checkpoint="x.pt")


def test_pairs_whose_kept_prompts_are_a_held_out_ones_never_train_and_the_sft_stage_still_fits(tmp_path, tiny_gpt2_dir):
    """36 prompts, each its own text, but 24 kept tokens see only the last question, of which
    there are 12: the run drops every training pair whose kept prompt a held-out pair has, says
    so, and DPO after an SFT run on that file recomputes the same pairs (its data check passes)."""
    rows = [record(f"{H} This is dialogue number {i}, and it is told at some length before its question, "
                   f"so that the start of it is cut away.{A} Go on.{H} What is question {i % 12}?{A}",
                   f" Answer {i % 12}.", " No.") for i in range(36)]
    data_file = write_jsonl(tmp_path / "d.jsonl", rows)
    sft = train.train(tiny_config(data_file, tiny_gpt2_dir, tmp_path / "sft", loss_type="sft", max_steps=1))
    splits = checkpoints.split_data_of(tiny_config(data_file, tiny_gpt2_dir, tmp_path))
    assert sum(map(len, splits)) == 36  # by their text, no prompt is another's
    plain = [data.tokenize_pairs(split, models.cached_tokenizer(tiny_gpt2_dir), 48, 24, {}) for split in splits]
    test = {tuple(item.prompt_ids) for item in plain[2]}
    validation = {tuple(item.prompt_ids) for item in plain[1]} - test
    kept_in = lambda items, prompts: sum(tuple(item.prompt_ids) in prompts for item in items)
    expected = {"a test pair's prompt": kept_in(plain[1], test),
                "a held-out pair's prompt": kept_in(plain[0], validation | test)}
    assert expected["a held-out pair's prompt"] > 0 and sft["dropped"] == {k: n for k, n in expected.items() if n}
    dpo = train.train(tiny_config(data_file, tiny_gpt2_dir, tmp_path / "dpo",
                                  sft_checkpoint=str(tmp_path / "sft" / "best.pt"), max_steps=1))
    assert dpo["dropped"] == sft["dropped"] and dpo["step"] == 1


def swap_answers(path):
    """The same file, the same size, every pair's answers swapped: what a count cannot see."""
    rows = [json.loads(line) for line in open(path)]
    write_jsonl(Path(path), [{"chosen": r["rejected"], "rejected": r["chosen"]} for r in rows])


@pytest.mark.parametrize("use", ["--resume", "--sft-checkpoint", "judge.py"])
def test_a_data_file_changed_since_the_run_is_refused_in_one_line(tmp_path, tiny_gpt2_dir, use):
    data_file = write_jsonl(tmp_path / "d.jsonl", synthetic_rows(12))
    first = tiny_config(data_file, tiny_gpt2_dir, tmp_path / "first", max_steps=2, checkpoint_every=1,
                        loss_type="sft" if use == "--sft-checkpoint" else "sigmoid")
    train.train(first)
    saved = checkpoints.load_checkpoint(str(tmp_path / "first" / "last.pt"))
    assert set(saved["data_sha256"]) == {"train", "validation", "test"}
    swap_answers(data_file)
    message = r"was made with other (train and validation and test|test) pairs than its settings give now"
    with pytest.raises(ValueError, match=message):
        if use == "--resume":  # (it would have run on against a reference cache of the old answers)
            train.train(dataclasses.replace(first, resume=str(tmp_path / "first" / "last.pt"), max_steps=2))
        elif use == "--sft-checkpoint":
            train.train(tiny_config(data_file, tiny_gpt2_dir, tmp_path / "dpo",
                                    sft_checkpoint=str(tmp_path / "first" / "best.pt")))
        else:
            import judge
            judge.evaluate(judge.JudgeConfig(str(tmp_path / "first" / "last.pt"), output=str(tmp_path / "j.jsonl"),
                                             sanity=2, num_test_questions=2), judge=lambda *question: 0.5)


def test_early_stopping_fires_when_validation_loss_stops_falling(tmp_path, tiny_gpt2_dir):
    """Validation pairs state the opposite preference of the training pairs, so learning the
    training pairs can only raise the validation loss."""
    rows = synthetic_rows(24)
    val_index = list(range(len(rows)))
    random.Random(0).shuffle(val_index)  # the same seeded shuffle split_data uses
    for i in val_index[:4]:
        rows[i] = {"chosen": rows[i]["rejected"], "rejected": rows[i]["chosen"]}
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    result = train.train(tiny_config(data, tiny_gpt2_dir, tmp_path / "run", epochs=5, eval_every=1, early_stop_patience=2))
    assert result["stopped_early"] and result["step"] == 2  # two validations in a row above the start
    assert result["best_val_loss"] == pytest.approx(math.log(2))


def test_dtype_auto_is_the_faster_of_bf16_and_fp32_measured_here_and_said_once():
    """Verify, don't enumerate: a bf16 matmul is fast with AMX and emulated (slow) without bf16
    matrix units, so no CPU name decides; the measurement does, and the run records its choice."""
    said = []
    chosen = models.with_measured_dtype(train.TrainConfig(), torch.device("cpu"), 1, said.append)
    assert chosen.dtype in ("float32", "bfloat16") and len(said) == 1 and said[0].startswith(f"--dtype auto: {chosen.dtype}")
    ratio = float(re.search(r"a bf16 matmul took ([0-9.e+-]+)x the time of an fp32 one", said[0]).group(1))
    if abs(ratio - 1) > 0.05:  # the choice follows its own measurement (a second one may differ on a busy machine)
        assert chosen.dtype == ("bfloat16" if ratio < 1 else "float32")
    assert models.with_measured_dtype(train.TrainConfig(dtype="float32"), torch.device("cpu"), 1, said.append).dtype == "float32"
    assert len(said) == 1  # a dtype given is not measured


def test_cli_errors_are_one_line_without_traceback(tmp_path, capsys, tiny_gpt2_dir):
    assert train.main(["--data", str(tmp_path / "missing.jsonl"), "--model", tiny_gpt2_dir]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("train.py: error: data file not found") and "Traceback" not in err and "\n" not in err
    bad = write_jsonl(tmp_path / "bad.jsonl", synthetic_rows(3) + ["{oops"])
    assert train.main(["--data", bad, "--model", tiny_gpt2_dir]) == 1
    assert "bad.jsonl:4: malformed line" in capsys.readouterr().err
    good = write_jsonl(tmp_path / "good.jsonl", synthetic_rows(8))
    assert train.main(["--data", good, "--model", str(tmp_path / "no-model.gguf"), "--val-size", "2",
                       "--test-size", "2"]) == 2
    assert "model not found" in capsys.readouterr().err
    under_a_file = tmp_path / "good.jsonl" / "run"  # a --checkpoint-dir that cannot be made
    assert train.main(["--data", good, "--model", tiny_gpt2_dir, "--val-size", "2", "--test-size", "2", "--checkpoint-dir",
                       str(under_a_file)]) == 1
    assert capsys.readouterr().err.strip() == f"train.py: error: cannot write {under_a_file}: Not a directory"
    for argv in (["--beta", "-1"], ["--lr", "0"], ["--no-such-flag"]):
        with pytest.raises(SystemExit) as exit_info:
            train.parse_args(argv)
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("train.py: error:") and "\n" not in error


def test_dpo_uses_summed_and_ipo_mean_logps():
    """docs/PITFALLS.md 6: mixing them changes the effective beta by the response length."""
    logps = dpo.SequenceLogps(torch.tensor([-6.0, -9.0]), torch.tensor([-2.0, -1.0]), torch.tensor([3, 9]))
    assert torch.equal(train.loss_logps(logps, "sigmoid"), logps.sum)
    assert torch.equal(train.loss_logps(logps, "ipo"), logps.mean)


def test_accumulated_micro_batches_give_the_gradient_of_the_whole_batch(tiny_gpt2_dir, tokenizer):
    """docs/PITFALLS.md 12: each micro-batch loss is divided by the number of micro-batches."""
    model, _ = models.load_model_and_tokenizer(tiny_gpt2_dir, "float32")
    lora.add_lora(model, lora.LoRAConfig(r=4))
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            layer.lora_B.normal_(std=0.1)  # policy != reference, so the gradient is not trivial
    items = [data.tokenize_pair(p, tokenizer, 48, 24) for p in data.records_to_pairs(
        enumerate(synthetic_rows(4), 1), "x", False, {})]
    config, reference = train.TrainConfig(beta=0.1), train.ReferenceCache(4)
    parameters = [p for p in model.parameters() if p.requires_grad]

    def gradient(index_groups):
        for p in parameters:
            p.grad = None
        for index in index_groups:
            batch = data.collate([items[i] for i in index], index, tokenizer.eos_token_id)
            (train.compute_loss(model, batch, reference, config).losses.mean() / len(index_groups)).backward()
        return [p.grad.clone() for p in parameters]

    for whole, accumulated in zip(gradient([[0, 1, 2, 3]]), gradient([[0, 1], [2, 3]])):
        torch.testing.assert_close(accumulated, whole, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("loss_type", ["sigmoid", "sft"])
def test_a_step_of_micro_batches_has_the_gradient_of_its_logged_loss(tmp_path, tiny_gpt2_dir, loss_type):
    """docs/PITFALLS.md 12: the gradient train.py accumulates over micro-batches is the gradient of
    the loss of all of them as one batch: per pair for DPO, per token for SFT, where answers of
    different lengths make the mean of micro-batch means another number."""
    rows = [record(f"{H} Question {i}?{A}", " Yes" + " indeed" * (i % 5) * 3 + ".", " No.") for i in range(16)]
    config = tiny_config(write_jsonl(tmp_path / "d.jsonl", rows), tiny_gpt2_dir, tmp_path / "run", grad_accum=2,
                         loss_type=loss_type, batch_size=2)
    run = train.build_run(config, 0, 1, torch.device("cpu"))
    with torch.no_grad():
        for _, layer in lora.lora_layers(run.model):
            layer.lora_B.normal_(std=0.1)  # policy != reference, so the gradient is not trivial
    parameters = [p for p in run.model.parameters() if p.requires_grad]
    results, units, _ = train.accumulate_gradients(run, 0)
    accumulated = [p.grad.clone() for p in parameters]
    batches = [run.micro_batch(m) for m in range(2)]
    assert loss_type == "sigmoid" or len({train.loss_units(b, loss_type) for b in batches}) == 2  # unequal token counts
    items = [run.train_items[i] for b in batches for i in b.index.tolist()]
    whole = run.collate(items, list(range(len(items))))
    run.train_reference = train.ReferenceCache(len(items))
    for p in parameters:
        p.grad = None
    logged = train.compute_loss(run.model, whole, run.train_reference, config)
    logged.loss.backward()
    assert type(logged).concatenate(results).loss.item() == pytest.approx(logged.loss.item(), rel=1e-6)
    for got, expected in zip(accumulated, (p.grad for p in parameters)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)


def test_resume_keeps_the_runs_settings_and_folder_unless_told_otherwise():
    checkpoint = {"config": vars(train.TrainConfig(checkpoint_dir="runs/x", lr=1e-3, max_steps=10))}
    resumed = train.config_for_resume(train.TrainConfig(resume="runs/x/last.pt"), checkpoint)
    # a bare --resume keeps the run's --max-steps: it sets the schedule's length
    assert (resumed.checkpoint_dir, resumed.lr, resumed.resume, resumed.max_steps) == ("runs/x", 1e-3, "runs/x/last.pt", 10)
    moved = train.config_for_resume(train.TrainConfig(resume="runs/x/last.pt", checkpoint_dir="runs/y", threads=1), checkpoint)
    assert (moved.checkpoint_dir, moved.threads) == ("runs/y", 1)
    with pytest.raises(ValueError, match="trained with --lr 0.001, not 0.005"):
        train.config_for_resume(train.TrainConfig(resume="runs/x/last.pt", lr=5e-3), checkpoint)
    with pytest.raises(ValueError, match="trained with --max-steps 10, not 20"):
        train.config_for_resume(train.TrainConfig(resume="runs/x/last.pt", max_steps=20), checkpoint)


# ----- where model and data come from: the Hub, or the bundled stand-ins ----------------------

def test_hub_defaults_fall_back_to_the_bundled_files_when_the_hub_cannot_be_reached(monkeypatch, capsys):
    monkeypatch.setattr(models, "hub_unreachable_reason", lambda: "HF_HUB_OFFLINE is set")
    offline = models.with_offline_fallbacks(train.TrainConfig())
    assert offline.data == data.BUNDLED_DATA and offline.model.endswith(".gguf") and offline.model == models.bundled_model()
    line = capsys.readouterr().err
    assert line.count("\n") == 1 and "cannot be reached (HF_HUB_OFFLINE is set)" in line and "Gemma 3 270M" in line
    # only what was left at its Hub default is replaced
    mine = models.with_offline_fallbacks(train.TrainConfig(data="mine.jsonl"))
    assert (mine.data, mine.model) == ("mine.jsonl", models.bundled_model())
    assert models.with_offline_fallbacks(train.TrainConfig(data="mine.jsonl", model="m.gguf")) == \
        train.TrainConfig(data="mine.jsonl", model="m.gguf")
    monkeypatch.setattr(models, "hub_unreachable_reason", lambda: None)  # the Hub answers: nothing changes
    assert models.with_offline_fallbacks(train.TrainConfig()) == train.TrainConfig()
    assert (train.TrainConfig().model, train.TrainConfig().data) == ("gpt2", "Anthropic/hh-rlhf")


def test_the_bundled_data_is_real_hh_rlhf_read_like_any_local_file():
    counts = {}
    pairs = data.load_pairs(data.BUNDLED_DATA, counts=counts)
    assert len(pairs) + sum(counts.values()) == 2000 and len(pairs) > 1900
    assert all(p.prompt.startswith("\n\nHuman:") and p.prompt.endswith(A) for p in pairs)


def test_an_unreachable_hub_is_found_in_one_quick_request(monkeypatch):
    import http.server
    import threading

    from huggingface_hub import constants
    check = models.hub_unreachable_reason.__wrapped__  # the uncached function
    for name in models.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert check() == "HF_HUB_OFFLINE is set"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    assert "no answer from http://127.0.0.1:9" in check()
    # a server that answers, even with 404, is a reachable Hub
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    try:
        assert check() is None
    finally:
        server.shutdown()


def test_hub_failures_are_one_line_naming_what_to_do(monkeypatch):
    import datasets

    def cut_off(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Anthropic/hh-rlhf' on the Hub (LocalEntryNotFoundError)\nmore\nlines")
    monkeypatch.setattr(datasets, "load_dataset", cut_off)
    with pytest.raises(data.DataError) as error:
        data.load_pairs(data.HUB_DATASET)
    assert "\n" not in str(error.value) and "ConnectionError: Couldn't reach" in str(error.value) and "--data FILE" in str(error.value)
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import: the env var alone is too late
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # transformers itself fails to fetch the model: no mock
    with pytest.raises(FileNotFoundError) as error:
        models.load_model_and_tokenizer("gpt2-not-in-any-cache")
    assert "\n" not in str(error.value) and "pass --model a local folder or .gguf file" in str(error.value)


def test_checkpoints_that_wrote_none_for_the_hub_still_load():
    old = {**vars(train.TrainConfig()), "data": None}
    assert config_from_dict(old).data == data.HUB_DATASET


# ----- logs cut by a kill --------------------------------------------------------------------

def test_a_cut_last_log_line_is_dropped_at_every_byte_offset(tmp_path, capsys):
    rows = [{"step": 0, "split": "val", "loss": 0.6931}, {"step": 1, "split": "train", "loss": 0.5, "note": "\u00e9"}]
    whole = "".join(json.dumps(r) + "\n" for r in rows).encode()
    last_start = whole.rindex(b"{")
    for cut in range(last_start, len(whole) + 1):
        path = tmp_path / "metrics.jsonl"
        path.write_bytes(whole[:cut])
        kept = checkpoints.read_log(path)
        assert kept == (rows if cut >= len(whole) - 1 else rows[:1]), cut
        assert path.read_bytes() == "".join(json.dumps(r) + "\n" for r in kept).encode()  # appendable again
    assert "metrics.jsonl: its last line is cut short" in capsys.readouterr().err
    path.write_bytes(b'{"step": 0}\n{"ste\n{"step": 1}\n')  # damage that is not a cut write
    with pytest.raises(ValueError, match="metrics.jsonl:2: not a record of train.py's metrics"):
        checkpoints.read_log(path)


def test_resume_after_a_cut_metrics_row_continues(tmp_path, tiny_gpt2_dir, capsys, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_rows(20))
    with monkeypatch.context() as patch:
        stop_at(2, patch)
        train.train(tiny_config(data, tiny_gpt2_dir, tmp_path / "run", max_steps=4))
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes() + b'{"step": 3, "split": "train", "lo')  # a kill mid-write
    assert train.main(["--resume", str(tmp_path / "run" / "last.pt"), "--no-progress"]) == 0
    assert "its last line is cut short" in capsys.readouterr().err
    assert [r["step"] for r in checkpoints.read_log(metrics) if r["split"] == "train"] == [1, 2, 3, 4]


# ----- the seed's Python call -----------------------------------------------------------------

def test_run_train_is_the_seeds_call_over_train(tmp_path, tiny_gpt2_dir):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_rows(16))
    summary = train.run_train(model_name=tiny_gpt2_dir, dataset=data, num_examples=8, batch_size=2, num_epochs=2,
                              lr=5e-3, beta=0.2, warmup_steps=1, early_stop_patience=3,
                              checkpoint_dir=str(tmp_path / "run"), val_size=4, test_size=4, max_length=48, max_prompt_length=24,
                              dtype="float32", progress=False)
    assert summary["step"] == 8  # 8 pairs / 2 a batch x 2 epochs
    saved = checkpoints.load_checkpoint(str(tmp_path / "run" / "last.pt"))["config"]
    assert (saved["model"], saved["data"], saved["num_examples"], saved["epochs"], saved["beta"], saved["warmup_steps"],
            saved["early_stop_patience"]) == (tiny_gpt2_dir, data, 8, 2, 0.2, 1, 3)


# ----- round 3: what a row holds, step 0, a run's identity, held out across every door ---------

def model_folder(path, model, tokenizer):
    """A local model folder: weights and tokenizer, as from_pretrained reads them."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("family", ["opt with layerdrop", "phimoe"])
def test_the_first_loss_is_log_2_for_families_random_in_train_mode_beyond_dropout(tmp_path, family, capsys):
    """OPT's layerdrop skips layers at random in train mode and PhiMoE jitters its router's input
    and samples its experts, and no name holds "dropout": the reference was cached from one random
    draw and the first loss was not log 2 (PhiMoE's router, an nn.Linear returning a tuple, also
    took an adapter and ended the run in a traceback). The base model is the reference, so a run
    trains it in eval mode, only the adapters' dropout acting (docs/PITFALLS.md 20)."""
    from conftest import tiny_opt_layerdrop, tiny_phimoe
    tokenizer = gpt2_tokenizer()
    make = {"opt with layerdrop": tiny_opt_layerdrop, "phimoe": tiny_phimoe}[family]
    folder = model_folder(tmp_path / "model", make(vocab_size=len(tokenizer)), tokenizer)
    data_file = write_jsonl(tmp_path / "d.jsonl", synthetic_rows(16))
    train.train(tiny_config(data_file, folder, tmp_path / "run", max_steps=2, eval_every=100, lora_dropout=0.1))
    rows = checkpoints.read_log(tmp_path / "run" / "metrics.jsonl")
    first = next(row for row in rows if row["split"] == "train")
    assert first["step"] == 1 and first["loss"] == torch.tensor(math.log(2)).item()  # policy == reference, exactly
    if family == "phimoe":
        assert "left out: router (a PhimoeTopKRouter whose forward returns a tuple" in capsys.readouterr().err


def test_step_zero_is_measured_a_model_random_in_train_mode_trains_one_random_always_is_refused(tmp_path, tiny_gpt2_dir):
    """check_step_zero on the run's first batch: noise that a model draws only in train mode never
    reaches a run (its base model trains in eval mode), and the first loss is log 2; noise it
    draws in every mode makes the reference one random draw: the run stops in one line."""
    data_file = write_jsonl(tmp_path / "d.jsonl", synthetic_rows(16))
    run = train.build_run(tiny_config(data_file, tiny_gpt2_dir, tmp_path / "run"), 0, 1, torch.device("cpu"))

    def noise(always):
        return lambda module, args, output: output + 0.1 * torch.randn_like(output) if always or module.training else output
    handle = run.model.transformer.ln_f.register_forward_hook(noise(always=False))
    train.check_step_zero(run)
    batch = run.micro_batch(0)
    result = train.compute_loss(lora.train_mode(run.model), batch, run.train_reference, run.config)
    assert torch.equal(result.losses, torch.full_like(result.losses, math.log(2)))
    handle.remove()
    run.model.transformer.ln_f.register_forward_hook(noise(always=True))
    with pytest.raises(train.TrainingError, match=r"^step 0 is not the reference: the reference's log-probs of the first "
                                                  r"batch differ between two forward passes \(by up to [0-9.e+-]+\): the "
                                                  r"model draws random numbers even with its dropout off"):
        train.check_step_zero(run)


def test_a_base_model_whose_weights_changed_under_its_name_is_refused_by_resume_judge_report_and_export(tmp_path):
    """The same folder, the same config, other weights (other values, the same ones rounded to
    bf16 for an fp32 run, or the same ones under another config): --resume went on against a
    reference cached from the old model. A run's identity covers its base model
    (models.weights_sha256: config and weights, in the run's dtype)."""
    import export
    import judge
    import report_page
    tokenizer, folder = gpt2_tokenizer(), tmp_path / "model"
    model_folder(folder, tiny_gpt2(seed=0, vocab_size=len(tokenizer)), tokenizer)
    data_file = write_jsonl(tmp_path / "d.jsonl", synthetic_rows(16))
    config = tiny_config(data_file, str(folder), tmp_path / "run", max_steps=4)
    with pytest.MonkeyPatch.context() as monkeypatch:
        stop_at(2, monkeypatch)
        train.train(config)
    last, best = str(tmp_path / "run" / "last.pt"), str(tmp_path / "run" / "best.pt")
    model_folder(folder, tiny_gpt2(seed=1, vocab_size=len(tokenizer)), tokenizer)  # replaced under its name
    message = rf"was trained from other weights than {re.escape(str(folder))} holds now"
    with pytest.raises(ValueError, match=message):
        train.train(dataclasses.replace(config, resume=last))
    with pytest.raises(ValueError, match=message):
        judge.evaluate(judge.JudgeConfig(best, output=str(tmp_path / "j.jsonl"), sanity=2, num_test_questions=2),
                       judge=lambda *question: 0.5)
    with pytest.raises(ValueError, match=message):
        report_page.write_report(tmp_path / "run")
    with pytest.raises(ValueError, match=message):
        export.export(best, peft=str(tmp_path / "peft"))
    rounded = tiny_gpt2(seed=0, vocab_size=len(tokenizer))
    with torch.no_grad():
        for parameter in rounded.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).float())  # saved back rounded: other fp32 weights
    model_folder(folder, rounded, tokenizer)
    with pytest.raises(ValueError, match=message):
        train.train(dataclasses.replace(config, resume=last))
    other_config = tiny_gpt2(seed=0, vocab_size=len(tokenizer))
    other_config.config.layer_norm_epsilon = 0.5  # the very weights, computed with otherwise
    model_folder(folder, other_config, tokenizer)
    with pytest.raises(ValueError, match=message):
        train.train(dataclasses.replace(config, resume=last))
    model_folder(folder, tiny_gpt2(seed=0, vocab_size=len(tokenizer)), tokenizer)  # the weights it trained from, again
    assert train.main(["--resume", last, "--no-progress"]) == 0


DATED_TEMPLATE = ("{{ 'Today Date: ' + strftime_now('%d %b %Y') + '\\n' }}{% for m in messages %}"
                  "{{ '\\n\\n' + ('Human' if m['role'] == 'user' else 'Assistant') + ': ' + m['content'] }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '\\n\\nAssistant:' }}{% endif %}")


def on_day(monkeypatch, day):
    """The machine's clock, as transformers' chat templates read it, on that day."""
    import datetime

    from transformers.utils import chat_template_utils

    class Clock(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime(2026, 12, day, 23, 59)
    monkeypatch.setattr(chat_template_utils, "datetime", Clock)


def test_a_run_whose_chat_template_writes_the_date_resumes_and_is_judged_the_next_day(tmp_path, monkeypatch, capsys):
    """Llama 3's templates write "Today Date:" into every conversation: the token ids, and so the
    fingerprints, changed at midnight, and --resume, --sft-checkpoint, judge.py and report.py all
    refused the run. Rendered as of one fixed day, the run is the same run tomorrow."""
    import judge
    tokenizer = gpt2_tokenizer()
    tokenizer.chat_template = DATED_TEMPLATE
    folder = model_folder(tmp_path / "model", tiny_gpt2(vocab_size=len(tokenizer)), tokenizer)
    rows = [{"prompt": [{"role": "user", "content": f"Can you help me with task {i}?"}],
             "chosen": [{"role": "assistant", "content": "Yes, gladly."}],
             "rejected": [{"role": "assistant", "content": "No. Go away."}]} for i in range(16)]
    config = tiny_config(write_jsonl(tmp_path / "d.jsonl", rows), folder, tmp_path / "run", max_steps=4, max_length=64,
                         max_prompt_length=40)
    on_day(monkeypatch, 3)
    with pytest.MonkeyPatch.context() as interrupt:
        stop_at(2, interrupt)
        train.train(config)
    said = capsys.readouterr().err
    on_day(monkeypatch, 4)  # the next day
    last = str(tmp_path / "run" / "last.pt")
    assert train.main(["--resume", last, "--no-progress"]) == 0
    assert "the chat template writes the date it is rendered on: conversations are rendered as of 26 Jul 2024" in said
    judge.evaluate(judge.JudgeConfig(str(tmp_path / "run" / "best.pt"), output=str(tmp_path / "j.jsonl"), sanity=2,
                                     num_test_questions=1, max_new_tokens=2), judge=lambda *question: 0.5)


def test_a_tokenizer_that_puts_something_between_prompt_and_answer_is_fixed_or_its_pairs_dropped(tmp_path, capsys):
    """Measured on the run's own tokenizer at its start: an EOS it puts after every text
    (add_eos_token) stays out of every prompt, said once; a pair whose seam cannot be cut cleanly
    (a token spanning "\\n" and the answer's "H", with a dummy prefix space before an answer
    alone) is dropped and counted rather than trained on a space the data does not hold; a
    tokenizer without EOS is one line (no answer could be scored as ending)."""
    from conftest import sentencepiece_style_tokenizer, tiny_llama
    rows = [{"prompt": f"{H} Question {i}?\n", "chosen": "Hi, yes.", "rejected": "No."} for i in range(16)]
    data_file = write_jsonl(tmp_path / "d.jsonl", rows)
    eos_adding = sentencepiece_style_tokenizer(add_eos=True)
    folder = model_folder(tmp_path / "eos", tiny_llama(vocab_size=len(eos_adding)), eos_adding)
    run = train.build_run(tiny_config(data_file, folder, tmp_path / "run"), 0, 1, torch.device("cpu"))
    said = [line for line in capsys.readouterr().err.splitlines() if "after every text" in line]
    assert said == ["the tokenizer puts '</s>' after every text it encodes (add_eos_token): prompts are encoded without "
                    "it, so nothing stands between a prompt and its answer"]
    for item in run.train_items + run.val_items + run.test_items:
        assert item.prompt_ids[0] == eos_adding.bos_token_id and eos_adding.eos_token_id not in item.prompt_ids
    spanning = sentencepiece_style_tokenizer(add_prefix_space=True, merges=(("\n", "H"),))
    folder = model_folder(tmp_path / "spanning", tiny_llama(vocab_size=len(spanning)), spanning)
    assert train.main(["--data", data_file, "--model", folder, "--val-size", "4", "--test-size", "4", "--max-length", "48",
                       "--max-prompt-length", "24", "--checkpoint-dir", str(tmp_path / "refused")]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == (f"train.py: error: too few usable pairs: 0 train, 0 validation, 0 test (dropped: "
                     f"{{{data.SEAM_DROP!r}: 16}})") and not (tmp_path / "refused" / "last.pt").exists()
    no_eos = sentencepiece_style_tokenizer()
    no_eos.eos_token = None
    folder = model_folder(tmp_path / "no-eos", tiny_llama(vocab_size=len(no_eos)), no_eos)
    assert train.main(["--data", data_file, "--model", folder, "--val-size", "4", "--test-size", "4", "--max-length", "48",
                       "--max-prompt-length", "24", "--checkpoint-dir", str(tmp_path / "no-eos-run")]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("train.py: error: the tokenizer has no EOS token")


def test_an_sft_stage_made_with_a_longer_prompt_cut_never_trained_on_what_the_dpo_run_holds_out(tmp_path, tiny_gpt2_dir):
    """The SFT run keeps 44 prompt tokens, where the dialogues' numbers still tell them apart; the
    DPO run keeps 24, where only the last question is left and many are one prompt. By its own
    rule (kept prompt ids) the DPO run holds out prompts the SFT run trained on: refused."""
    rows = [record(f"{H} This is dialogue number {i}, and it is told at some length before its question, "
                   f"so that the start of it is cut away.{A} Go on.{H} What is question {i % 12}?{A}",
                   f" Answer {i % 12}.", " No.") for i in range(36)]
    data_file = write_jsonl(tmp_path / "d.jsonl", rows)
    sft = train.train(tiny_config(data_file, tiny_gpt2_dir, tmp_path / "sft", loss_type="sft", max_steps=1, max_length=64,
                                  max_prompt_length=44))
    assert not sft["dropped"]  # at 44 tokens every prompt is its own
    with pytest.raises(ValueError, match=r"sft/best.pt trained on \d+ pairs whose prompts this run holds out as it keeps "
                                         r"them \(its last 24 tokens; the SFT run kept 44, this run 24\)"):
        train.train(tiny_config(data_file, tiny_gpt2_dir, tmp_path / "dpo", sft_checkpoint=str(tmp_path / "sft" / "best.pt"),
                                max_steps=1, max_length=64))
    dpo = train.train(tiny_config(data_file, tiny_gpt2_dir, tmp_path / "dpo-44", max_steps=1, max_length=64,
                                  max_prompt_length=44, sft_checkpoint=str(tmp_path / "sft" / "best.pt")))
    assert dpo["step"] == 1  # the same cut: nothing held out was trained on


def test_offline_the_test_pairs_of_a_run_on_the_hubs_data_leave_out_what_it_trained_and_validated_on(
        tmp_path, tiny_gpt2_dir, monkeypatch, capsys):
    """A run trained on the Hub's Anthropic/hh-rlhf chose best.pt on pairs of the Hub's test split;
    judged offline, the bundled file's test split (the same source, shuffled apart) stands in, and
    held some of those very pairs as "test". Every pair whose kept prompt the run trained or
    validated on is left out now (the checkpoint's seen_prompts), said in one line; a checkpoint
    that does not say what it saw is refused offline."""
    files = {split: write_jsonl(tmp_path / f"{split}.jsonl", [record(f"{H} Question {i}?{A}", f" Answer {i}.", " No.")
                                                             for i in numbers])
             for split, numbers in (("train", range(0, 12)), ("test", range(100, 112)))}
    load = data.load_pairs
    monkeypatch.setattr(data, "load_pairs", lambda name, subset="harmless-base", split="train", *args:
                        load(files[split] if name == data.HUB_DATASET else name, subset, "train", *args))
    monkeypatch.setattr(models, "hub_unreachable_reason", lambda: None)  # the Hub answers: a run on its data
    config = tiny_config(data.HUB_DATASET, tiny_gpt2_dir, tmp_path / "run", max_steps=1)
    train.train(config)
    seen = {pair.prompt for pair in checkpoints.split_data_of(config).train + checkpoints.split_data_of(config).validation}
    bundled = write_jsonl(tmp_path / "bundled.jsonl", [record(f"{H} Question {i}?{A}", f" Answer {i}.", " No.")
                                                      for i in [*range(0, 12), *range(100, 112), *range(200, 204)]])
    monkeypatch.setattr(checkpoints, "BUNDLED_DATA", bundled)
    monkeypatch.setattr(models, "hub_unreachable_reason", lambda: "HF_HUB_OFFLINE is set")  # judged offline
    best = checkpoints.load_checkpoint(str(tmp_path / "run" / "best.pt"))
    stand_in = checkpoints.split_data_of(dataclasses.replace(config, data=bundled)).test
    capsys.readouterr()
    pairs = checkpoints.held_out_pairs(best, "best.pt")
    assert pairs == [pair for pair in stand_in if pair.prompt not in seen] and len(pairs) < len(stand_in)
    said = capsys.readouterr().err
    assert f"{len(pairs)} of its {len(stand_in)} test pairs, less {len(stand_in) - len(pairs)} whose prompts best.pt " \
           f"trained or validated on" in said
    sft_config = tiny_config(data.HUB_DATASET, tiny_gpt2_dir, tmp_path / "sft", loss_type="sft", max_steps=1, num_examples=0)
    after_sft = tiny_config(data.HUB_DATASET, tiny_gpt2_dir, tmp_path / "dpo", max_steps=1, num_examples=2,
                            sft_checkpoint=str(tmp_path / "sft" / "best.pt"))
    monkeypatch.setattr(models, "hub_unreachable_reason", lambda: None)
    train.train(sft_config)
    train.train(after_sft)  # its own 2 training pairs, its SFT stage's 4
    sft_seen = {pair.prompt for pair in checkpoints.split_data_of(sft_config).train}
    assert not sft_seen <= {pair.prompt for pair in checkpoints.split_data_of(after_sft).train}
    monkeypatch.setattr(models, "hub_unreachable_reason", lambda: "HF_HUB_OFFLINE is set")
    bundled = write_jsonl(tmp_path / "bundled-2.jsonl", [record(f"{H} Question {i}?{A}", f" Answer {i}.", " No.")
                                                        for i in [*range(0, 12), *range(200, 208)]])
    monkeypatch.setattr(checkpoints, "BUNDLED_DATA", bundled)
    stand_in = checkpoints.split_data_of(dataclasses.replace(config, data=bundled)).test
    pairs = checkpoints.held_out_pairs(checkpoints.load_checkpoint(str(tmp_path / "dpo" / "best.pt")), "dpo/best.pt")
    own_seen = {pair.prompt for split in checkpoints.split_data_of(after_sft)[:2] for pair in split}
    assert {pair.prompt for pair in stand_in} & (sft_seen - own_seen)  # pairs only its SFT stage trained on
    assert pairs == [pair for pair in stand_in if pair.prompt not in own_seen | sft_seen]
    older = {key: value for key, value in best.items() if key != "seen_prompts"}
    with pytest.raises(ValueError, match="does not record which prompts its run trained and validated on .* so no "
                                         "held-out pairs can be had offline"):
        checkpoints.held_out_pairs(older, "older.pt")


def test_ctrl_c_during_the_end_of_run_test_score_is_one_line_and_resume_makes_the_test_row_and_report(
        tmp_path, tiny_gpt2_dir, monkeypatch, capsys):
    """The loop's Ctrl-C handler is gone by the end-of-run test score: a Ctrl-C there was a
    traceback. It is one line that says what is kept, and --resume makes the test row and the
    report of the finished run."""
    score = train.validation_metrics

    def interrupted_while_testing(*args, per_pair=False, **kwargs):
        if per_pair:  # the test score alone asks for every pair's rewards
            signal.raise_signal(signal.SIGINT)
        return score(*args, per_pair=per_pair, **kwargs)
    monkeypatch.setattr(train, "validation_metrics", interrupted_while_testing)
    data_file = write_jsonl(tmp_path / "d.jsonl", synthetic_rows(16))
    run_dir = tmp_path / "run"
    flags = ["--data", data_file, "--model", tiny_gpt2_dir, "--dtype", "float32", "--val-size", "4", "--test-size", "4",
             "--max-length", "48", "--max-prompt-length", "24", "--batch-size", "2", "--max-steps", "2",
             "--checkpoint-dir", str(run_dir), "--no-progress"]
    assert train.main(flags) == 130
    last = run_dir / "last.pt"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"train.py: interrupted; {last} holds the run up to its last saved step: --resume {last} continues it, and "
        f"scores the test pairs and writes report.html when it finishes")
    assert not [row for row in checkpoints.read_log(run_dir / "metrics.jsonl") if row["split"] == "test"]
    monkeypatch.setattr(train, "validation_metrics", score)
    assert train.main(["--resume", str(last), "--no-progress"]) == 0
    assert [row["split"] for row in checkpoints.read_log(run_dir / "metrics.jsonl")].count("test") == 1
    assert (run_dir / "report.html").exists()
    moved = train.parse_args(["--resume", str(last), "--checkpoint-dir", str(tmp_path / "moved")])
    assert train.last_checkpoint(moved) == last  # the moved run's own last.pt is not written yet
    (tmp_path / "moved").mkdir()
    (tmp_path / "moved" / "last.pt").write_bytes(b"")
    assert train.last_checkpoint(moved) == tmp_path / "moved" / "last.pt"  # then it is the one that continues
    assert train.last_checkpoint(train.parse_args(["--resume", str(last)])) == last


# ----- what a run will cost here -------------------------------------------------------------

def slowed(monkeypatch, seconds):
    """Every model train.py loads takes `seconds` a forward on top of its own: a big model's pace on a tiny one."""
    load = models.load_model_and_tokenizer

    def load_slowed(*args, **kwargs):
        model, tokenizer = load(*args, **kwargs)
        model.get_input_embeddings().register_forward_pre_hook(lambda *_: time.sleep(seconds))  # every forward's first layer
        return model, tokenizer
    monkeypatch.setattr(models, "load_model_and_tokenizer", load_slowed)


def test_a_run_says_once_what_it_will_cost_and_past_the_budget_a_quicker_command_that_runs(
        tmp_path, tiny_gpt2_dir, monkeypatch, capsys):
    """After its first timed steps a run says in one line what the whole run will take here, from
    its own step and validation times; past QUICK_RUN_SECONDS it adds the command for a run that
    fits, and that command parses to the same run with fewer pairs in a new folder, and runs."""
    data_file = write_jsonl(tmp_path / "d.jsonl", synthetic_rows(120))  # 112 train pairs: 112 steps of 1
    config = tiny_config(data_file, tiny_gpt2_dir, tmp_path / "run", batch_size=1, eval_every=1000, checkpoint_every=1000)
    with monkeypatch.context() as patch:
        slowed(patch, 0.05)  # >= 0.1 s a step (policy and reference forwards): ~11 s for the run's steps
        patch.setattr(train, "QUICK_RUN_SECONDS", 8.0)
        stop_at(20, patch)
        assert train.train(config)["interrupted"]
    said = capsys.readouterr()
    lines = [line for line in (said.out + said.err).splitlines() if line.startswith("this run: about")]
    assert len(lines) == 1, lines
    match = re.search(r"Within 8 s here: (.+?) \(the first (\d+) pairs of the training split, less any dropped, where this run trains on (\d+):", lines[0])
    assert match, lines[0]
    words = shlex.split(match[1])
    assert words[:2] == ["python", "train.py"]
    quicker = train.parse_args(words[2:])
    assert dataclasses.replace(quicker, num_examples=config.num_examples, checkpoint_dir=config.checkpoint_dir) == config
    assert 1 <= quicker.num_examples == int(match[2]) < int(match[3]) == 112
    assert train.main(words[2:]) == 0  # a new folder: the interrupted run's is left as it is
    assert f"data: {quicker.num_examples} train / 4 validation / 4 test pairs" in capsys.readouterr().err


@settings(max_examples=60, deadline=None)
@given(step=st.floats(0.01, 30), reference_share=st.floats(0, 0.6), validation=st.floats(0, 600), setup=st.floats(0, 600),
       total_steps=st.integers(2, 400), eval_every=st.integers(1, 100), epochs=st.integers(1, 3), test_pairs=st.integers(0, 300))
def test_the_cost_of_a_run_is_its_parts_and_a_quicker_run_costs_less(step, reference_share, validation, setup, total_steps,
                                                                    eval_every, epochs, test_pairs):
    """seconds_for adds up: the whole run is the sum of any two parts of it, each step costs at
    least what a cached one does, and fewer steps never cost more (the quicker command's premise)."""
    timings = train.Timings(setup=setup, steps=[(step, step * reference_share)] * 3, validation=validation,
                            forward_per_pair=validation / 200)
    config = train.TrainConfig(eval_every=eval_every, epochs=epochs)
    per_epoch = max(1, total_steps // epochs)
    cost = lambda first, last, total=total_steps, pairs=test_pairs: train.seconds_for(timings, config, first, last, total,
                                                                                       per_epoch, pairs)
    middle = total_steps // 2
    assert cost(0, total_steps) == pytest.approx(cost(0, middle, pairs=0) + cost(middle, total_steps), rel=1e-9, abs=1e-9)
    assert cost(0, total_steps, pairs=0) >= total_steps * step * (1 - reference_share) - 1e-9
    assert cost(0, middle, middle) <= cost(0, total_steps) + 1e-9


@given(threshold=st.integers(0, 5000), most=st.integers(0, 5000))
def test_the_largest_run_that_fits_is_found_by_bisection(threshold, most):
    """cost_line bisects (a run's cost only grows with its steps): the largest n <= most that fits, or 0."""
    assert train.largest(lambda n: n <= threshold, most) == min(threshold, most)


@given(value=st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=12))
def test_a_suggested_command_parses_back_to_its_settings_whatever_the_values(value):
    """Paths with spaces, quotes or a leading dash: --flag=value, quoted by shlex, reads back the same."""
    config = train.TrainConfig(data=value, checkpoint_dir=value + "-1-pairs", progress=False, lr=1e-5, num_examples=7)
    words = shlex.split(train.command_line(config))
    assert words[:2] == ["python", "train.py"] and train.parse_args(words[2:]) == config

