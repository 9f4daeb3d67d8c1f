"""Our checkpoint -> export.py's two folders -> peft's and transformers' own loaders -> the same logits?

    python bench/roundtrip.py checkpoints/best.pt out/        # writes out/peft and out/merged

Prints the largest |difference| of next-token logits (fp32, on one held-out prompt of the run)
between our model (checkpoints.load_policy) and (a) peft.PeftModel.from_pretrained on the base with
the adapter folder, (b) AutoModelForCausalLM.from_pretrained on the merged folder. peft is
benchmark-only (bench/requirements.txt), like TRL.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere

import checkpoints  # noqa: E402
import export  # noqa: E402
import models  # noqa: E402


def next_token_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits[0, -1].float()  # (V,)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("out", help="a new folder: out/peft and out/merged are written there")
    args = parser.parse_args(argv)
    out = Path(args.out)
    checkpoint = checkpoints.load_checkpoint(args.checkpoint)
    start = time.time()
    sft_stage = "sft" in checkpoint
    export.export(args.checkpoint, peft="" if sft_stage else str(out / "peft"), merged=str(out / "merged"))
    print(f"export.py wrote {'merged' if sft_stage else 'peft and merged'} in {time.time() - start:.0f} s")

    ours, tokenizer = checkpoints.load_policy(checkpoint)
    prompt = checkpoints.held_out_pairs(checkpoint, args.checkpoint)[0].prompt
    ids = tokenizer(prompt, return_tensors="pt").input_ids[:, -256:]
    expected = next_token_logits(ours, ids)
    if not sft_stage:
        from peft import PeftModel
        base, _ = models.load_model_and_tokenizer(checkpoint["base_model"])
        peft_model = PeftModel.from_pretrained(base, str(out / "peft")).eval()
        print(f"peft adapter folder -> PeftModel.from_pretrained: max |logit difference| "
              f"{(next_token_logits(peft_model, ids) - expected).abs().max().item():.2e} over {expected.numel()} logits")
        del peft_model, base
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"), dtype=torch.float32).eval()
    print(f"merged folder -> AutoModelForCausalLM.from_pretrained: max |logit difference| "
          f"{(next_token_logits(merged, ids) - expected).abs().max().item():.2e} over {expected.numel()} logits")
    print(f"argmax next token: ours {expected.argmax().item()}, merged {next_token_logits(merged, ids).argmax().item()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
