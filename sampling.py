"""Answers sampled from a model for prompts: batched, seeded per batch, cut at the end of the
assistant's turn. judge.py's answers, and report.py's samples for how far the policy moved
from its reference, come from here.

Not here: judging the answers (judge.py) or scoring them (report_page.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from tqdm import tqdm

import data


def cut_at_eos(token_ids: list[int], stop_ids: list[int]) -> list[int]:
    """The tokens before the first EOS (or other stop id: a chat template's end of turn).
    generate() pads finished rows with pad, which can be EOS."""
    return next((token_ids[:i] for i, token in enumerate(token_ids) if token in stop_ids), token_ids)


def left_padded(rows: list[list[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Prompts' ids as generate() takes them: left-padded so that each ends where its answer
    starts, with the attention mask that tells padding from tokens. (B, T) each."""
    if not all(rows):
        raise ValueError("a prompt with no token at all (empty text, a tokenizer without BOS): nothing to answer from")
    width = max(map(len, rows))
    return {"input_ids": torch.tensor([[pad_id] * (width - len(row)) + row for row in rows], device=device),
            "attention_mask": torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=device)}


@dataclass
class Sampled:
    """One sampled answer as token ids: the prompt as generation saw it (left-cut to fit, no
    padding) and every token the model drew, up to and including the stop token it drew (EOS or
    its template's end of turn), or max_new_tokens of them."""
    position: int
    prompt_ids: list[int]
    answer_ids: list[int]


def stop_ids_of(tokenizer) -> tuple[str, list[int]]:
    """The model's own end of a turn (if any) and the ids that end an answer: EOS, or that turn end."""
    turn_end = data.assistant_turn_end(data.chat_renderer(tokenizer))  # the model's own end of a turn, if any
    turn_end_ids = tokenizer(turn_end.strip(), add_special_tokens=False).input_ids if turn_end.strip() else []
    return turn_end, [tokenizer.eos_token_id, *(turn_end_ids if len(turn_end_ids) == 1 else [])]


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float, batch_size: int = 8,
           seed: int = 0, wanted: set[int] | None = None, desc: str | None = "answers") -> Iterator[Sampled]:
    """The answers to the prompts of every batch that holds a wanted position (default: all), as
    token ids (Sampled). desc names the progress bar; None: no bar.

    The batches are fixed, batch k = prompts[k*B : (k+1)*B], and batch k samples under its own
    seed, from (seed, k): an answer depends on the seed and its batch, never on what was
    generated before. So a resumed run that regenerates a batch gets the answers an
    uninterrupted run got, and the base, SFT and DPO models draw the same random numbers.

    Prompts are left-padded so that each ends where generation starts; generate() takes the
    position ids from the attention mask, which GPT-2's absolute positions need (docs/PITFALLS.md 4).
    A prompt too long for the context keeps its last tokens (docs/PITFALLS.md 11). Its ids are
    the ones training reads (data.kept_prompt_ids): its BOS once, never an EOS after it
    (docs/PITFALLS.md 19).
    """
    max_prompt_tokens = model.config.max_position_embeddings - max_new_tokens
    if max_prompt_tokens < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the "
                         f"model's {model.config.max_position_embeddings} positions")
    _, stop_ids = stop_ids_of(tokenizer)
    sampling = (dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)  # plain temperature sampling,
                if temperature > 0 else dict(do_sample=False))                     # whatever the model's defaults
    wanted = set(range(len(prompts))) if wanted is None else wanted
    with tqdm(total=len(wanted), desc=desc, disable=not wanted or desc is None) as progress:
        for start in range(0, len(prompts), batch_size):
            positions = range(start, min(start + batch_size, len(prompts)))
            if wanted.isdisjoint(positions):
                continue
            torch.manual_seed(seed * 1_000_003 + start // batch_size)  # distinct for every (seed, batch) a run meets
            batch = left_padded([data.kept_prompt_ids(tokenizer, prompts[i], max_prompt_tokens) for i in positions],
                                tokenizer.pad_token_id, model.device)
            output = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=stop_ids, **sampling)  # (B, T + new)
            progress.update(len(wanted.intersection(positions)))  # before yielding: the caller may stop reading
            for row, position in enumerate(positions):
                prompt_ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()  # (T,) no padding
                new_ids = output[row, batch["input_ids"].shape[1]:].tolist()  # (new,) the answer only
                answer = cut_at_eos(new_ids, stop_ids)
                yield Sampled(position, prompt_ids, new_ids[:len(answer) + 1])  # and the stop it drew, if any


def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float,
                     batch_size: int = 8, seed: int = 0, wanted: set[int] | None = None,
                     desc: str | None = "answers") -> Iterator[tuple[int, str]]:
    """(position, answer) as text a reader or a judge compares (sample, above: which batches, which
    seeds): up to EOS, the end of an assistant's turn in the model's own chat template (its markup
    never reaches the judge), or where the model starts writing the human's next turn."""
    turn_end, stop_ids = stop_ids_of(tokenizer)
    for answer in sample(model, tokenizer, prompts, max_new_tokens, temperature, batch_size, seed, wanted, desc):
        text = tokenizer.decode(cut_at_eos(answer.answer_ids, stop_ids), skip_special_tokens=True)
        yield answer.position, data.plain_answer(text, turn_end)
