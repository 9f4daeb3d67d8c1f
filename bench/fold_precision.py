"""What folding an SFT run's adapters into bf16 weights costs: its held-out perplexity unmerged
(as the SFT run validated it) and folded (as DPO after SFT uses it, lora.fold_adapters).

    python bench/fold_precision.py runs/sft/best.pt
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import checkpoints  # noqa: E402
import data  # noqa: E402
import lora  # noqa: E402
import models  # noqa: E402
import settings  # noqa: E402
import train  # noqa: E402

checkpoint = checkpoints.load_checkpoint(sys.argv[1])
config = settings.config_from_dict(checkpoint["config"])
val_pairs = checkpoints.split_data_of(config).validation
model, tokenizer = models.load_model_and_tokenizer(checkpoint["base_model"], config.dtype)
items = data.tokenize_pairs(val_pairs, tokenizer, config.max_length, config.max_prompt_length, {})
lora.add_lora(model, lora.lora_config_from_dict(checkpoint["lora"]))
lora.load_adapter_state_dict(model, checkpoint["adapters"])
for name in ("unmerged", "folded"):
    if name == "folded":
        lora.fold_adapters(model)
    start = time.time()
    collate = models.collate_function(config, model, tokenizer.pad_token_id)
    metrics = train.validation_metrics(model, items, train.ReferenceCache(len(items)), config, collate)
    print(f"{name}: {metrics} ({time.time() - start:.0f} s)")
