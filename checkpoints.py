"""The files a run leaves, and what is rebuilt from them: the checkpoint format (written
atomically, loaded safely), the policy rebuilt from a checkpoint with its SFT stage, a run's
pairs recomputed from its settings and checked against the fingerprint it saved, where a run
starts from (an SFT run, a peft folder) and whether a last.pt can continue its run, and the
metrics log (metrics.jsonl; judge.py's log has its format) with its curves (curves.png).

What the loop does with these files is train.py's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import typing
from pathlib import Path

import torch
from torch import nn

import cli
import data
import lora
import models
import settings
from data import BUNDLED_DATA, HUB_DATASET


# ---------------------------------------------------------------------------------------
# The checkpoint file: written atomically, loaded safely
# ---------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "dpo-lora/1"


class WriteFailed(OSError):
    """A file of the run could not be written (no space left, no permission): one line naming it."""


@contextlib.contextmanager
def writing(path: Path | str) -> typing.Iterator[None]:
    """Any OSError inside (a full disk, a folder that cannot be written) as WriteFailed: the file and the reason."""
    try:
        yield
    except WriteFailed:
        raise
    except OSError as error:
        raise WriteFailed(f"cannot write {path}: {error.strerror or error}") from None


def save_atomic(payload: dict, path: Path) -> None:
    """Write to a temporary file, then rename: a crash or a full disk never leaves a half-written
    checkpoint, and the one before stays as it was. Serialised in memory first, so that a failed
    write is the OS's own error (torch.save to a full disk says "unexpected pos ...")."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    temporary = path.with_suffix(path.suffix + ".tmp")
    try:
        with writing(path):
            with open(temporary, "wb") as file:
                file.write(buffer.getbuffer())
            os.replace(temporary, path)
    except WriteFailed:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def load_checkpoint(path: str) -> dict:
    """A checkpoint of ours, loaded safely (weights_only=True), or one clear error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # pickle, zip and unpickler errors all mean "not a checkpoint"
        raise ValueError(f"{path} is not a checkpoint of this project ({type(error).__name__})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint of this project")
    return checkpoint


# ---------------------------------------------------------------------------------------
# The policy rebuilt from a checkpoint, and where a new run starts from
# ---------------------------------------------------------------------------------------

def load_policy(checkpoint: dict, dtype: str | torch.dtype = torch.float32, verbose: bool = False,
                path: str = "the checkpoint"):
    """The base model named in a checkpoint (load_base: checked to hold the weights its run trained
    from), with the checkpoint's adapters on it."""
    model, tokenizer = load_base(checkpoint, path, dtype, verbose)
    return add_trained_adapters(model, checkpoint), tokenizer


def load_base(checkpoint: dict, path: str, dtype: str | torch.dtype = torch.float32, verbose: bool = False):
    """The base model a checkpoint names and its tokenizer, checked to hold the very weights its
    run trained from (check_same_base)."""
    model, tokenizer = models.load_model_and_tokenizer(checkpoint["base_model"], dtype, verbose)
    run_dtype = settings.config_from_dict(checkpoint["config"]).dtype  # what the run computed in, whatever is loaded now
    check_same_base(checkpoint, path, models.weights_sha256(model, run_dtype), checkpoint["base_model"])
    return model, tokenizer


def check_same_base(checkpoint: dict, path: str, base_sha256: str, model: str) -> None:
    """The base model is the one a checkpoint's run trained from (its base_sha256: config and
    weights), or one line: a folder or file overwritten with other weights under the same name
    would give another reference than the one its log-probs were cached from, and another policy
    than the one it trained (docs/PITFALLS.md 21). An older checkpoint has no such hash: said."""
    saved = checkpoint.get("base_sha256")
    if saved is None:
        cli.say(f"{path} has no hash of its base model's weights (an older train.py wrote it): nothing shows "
                f"{model} holds the weights it trained from")
    elif saved != base_sha256:
        raise ValueError(f"{path} was trained from other weights than {model} holds now (the sha256 of its config "
                         f"and weights differ: was the model replaced under the same name?): its reference and "
                         f"adapters belong to those; use the model it was made with, or start a new run")


def add_trained_adapters(model: nn.Module, checkpoint: dict) -> nn.Module:
    """Turn the base model into the checkpoint's policy: its SFT stage folded into the weights,
    if it had one, then its own adapters on top (adapters off = the SFT model, or the base)."""
    fold_sft_stage(model, checkpoint.get("sft"))
    lora.add_lora(model, lora.lora_config_from_dict(checkpoint["lora"]))
    lora.load_adapter_state_dict(model, checkpoint["adapters"])
    return model.eval()


def fold_sft_stage(model: nn.Module, sft_stage: dict | None) -> None:
    """The SFT model in place of the base: the SFT run's adapters merged into the weights for good."""
    if sft_stage is not None:
        lora.add_lora(model, lora.lora_config_from_dict(sft_stage["lora"]))
        lora.load_adapter_state_dict(model, sft_stage["adapters"])
        lora.fold_adapters(model)


def sft_stage_of(config: settings.TrainConfig) -> tuple[settings.TrainConfig, dict]:
    """What a DPO run takes from the SFT run in --sft-checkpoint (its config, LoRA shape and
    adapters, recorded in every checkpoint of the DPO run, so judge.py and --resume rebuild the
    same models without that file), and the config with the SFT run's base model. Checked: it is
    an SFT run, of the same base model, that held out the same validation pairs, so the
    reference never trained on an answer this run validates on."""
    path = config.sft_checkpoint
    sft = load_checkpoint(path)
    saved = settings.config_from_dict(sft["config"])
    if saved.loss_type != "sft":
        raise ValueError(f"{path} is a {saved.loss_type} run, not an SFT run (--loss-type sft)")
    if config.model not in (settings.HUB_MODEL, sft["base_model"]):
        raise ValueError(f"{path} fine-tuned {sft['base_model']}, not {config.model}: drop --model")
    config = dataclasses.replace(config, model=sft["base_model"])
    sft_data = models.with_offline_fallbacks(saved, announce=False)
    sft_splits = split_data_of(sft_data)
    if sft_data.data == saved.data:  # (an SFT run on the Hub's pairs, used offline: the bundled ones stand in)
        check_same_data(sft, path, lambda: data_sha256_of(saved, sft_splits, ["train", "validation"]
                                                          + ["test"] * bool(saved.test_size)))
    splits = split_data_of(models.with_offline_fallbacks(config, announce=False))
    if (sft_splits.validation, sft_splits.test) != (splits.validation, splits.test):
        raise ValueError(f"{path} held out other validation or test pairs than this run would (another --data, "
                         f"--split-seed, --val-size or --test-size): its model may have trained on them; use the "
                         f"SFT run's data settings")
    clashes, trained = held_out_prompts_trained(sft_splits, saved, splits, config)
    if clashes:
        raise ValueError(f"{path} trained on {clashes} pairs whose prompts this run holds out as it keeps them (its last "
                         f"{min(saved.max_prompt_length, config.max_prompt_length)} tokens; the SFT run kept "
                         f"{saved.max_prompt_length}, this run {config.max_prompt_length}): its model has seen what this "
                         f"run validates or tests on; make the SFT stage with this run's --max-prompt-length")
    return config, {"checkpoint": path, "config": sft["config"], "lora": sft["lora"], "adapters": sft["adapters"],
                    "seen_prompts": trained, **({"base_sha256": sft["base_sha256"]} if "base_sha256" in sft else {})}


def held_out_prompts_trained(sft_splits: data.Splits, sft: settings.TrainConfig, splits: data.Splits,
                             config: settings.TrainConfig) -> tuple[int, torch.Tensor]:
    """How many of the pairs an SFT run trained on have a prompt that the DPO run of config holds
    out (validation or test), by the kept-prompt rule of data.tokenize_splits applied across the
    two runs: each run's kept prompts cut to the shorter of their two --max-prompt-length (a
    prompt kept longer holds the shorter one's tokens at its end). The same settings give 0:
    the SFT run dropped those pairs itself (docs/PITFALLS.md 17). Also the SFT run's trained
    prompts so cut (data.prompt_keys), which the DPO run's checkpoints carry: no program may show
    them as test pairs of the policy either (stand_in_test_pairs)."""
    tokenizer = models.cached_tokenizer(config.model)
    trained = data.tokenize_splits(sft_splits, tokenizer, sft.max_length, sft.max_prompt_length, {}).train
    held = data.tokenize_splits(splits._replace(train=[]), tokenizer, config.max_length, config.max_prompt_length, {})
    shorter = min(sft.max_prompt_length, config.max_prompt_length)
    cut = lambda item: tuple(data.keep_prompt_end(item.prompt_ids, data.prompt_lead(tokenizer), shorter))
    held_out = {cut(item) for item in held.validation + held.test}
    trained_prompts = [cut(item) for item in trained]
    return sum(prompt in held_out for prompt in trained_prompts), data.prompt_keys(trained_prompts)


def init_adapters_of(config: settings.TrainConfig) -> tuple[settings.TrainConfig, dict]:
    """The adapters in the peft folder --init-adapters names, and the config with their rank, alpha
    and targets (so checkpoints and --resume carry the shape, never the folder). A --lora-r,
    --lora-alpha or --lora-targets that contradicts the folder is an error, not a guess."""
    shape, adapters = lora.read_peft_folder(config.init_adapters)
    defaults, targets = settings.TrainConfig(), {t for t in config.lora_targets.split(",") if t}
    conflicts = [("lora-r", config.lora_r != defaults.lora_r and config.lora_r != shape.r, config.lora_r, shape.r),
                 ("lora-alpha", config.lora_alpha != defaults.lora_alpha and config.lora_alpha != shape.alpha,
                  config.lora_alpha, shape.alpha),
                 ("lora-targets", bool(targets) and targets != set(shape.targets), config.lora_targets, shape.targets)]
    for flag, differs, given, folders in conflicts:
        if differs:
            raise ValueError(f"--init-adapters {config.init_adapters} has {flag.replace('-', ' ')} {folders}, "
                             f"not {given}: drop --{flag}")
    return dataclasses.replace(config, lora_r=shape.r, lora_alpha=shape.alpha, lora_targets=",".join(shape.targets)), adapters


# ---------------------------------------------------------------------------------------
# A run's pairs, recomputed from its settings and checked against its fingerprint
# ---------------------------------------------------------------------------------------

def split_data_of(config: settings.TrainConfig, counts: dict | None = None) -> data.Splits:
    """The (train, validation, test) pairs of a run. Conversational records are rendered with the
    chat template of the run's model (its tokenizer is loaded only for them)."""
    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        return data.chat_renderer(models.cached_tokenizer(config.model))(messages, add_generation_prompt)
    return data.split_data(config.data, config.hub_subset, config.val_size, config.test_size, config.split_seed,
                           config.num_examples, config.skip_bad_lines, counts, config.split, render)


def data_sha256_of(config: settings.TrainConfig, splits: data.Splits, names: list[str]) -> dict[str, str]:
    """data.fingerprint of the named splits, tokenised as the run of config tokenises them (its
    kept-prompt rule reads all three; validation and test do not depend on train, so it is
    tokenised only when asked for)."""
    splits = splits if "train" in names else splits._replace(train=[])
    items = data.tokenize_splits(splits, models.cached_tokenizer(config.model), config.max_length,
                                 config.max_prompt_length, {})
    return {name: data.fingerprint(getattr(items, name)) for name in names}


def check_same_data(checkpoint: dict, path: str, now: typing.Callable[[], dict[str, str]]) -> None:
    """The pairs a checkpoint's run used (data_sha256) are the ones its settings give now, or one
    line saying which differ: a data file changed in place (swapped answers, other text of the
    same length), another chat template or tokenizer. An older checkpoint has no fingerprint: said."""
    saved = checkpoint.get("data_sha256")
    if saved is None:
        cli.say(f"{path} has no fingerprint of its data (an older train.py wrote it): nothing shows its pairs are "
                f"the ones its settings give now")
        return
    differ = [name for name, sha256 in now().items() if saved.get(name) != sha256]
    if differ:
        raise ValueError(f"{path} was made with other {' and '.join(differ)} pairs than its settings give now "
                         f"(their token ids differ: has the data file, its chat template or the tokenizer "
                         f"changed?): start a new run, or use the data it was made with")


def held_out_pairs(checkpoint: dict, path: str) -> list[data.Pair]:
    """The test pairs of a checkpoint's run (judge.py's prompts), checked against the fingerprint
    it saved; an older run's validation pairs when it had no test split (said). A run on the
    Hub's data, judged where the Hub cannot be reached, gets the bundled test pairs: they come
    from the Hub's test split, so that run never trained on them either (said in one line)."""
    saved = settings.config_from_dict(checkpoint["config"])
    if saved.data == HUB_DATASET and (reason := models.hub_unreachable_reason()) is not None:
        return stand_in_test_pairs(checkpoint, path, saved, reason)
    splits = split_data_of(saved)
    name = "test" if saved.test_size else "validation"
    if not saved.test_size:
        cli.say(f"{path} has no test split (--test-size 0, or an older train.py): its validation pairs instead, on "
                f"which its best.pt was chosen")
    check_same_data(checkpoint, path, lambda: data_sha256_of(saved, splits, [name]))
    return getattr(splits, name)


def stand_in_test_pairs(checkpoint: dict, path: str, saved: settings.TrainConfig, reason: str) -> list[data.Pair]:
    """Held-out pairs for a run on the Hub's Anthropic/hh-rlhf where the Hub cannot be reached:
    the bundled file's test split (HH-RLHF test-split pairs too), less every pair whose kept
    prompt the run, or its SFT stage, trained or validated on (seen_prompts): the two files
    shuffle apart, so some bundled test pairs are that run's validation pairs (best.pt's choice).
    A checkpoint that does not say what it saw (an older train.py) gets none: one line."""
    seen = checkpoint.get("seen_prompts")
    if seen is None:
        raise ValueError(f"the Hugging Face Hub cannot be reached ({reason}) for {HUB_DATASET}'s test split, and {path} "
                         f"does not record which prompts its run trained and validated on (an older train.py wrote "
                         f"it), so no held-out pairs can be had offline: run this where the Hub can be reached")
    pairs = split_data_of(dataclasses.replace(saved, data=BUNDLED_DATA, test_size=saved.test_size or 200)).test
    tokenizer, used = models.cached_tokenizer(saved.model), set(torch.cat(list(seen.values())).tolist())
    cuts = {saved.max_prompt_length: used}
    if "sft" in checkpoint:  # what its SFT stage trained on, kept as the shorter of the two runs' cuts keeps it
        shorter = min(settings.config_from_dict(checkpoint["sft"]["config"]).max_prompt_length, saved.max_prompt_length)
        cuts.setdefault(shorter, set()).update(checkpoint["sft"].get("seen_prompts", torch.zeros(0)).tolist())
    kept = [pair for pair in pairs if not any(data.prompt_key(data.kept_prompt_ids(tokenizer, pair.prompt, cut)) in keys
                                              for cut, keys in cuts.items())]
    cli.say(f"the Hugging Face Hub cannot be reached ({reason}): held-out prompts from the bundled {BUNDLED_DATA} "
            f"(HH-RLHF test-split pairs) instead of {HUB_DATASET}'s test split: {len(kept)} of its {len(pairs)} test "
            f"pairs, less {len(pairs) - len(kept)} whose prompts {path} trained or validated on")
    return kept


# ---------------------------------------------------------------------------------------
# The metrics log (and judge.py's, in the same format) and its curves
# ---------------------------------------------------------------------------------------

def read_log(path: Path | str, owner: str = "train.py's metrics", repair: bool = True) -> list[dict]:
    """The JSON objects of a JSONL log we append to, one a line (metrics.jsonl, judge.py's log).

    A kill during a write leaves a cut *last* line (no newline after it): it is dropped with one
    line of notice and cut from the file too, so that appending goes on from a fresh line; a
    last line whole but for its newline is kept and gets one. A bad line anywhere else is damage
    we did not make: an error naming file:line. repair=False: a reader that appends nothing
    (report.py) leaves the file as it is, for a writer may be appending to it now.
    """
    content = Path(path).read_bytes()
    *lines, tail = content.split(b"\n")  # tail: what follows the last newline, b"" in a whole file
    rows = [parse_log_line(path, line_no, line, owner) for line_no, line in enumerate(lines, 1) if line.strip()]
    if tail:
        try:
            rows.append(parse_log_line(path, len(lines) + 1, tail, owner))
            whole = content + b"\n"
        except ValueError:
            if not repair:  # a line being written now, or cut: not a record yet
                return rows
            cli.say(f"{path}: its last line is cut short ({len(tail)} bytes, not a whole record: a crash mid-write?); "
                    f"dropped it, resuming from the {len(rows)} whole lines before it")
            whole = content[:len(content) - len(tail)]
        if not repair:
            return rows
        temporary = f"{path}.tmp"
        with writing(path):
            Path(temporary).write_bytes(whole)
            os.replace(temporary, path)  # all or nothing, like the checkpoints
    return rows


def parse_log_line(path: Path | str, line_no: int, line: bytes, owner: str) -> dict:
    try:
        row = json.loads(line)
        if not isinstance(row, dict):
            raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    except ValueError:  # JSONDecodeError, UnicodeDecodeError, or not an object
        raise ValueError(f"{path}:{line_no}: not a record of {owner}") from None
    return row


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the rows up to the resumed step, so a crash never leaves duplicated rows (the test row is made again at the end)."""
    if path.exists():
        rows = [row for row in read_log(path) if row.get("step", 0) <= step and row.get("split") != "test"]
        with writing(path):
            path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def write_metrics(file, row: dict) -> None:
    with writing(file.name):
        file.write(json.dumps(row) + "\n")
        file.flush()


def plot_curves(metrics_path: Path, png_path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_log(metrics_path)
    train_rows = [r for r in rows if r["split"] == "train"]
    val_rows = [r for r in rows if r["split"] == "val"]
    test_rows = [r for r in rows if r["split"] == "test"]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    window = max(1, len(train_rows) // 20)  # a few pairs a step are noisy: show a running mean too
    supervised = "perplexity" in rows[0]
    for axis, key in ((loss_axis, "loss"), (accuracy_axis, "perplexity" if supervised else "reward_accuracy")):
        steps, values = [r["step"] for r in train_rows], [r[key] for r in train_rows]
        axis.plot(steps, values, "-", color="tab:blue", alpha=0.25, label="train")
        smooth = [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]
        axis.plot(steps, smooth, "-", color="tab:blue", label=f"train, mean of {window} steps")
        axis.plot([r["step"] for r in val_rows], [r[key] for r in val_rows], "o-", color="tab:orange", label="validation")
        for row in test_rows:  # best.pt on the test pairs, once, at its step
            low, high = row.get(f"{key}_interval", (row[key], row[key]))
            axis.errorbar([row["step"]], [row[key]], yerr=[[row[key] - low], [high - row[key]]], fmt="*", markersize=12,
                          color="tab:red", capsize=4, label="test, best.pt" + (" (95% interval)" if low != high else ""))
    if supervised:
        loss_axis.set(xlabel="optimizer step", ylabel="NLL per token", title="SFT loss on the chosen answers")
        accuracy_axis.set(xlabel="optimizer step", ylabel="perplexity", title="perplexity of the chosen answers")
    else:
        loss_axis.axhline(math.log(2), color="grey", linestyle=":", label="log 2 (policy = reference)")
        accuracy_axis.axhline(0.5, color="grey", linestyle=":", label="chance")
        loss_axis.set(xlabel="optimizer step", ylabel="DPO loss", title="DPO loss")
        accuracy_axis.set(xlabel="optimizer step", ylabel="reward accuracy", title="implicit reward accuracy")
    loss_axis.legend(), accuracy_axis.legend()
    figure.tight_layout()
    try:
        with writing(png_path):
            figure.savefig(png_path, dpi=110)
    finally:
        plt.close(figure)


# ---------------------------------------------------------------------------------------
# Whether a run can continue, or start in this folder
# ---------------------------------------------------------------------------------------

def load_resumable(path: str) -> dict:
    """A last.pt that can continue its run exactly, or one clear error saying why not."""
    checkpoint = load_checkpoint(path)
    if "optimizer" not in checkpoint:
        raise ValueError(f"{path} holds the best adapters only (no optimizer or random state), so it cannot "
                         f"continue its run: resume from {Path(path).with_name('last.pt')}")
    if "state" not in checkpoint:
        raise ValueError(f"{path} was written by an older train.py that did not save the schedule's length, "
                         f"world size and every process's random state, so it cannot continue exactly; "
                         f"its adapters still load for judge.py")
    return checkpoint


def check_resume_fits(checkpoint: dict, path: str, total_steps: int, world_size: int, device: torch.device) -> None:
    """What the schedule, the data order and the dropout masks depend on must be as saved."""
    if checkpoint["world_size"] != world_size:
        raise ValueError(f"{path} was trained on {checkpoint['world_size']} processes, not {world_size}: each "
                         f"process's share of the data depends on it; resume with "
                         f"torchrun --nproc_per_node {checkpoint['world_size']}")
    if checkpoint["total_steps"] != total_steps:
        raise ValueError(f"{path} has a schedule of {checkpoint['total_steps']} steps; these data and settings "
                         f"give {total_steps}: has the data file changed?")
    saved_on = "cuda" if checkpoint["rng"][0]["cuda"] is not None else "cpu"
    if saved_on != device.type:
        raise ValueError(f"{path} was trained on {saved_on}, not {device.type}: its random state cannot continue there")


def move_run_files(source: Path, run_dir: Path) -> None:
    """A run resumed into another --checkpoint-dir takes its best.pt and metrics log along, so
    that its test score is of its own best.pt and its log is whole (the old folder stays as it was)."""
    if source.resolve() == run_dir.resolve():
        return
    for name in ("best.pt", "metrics.jsonl"):
        if (source / name).exists():
            temporary = run_dir / f"{name}.tmp"
            with writing(run_dir / name):
                temporary.write_bytes((source / name).read_bytes())
                os.replace(temporary, run_dir / name)  # all or nothing, as save_atomic


def refuse_used_folder(run_dir: Path) -> None:
    """A new run never appends to another run's metrics or overwrites its checkpoints."""
    used = [name for name in ("metrics.jsonl", "last.pt", "best.pt") if (run_dir / name).exists()]
    if used:
        raise ValueError(f"{run_dir} holds another run ({', '.join(used)}): continue it with "
                         f"--resume {run_dir / 'last.pt'}, or pass another --checkpoint-dir")
