"""A run's settings: TrainConfig, every knob of train.py with its default and meaning (its
--help, built by cli.config_parser), checked once; and the same settings read back from a
checkpoint, older ones included.

Knows nothing of models, files or the loop: train.py trains with these, judge.py and export.py
read a checkpoint's run through config_from_dict.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import dpo
import lora
from data import HUB_DATASET


HUB_MODEL = "gpt2"  # the default model, from the Hugging Face Hub; Gemma 3 270M stands in when it cannot be reached


@dataclass
class TrainConfig:
    # data
    data: str = HUB_DATASET            # Anthropic/hh-rlhf (offline: the bundled data/ pairs), another Hub dataset id, or a .jsonl/.jsonl.gz/.json/.parquet file of HH, prompt/chosen/rejected or conversational records
    hub_subset: str = "harmless-base"  # subset (folder) of Anthropic/hh-rlhf on the Hub: harmless-base, helpful-base, ...
    split: str = "train"               # the split of a Hub dataset to train on (Anthropic/hh-rlhf validates on its test split)
    num_examples: int = 800            # train on the first N pairs (the default run fits 30 min on 2 CPU cores); 0 = all
    val_size: int = 200                # validation pairs: early stopping, best.pt, any choice of settings
    test_size: int = 200               # test pairs, scored once at the end of a run: nothing is chosen on them; 0 = none
    split_seed: int = 0                # the seeded shuffle that makes the validation and test split
    skip_bad_lines: bool = False       # count and skip malformed lines instead of stopping
    max_length: int = 192              # prompt + response tokens per sequence
    max_prompt_length: int = 96        # prompt tokens kept (the last ones)
    prefix_sharing: bool = True        # one row a pair, the prompt computed once (data.collate_shared); off: two rows
    # model and adapters
    model: str = HUB_MODEL             # Hub id (gpt2: the bundled Gemma 3 270M when the Hub cannot be reached), local model folder, or .gguf file
    dtype: str = "auto"                # base weights: bfloat16 (under autocast), float32, or auto: the faster of the two on this machine, measured; log-probs fp32
    lora_r: int = 8                    # LoRA rank
    lora_alpha: float = 16.0           # LoRA scale alpha (update multiplied by alpha / r)
    lora_dropout: float = 0.0          # dropout on the adapter input
    lora_targets: str = ""             # comma-separated module names; empty = architecture defaults (else every linear layer of the blocks)
    init_adapters: str = ""            # start from this peft adapter folder (export.py --peft, or anyone's): its rank, alpha and targets
    # objective
    beta: float = 0.1                  # DPO temperature: strength of the pull towards the reference
    label_smoothing: float = 0.0       # conservative DPO eps in [0, 0.5)
    loss_type: str = "sigmoid"         # sigmoid (DPO), ipo, or sft: the supervised stage before DPO (NLL of the chosen answers)
    sft_checkpoint: str = ""           # best.pt of a --loss-type sft run: its adapters, merged into the weights, are DPO's start and reference
    # optimisation
    lr: float = 3e-4                   # peak learning rate (LoRA needs far more than full fine-tuning; chosen by measurement, docs/studies.md)
    batch_size: int = 4                # pairs per micro-batch
    grad_accum: int = 1                # micro-batches per optimizer step
    epochs: int = 1                    # passes over the training pairs
    max_steps: int | None = None       # stop after this many optimizer steps
    warmup_steps: int = 10             # linear warmup steps
    schedule: str = "cosine"           # after warmup: constant or cosine decay to 0
    weight_decay: float = 0.0          # AdamW weight decay
    max_grad_norm: float = 1.0         # gradient clipping
    seed: int = 0                      # data order, LoRA init (the split has its own, --split-seed)
    threads: int = 0                   # CPU threads for torch; 0 = torch's default (on a busy machine fewer is faster)
    # evaluation and checkpoints
    eval_every: int = 50               # validate every N optimizer steps
    early_stop_patience: int = 0       # stop after N validations without a lower loss; 0 = never
    checkpoint_dir: str = "checkpoints"  # best.pt, last.pt, metrics.jsonl, curves.png
    checkpoint_every: int = 25         # write last.pt every N steps
    resume: str | None = None          # continue the run saved in this last.pt
    progress: bool = True              # show a progress bar

    def __post_init__(self):
        """Every setting is checked once, here, whether it came from the CLI, Python or a checkpoint."""
        if self.loss_type == "sft":
            if self.label_smoothing or self.sft_checkpoint:
                raise ValueError("--loss-type sft starts from the base model and has no label smoothing: "
                                 "drop --sft-checkpoint and --label-smoothing")
        else:
            dpo.check_loss_settings(self.beta, self.label_smoothing, self.loss_type)
        lora.LoRAConfig(self.lora_r, self.lora_alpha, self.lora_dropout)  # checks rank and dropout itself
        checks = [
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.schedule in ("constant", "cosine"), "schedule must be constant or cosine"),
            (self.dtype in ("auto", "float32", "bfloat16"), "dtype must be auto, float32 or bfloat16"),
            (0 < self.max_prompt_length < self.max_length, "max_prompt_length must be in (0, max_length)"),
            (min(self.batch_size, self.grad_accum, self.epochs) >= 1, "batch_size, grad_accum and epochs must be >= 1"),
            (self.val_size >= 1 and self.test_size >= 0, "val_size must be >= 1 and test_size >= 0"),
            (self.threads >= 0, "threads must be >= 0"),
            (self.eval_every >= 1 and self.checkpoint_every >= 1, "eval_every and checkpoint_every must be >= 1"),
            (self.warmup_steps >= 0 and self.early_stop_patience >= 0, "warmup_steps and early_stop_patience must be >= 0"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1"),
            (self.num_examples >= 0, "num_examples must be >= 0 (0 = all)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def config_from_dict(saved: dict) -> TrainConfig:
    """A TrainConfig from the dict a checkpoint holds. Older checkpoints wrote data=None for the Hub."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = {("hub_subset" if k == "data_dir" else k): v for k, v in saved.items()}  # its name until Nov 2026
    saved = {k: v for k, v in saved.items() if k in names}
    if saved.get("data") is None:
        saved["data"] = HUB_DATASET
    if saved.get("num_examples", 0) is None:  # and num_examples=None for all pairs
        saved["num_examples"] = 0
    saved.setdefault("test_size", 0)  # before Dec 2026: no test split, and seed made the split
    saved.setdefault("split_seed", saved.get("seed", 0))
    return TrainConfig(**saved)
