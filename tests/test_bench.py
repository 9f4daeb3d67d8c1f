"""The benchmark compares like with like: our step computes TRL's DPO loss on TRL's own batch.

These import trl and peft, the benchmark's own dependencies (bench/requirements.txt).
"""
import dataclasses
import math

import data
import models
import torch
from settings import TrainConfig
from bench import bench
from conftest import gpt2_tokenizer

# HH-RLHF-shaped records, split as the benchmark splits the real file. The first batch has a
# prompt longer than the prompt budget and a chosen answer cut by max_length, so both cuts
# (ours in tokenize_pair, TRL's in its collator plus ours for the prompt) are on the path.
LONG_PROMPT = "".join(f"\n\nHuman: Tell me fact number {n} about owls.\n\nAssistant: Owls fact {n}." for n in range(4))
RECORDS = [
    (LONG_PROMPT + "\n\nHuman: And one more?\n\nAssistant: Owls can turn their heads very far.",
     LONG_PROMPT + "\n\nHuman: And one more?\n\nAssistant: No."),
    ("\n\nHuman: How do I boil an egg?\n\nAssistant:" + " Put it in boiling water for nine minutes, then cool it" * 6,
     "\n\nHuman: How do I boil an egg?\n\nAssistant: Why would you want to do that?"),
]
PAIRS = [data.split_prompt(chosen, rejected) for chosen, rejected in RECORDS]
CONFIG = bench.BenchConfig(max_length=48, max_prompt_length=24)  # the tiny GPT-2 has 64 positions


def test_the_first_batch_is_cut_on_both_sides():
    tokenizer = gpt2_tokenizer()
    long_prompt, long_answer = PAIRS
    assert len(tokenizer(long_prompt.prompt).input_ids) > CONFIG.max_prompt_length
    item = data.tokenize_pair(long_answer, tokenizer, CONFIG.max_length, CONFIG.max_prompt_length)
    assert len(item.prompt_ids) + len(item.chosen_ids) == CONFIG.max_length


def test_first_step_loss_matches_trl_with_nonzero_adapters(tiny_gpt2_dir):
    for dtype in ("float32", "bfloat16"):
        losses = bench.first_step_losses(tiny_gpt2_dir, PAIRS, dataclasses.replace(CONFIG, dtype=dtype))
        assert losses.same_token_ids, "TRL's first batch must hold exactly our token ids and masks"
        assert abs(losses.ours - losses.trl) < bench.CHECK_TOLERANCE, (dtype, losses)
        assert losses.agree, (dtype, losses)
        assert abs(losses.ours - math.log(2)) > 5e-3, f"at log 2 the check proves nothing: {losses}"


def test_steps_take_batches_in_file_order_and_wrap_around():
    assert bench.step_batches(pair_count=6, batch_size=2, steps=5) == [[0, 1], [2, 3], [4, 5], [0, 1], [2, 3]]


def test_prompt_cut_keeps_bos_and_the_last_tokens():
    assert data.keep_prompt_end([2, 10, 11, 12, 13], lead=2, max_prompt_length=3) == [2, 12, 13]
    assert data.keep_prompt_end([10, 11, 12, 13], lead=None, max_prompt_length=3) == [11, 12, 13]


def test_the_benchmark_compares_in_the_dtype_a_run_would_train_in_here():
    """On an AVX2-only CPU a bf16 matmul is ~60-100x slower than fp32: the benchmark's default is the
    dtype train.py's --dtype auto picks on this machine, measured the same way, not bf16 everywhere."""
    chosen = models.with_measured_dtype(TrainConfig(), torch.device("cpu"), 1, lambda line: None).dtype
    assert bench.BenchConfig().dtype == chosen
    assert bench.BenchConfig(dtype="float32").dtype == "float32" and bench.BenchConfig(dtype="bfloat16").dtype == "bfloat16"
