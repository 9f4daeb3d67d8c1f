"""Adapters out of our checkpoints, and in from anyone's: peft's adapter folder, and a merged model.

    python export.py checkpoints/best.pt --peft out/adapter     # adapter_config.json + adapter_model.safetensors
    python export.py checkpoints/best.pt --merged out/model     # a model folder AutoModelForCausalLM loads
    python train.py --init-adapters out/adapter ...             # start training from a peft adapter folder

Our checkpoint (train.py's .pt) is read by judge.py and --resume; the rest of the ecosystem
(transformers, peft, vLLM, llama.cpp's converters) reads one of these two folders:

- **peft adapter folder** (lora.write_peft_folder, lora.read_peft_folder). `adapter_model.safetensors` holds, for every adapted layer,
  `base_model.model.<module path>.lora_A.weight` (r, in) and `...lora_B.weight` (out, r): our
  A and B as they are, since peft's LoRA computes the same h = W0 x + (lora_alpha / r) B A x
  (Hu et al. 2021, Eq. 3). `adapter_config.json` says r, lora_alpha, target_modules and
  `fan_in_fan_out`, true where the adapted layers are GPT-2's Conv1D, which stores W0
  transposed (docs/PITFALLS.md 12): A and B keep their layout, only a merge must transpose.
- **merged model folder.** W = W0 + (alpha / r) B A in every adapted layer, in fp32, written
  with save_pretrained in safetensors with the tokenizer: an ordinary model, no adapters.

lora.py knows peft's format, not peft: the project never imports peft (its tests and bench/
do, to check that peft reads what we write).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from transformers.pytorch_utils import Conv1D

import checkpoints
import cli
import lora

# ---------------------------------------------------------------------------------------
# A checkpoint out, as either folder
# ---------------------------------------------------------------------------------------

def export_peft(checkpoint: dict, model, folder: str | Path) -> None:
    """model: the checkpoint's policy (checkpoints.add_trained_adapters), for the layers' types."""
    if "sft" in checkpoint:
        raise ValueError("its adapters apply to the SFT model (the SFT run's adapters merged into the base), not to "
                         "the base model, so no single peft adapter on the base holds them: export --merged")
    fan_in_fan_out = any(isinstance(layer.base, Conv1D) for _, layer in lora.lora_layers(model))
    lora.write_peft_folder(folder, lora.lora_config_from_dict(checkpoint["lora"]), checkpoint["adapters"], fan_in_fan_out,
                      checkpoint["base_model"])


def export_merged(model, tokenizer, folder: str | Path) -> None:
    """model: the checkpoint's policy; every adapter is folded into its weight, then save_pretrained.

    A model transformers loaded from a GGUF file keeps the GGUF loader as its `hf_quantizer`, and
    save_pretrained refuses any model whose quantizer cannot serialise. Ours holds plain
    dequantised tensors (load_model_and_tokenizer), so the loader is dropped before saving.
    """
    lora.fold_adapters(model)
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def export(checkpoint_path: str, peft: str = "", merged: str = "", verbose: bool = False) -> None:
    if not (peft or merged):
        raise ValueError("nothing to write: pass --peft DIR, --merged DIR or both")
    for folder in (peft, merged):
        if folder and os.path.exists(folder) and os.listdir(folder):
            raise ValueError(f"{folder} exists and is not empty: pass a new folder")
    checkpoint = checkpoints.load_checkpoint(checkpoint_path)
    model, tokenizer = checkpoints.load_base(checkpoint, checkpoint_path, torch.float32, verbose)  # the run's own weights
    checkpoints.add_trained_adapters(model, checkpoint)  # checks that the adapters fit the model
    if peft:
        export_peft(checkpoint, model, peft)
        cli.say(f"wrote the peft adapter folder {peft} (base model {checkpoint['base_model']})")
    if merged:
        export_merged(model, tokenizer, merged)
        cli.say(f"wrote the merged model folder {merged}")


def main(argv: list[str] | None = None) -> int:
    parser = cli.OneLineErrorParser(prog="export.py", description="Write a train.py checkpoint as a peft adapter "
                                      "folder and/or a merged model folder (safetensors).")
    parser.add_argument("checkpoint", help="checkpoint .pt written by train.py")
    parser.add_argument("--peft", default="", help="write the adapters here as peft's adapter folder")
    parser.add_argument("--merged", default="", help="write the model with its adapters merged here (save_pretrained)")
    parser.add_argument("--verbose", action="store_true", help="also show transformers' own log lines")
    args = parser.parse_args(argv)
    try:
        export(args.checkpoint, args.peft, args.merged, args.verbose)
    except (ValueError, OSError) as error:
        print(f"export.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
