"""Preference data: records (HH-RLHF dialogues, explicit prompt/chosen/rejected, or chat
messages) -> (prompt, chosen, rejected) -> token ids -> batches.

Knows nothing of models, losses or training: its functions take plain arguments (paths,
sizes, a tokenizer or its chat template) and give plain things back, as the DPO authors keep
preference_datasets.py beside trainers.py. The traps it avoids (docs/PITFALLS.md 1, 2, 4, 11,
14, 15) are each pinned by a test in tests/test_train.py, tests/test_data.py or
tests/test_prefix_sharing.py.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import gzip
import hashlib
import json
import os
import random
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import torch
from torch import Tensor

ASSISTANT = "\n\nAssistant:"      # an HH-RLHF prompt ends at the last one
HUMAN = "\n\nHuman:"              # where a dialogue's next human turn starts
HUB_DATASET = "Anthropic/hh-rlhf"  # the default data, from the Hugging Face Hub
# The stand-in when the Hub cannot be reached: 2,000 real HH-RLHF pairs of the Hub's test
# split, shipped in data/ (see data/README.md).
BUNDLED_DATA = str(Path(__file__).resolve().parent / "data" / "hh-rlhf-harmless-base.jsonl.gz")


class DataError(ValueError):
    """Bad input data: the message names the file and line."""


def count(counts: dict, reason: str) -> None:
    """One more pair (or line) dropped for this reason."""
    counts[reason] = counts.get(reason, 0) + 1


# ---------------------------------------------------------------------------------------
# Records -> (prompt, chosen, rejected)
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pair:
    prompt: str    # the dialogue up to where the answer starts (HH: the last "\n\nAssistant:")
    chosen: str    # y_w, the answer people preferred
    rejected: str  # y_l


# Three record formats, told apart by the first record of a file:
#   hh              {"chosen": dialogue, "rejected": dialogue}: HH-RLHF's, the prompt is their shared start
#   explicit        {"prompt": str, "chosen": str, "rejected": str}: TRL's standard format
#   conversational  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}, a message being
#                   {"role": ..., "content": ...}: rendered with the tokenizer's chat template
FORMATS = ("hh", "explicit", "conversational")
Render = Callable[[list[dict], bool], str]  # (messages, add_generation_prompt) -> text


def record_format(record: dict) -> str:
    if "prompt" not in record:
        return "hh"
    return "conversational" if isinstance(record["prompt"], list) else "explicit"


def checked_pair(prompt: str, chosen: str, rejected: str) -> Pair | str:
    """The pair, or why it is dropped: an empty or identical answer teaches nothing."""
    if not chosen.strip() or not rejected.strip():
        return "empty response"
    if chosen == rejected:
        return "identical responses"
    return Pair(prompt, chosen, rejected)


def split_prompt(chosen: str, rejected: str) -> Pair | str:
    """Split an HH-RLHF record into prompt and two responses, or say why it is dropped.

    The prompt ends at the *last* "\n\nAssistant:" (not at a longest common prefix, which
    can run on into words both answers share; docs/PITFALLS.md 1).
    """
    cut = chosen.rfind(ASSISTANT)
    if cut < 0:
        return "no Assistant turn"
    prompt = chosen[:cut + len(ASSISTANT)]
    if not rejected.startswith(prompt) or ASSISTANT in rejected[len(prompt):]:
        return "prompts differ"
    return checked_pair(prompt, chosen[len(prompt):], rejected[len(prompt):])


HH_ROLES = {"system": "System", "user": "Human", "assistant": "Assistant"}


def render_hh(messages: list[dict], add_generation_prompt: bool) -> str:
    """Messages as HH-RLHF writes a dialogue ("\n\nHuman: ...\n\nAssistant: ..."): the chat
    template of a tokenizer that has none (GPT-2), so conversational data reads as HH data does."""
    text = "".join(f"\n\n{HH_ROLES[message['role']]}: {message['content']}" for message in messages)
    return text + ASSISTANT if add_generation_prompt else text


def chat_renderer(tokenizer) -> Render:
    """The tokenizer's own chat template if it has one, else render_hh. A template that refuses
    a conversation (raise_exception: Gemma 2 on a system turn, Llama 2 on roles that do not
    alternate) makes the record malformed: a ValueError, named by file:line like any other.
    Rendered as of TEMPLATE_DATE (clock_at): a template that writes today's date (Llama 3's
    "Today Date:") would give other token ids every day, and a run its data could not find
    again tomorrow (docs/PITFALLS.md 21)."""
    if not getattr(tokenizer, "chat_template", None):
        return render_hh
    from jinja2 import TemplateError

    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            with clock_at(TEMPLATE_DATE):
                return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except TemplateError as error:
            raise ValueError(f"the chat template refuses it: {one_line(error)}") from None
    return render


TEMPLATE_DATE = datetime.date(2024, 7, 26)  # "today" for a dated chat template: the date Llama 3.1's falls back to


@contextlib.contextmanager
def clock_at(day: datetime.date) -> Iterator[None]:
    """Inside, transformers' chat templates read day as today: their strftime_now() calls
    datetime.now() from transformers' chat_template_utils module, which is pointed at day here."""
    from transformers.utils import chat_template_utils as templates
    real = templates.datetime

    class Fixed(real):
        @classmethod
        def now(cls, tz=None):
            return cls(day.year, day.month, day.day, tzinfo=tz)

    templates.datetime = Fixed
    try:
        yield
    finally:
        templates.datetime = real


def template_is_dated(tokenizer) -> bool:
    """Whether the tokenizer's chat template writes the day it is rendered on, measured: one
    conversation rendered as of two days (no list of templates knows every one that does)."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    conversation = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    texts = set()
    for day in (TEMPLATE_DATE, datetime.date(2031, 12, 3)):
        with clock_at(day):
            try:
                texts.add(tokenizer.apply_chat_template(conversation, tokenize=False))
            except Exception:  # a template that refuses this conversation: it shows nothing either way
                return False
    return len(texts) > 1


def assistant_turn_end(render: Render) -> str:
    """What the chat template writes after an assistant's message, where its turn ends
    ("<end_of_turn>\n" for Gemma's); "" for HH text, whose turns end where "\n\nHuman:" starts."""
    marker = "\x00answer\x00"
    text = render([{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}], False)
    return text[text.index(marker) + len(marker):]


def plain_answer(text: str, turn_end: str) -> str:
    """A generated answer as text a reader (or a judge) compares: up to the end of the assistant's
    turn (turn_end, its markup) or the start of a next human turn, whichever comes first."""
    if turn_end.strip():
        text = text.split(turn_end.strip())[0]
    return text.split(HUMAN)[0]


def without_turn_end(text: str, turn_end: str) -> str:
    """A dataset answer without the markup its chat template wrote after it (its text is kept
    whole: it may quote a dialogue, or hold several messages)."""
    return text.rstrip().removesuffix(turn_end.strip()) if turn_end.strip() else text


def strings(record: dict, *keys: str) -> list[str]:
    values = [record.get(key) for key in keys]
    if not all(isinstance(value, str) for value in values):
        raise ValueError(f"{' and '.join(repr(key) for key in keys)} must be strings")
    if not is_valid_text("".join(values)):
        raise ValueError("text is not valid Unicode (a lone surrogate escape)")
    return values


def messages(record: dict, key: str) -> list[dict]:
    value = record.get(key)
    if not (isinstance(value, list) and value and all(
            isinstance(m, dict) and m.get("role") in HH_ROLES and isinstance(m.get("content"), str) for m in value)):
        raise ValueError(f"{key!r} must be a list of messages {{\"role\": system, user or assistant, \"content\": text}}")
    if not is_valid_text("".join(m["content"] for m in value)):
        raise ValueError("text is not valid Unicode (a lone surrogate escape)")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def answer_text(render: Render, prompt_messages: list[dict], prompt: str, answer_messages: list[dict]) -> str:
    """What the chat template writes after the prompt for these answer messages."""
    whole = render(prompt_messages + answer_messages, False)
    if not whole.startswith(prompt):
        raise ValueError("the chat template does not write the prompt the same way with the answer after it")
    return whole[len(prompt):]


def record_to_pair(record: dict, record_format: str, render: Render | None) -> Pair | str:
    """A record of the given format as a pair, or a drop reason; a malformed record raises ValueError."""
    if record_format == "hh":
        return split_prompt(*strings(record, "chosen", "rejected"))
    if record_format == "explicit":
        return checked_pair(*strings(record, "prompt", "chosen", "rejected"))
    prompt_messages, chosen, rejected = (messages(record, key) for key in ("prompt", "chosen", "rejected"))
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
        others = sorted({message["role"] for message in answer} - {"assistant"})
        if others:  # else the model learns to write the human's next turn
            raise ValueError(f"{key!r} must hold assistant turns only, not {' or '.join(others)}")
    if render is None:
        raise ValueError("conversational data is rendered with the model's chat template: no tokenizer was given")
    prompt = render(prompt_messages, True)  # ends where the assistant's answer starts
    return checked_pair(prompt, answer_text(render, prompt_messages, prompt, chosen),
                        answer_text(render, prompt_messages, prompt, rejected))


def bad_line(message: str, skip_bad_lines: bool, counts: dict) -> None:
    """Stop with file:line and the reason, or (--skip-bad-lines) count the line as dropped."""
    if not skip_bad_lines:
        raise DataError(message)
    count(counts, "malformed line")


def read_jsonl(path: str, skip_bad_lines: bool, counts: dict) -> Iterator[tuple[int, dict]]:
    """(line number, record) from a .jsonl or .jsonl.gz file; bad lines stop with file:line."""
    opener = gzip.open if path.endswith(".gz") else open
    line_no = 0
    try:
        with opener(path, "rb") as lines:
            for line_no, raw in enumerate(lines, 1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw.decode("utf-8"))
                    if not isinstance(record, dict):
                        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
                except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError; absurd nesting
                    bad_line(f"{path}:{line_no}: malformed line ({error})", skip_bad_lines, counts)
                    continue
                yield line_no, record
    except (OSError, EOFError) as error:  # truncated or corrupt gzip
        raise DataError(f"{path}:{line_no + 1}: cannot read ({error})") from None


def records_to_pairs(records: Iterable[tuple[int, dict]], source: str, skip_bad_lines: bool,
                     counts: dict, render: Render | None = None) -> list[Pair]:
    """The one path every record takes, from a local file or from the Hub. The format of the
    first well-formed record is the data's (a malformed first line decides nothing); a record
    of another format is malformed."""
    pairs, data_format = [], None
    for line_no, record in records:
        try:
            if data_format is not None and record_format(record) != data_format:
                raise ValueError(f"a {record_format(record)} record in {data_format} data (the format of its "
                                 f"first well-formed record)")
            pair = record_to_pair(record, record_format(record), render)
        except ValueError as error:
            bad_line(f"{source}:{line_no}: malformed record ({error})", skip_bad_lines, counts)
            continue
        data_format = data_format or record_format(record)
        if isinstance(pair, str):
            count(counts, pair)
        else:
            pairs.append(pair)
    return pairs


def is_valid_text(text: str) -> bool:
    """JSON may escape lone surrogates ("\\ud800") that no tokenizer can encode."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


LOCAL_FORMATS = (".jsonl", ".jsonl.gz", ".json", ".parquet")


def load_pairs(data: str, hub_subset: str = "harmless-base", split: str = "train", skip_bad_lines: bool = False,
               counts: dict | None = None, render: Render | None = None) -> list[Pair]:
    """Pairs from a local .jsonl, .jsonl.gz, .json or .parquet file, or from a Hub dataset id (the
    --split of it; hub_subset is Anthropic/hh-rlhf's folder). JSON Lines are read here, line by line,
    so a bad line is named by number; the rest through `datasets`, as the Hub is, numbered by record."""
    counts = {} if counts is None else counts
    local = os.path.exists(data) or data.endswith(LOCAL_FORMATS)
    if local and not os.path.isfile(data):
        raise DataError(f"data file not found: {data}")
    if local and data.endswith((".jsonl", ".jsonl.gz")):
        return records_to_pairs(read_jsonl(data, skip_bad_lines, counts), data, skip_bad_lines, counts, render)
    if local and not data.endswith(LOCAL_FORMATS):
        raise DataError(f"{data}: a data file must be one of {', '.join(LOCAL_FORMATS)}")
    import datasets  # .json, .parquet and the Hub
    try:
        if local:
            records = datasets.load_dataset("parquet" if data.endswith(".parquet") else "json", data_files=data,
                                            split="train")
        else:
            records = datasets.load_dataset(data, data_dir=hub_subset if data == HUB_DATASET else None, split=split)
    except Exception as error:  # no network, a cut download, a bad file or subset: one line, never a traceback
        where = data if local else f"{data} ({hub_subset + ', ' if data == HUB_DATASET else ''}{split}) from the Hub"
        raise DataError(f"cannot load {where}: {one_line(error)}" + ("" if local else "; pass --data FILE to train "
                                                                     "on a local file")) from None
    source = data if local else f"{data}/{hub_subset + '/' if data == HUB_DATASET else ''}{split}"
    return records_to_pairs(enumerate(records, 1), source, skip_bad_lines, counts, render)


def one_line(error: BaseException) -> str:
    """An exception as a few words a user can read: its type and its message's first line."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


class Splits(NamedTuple):
    """A run's three splits, each with one job: train (the gradient), validation (early stopping,
    best.pt, any choice of settings), test (scored once, at the end; nothing is chosen on it); as
    pairs (split_data) or as their token ids (tokenize_splits)."""
    train: list[Pair]
    validation: list[Pair]
    test: list[Pair]


def split_data(data: str, hub_subset: str = "harmless-base", val_size: int = 200, test_size: int = 200,
               seed: int = 0, num_examples: int = 0, skip_bad_lines: bool = False, counts: dict | None = None,
               split: str = "train", render: Render | None = None) -> Splits:
    """The three splits. Anthropic/hh-rlhf from the Hub: its --split trains, and its test split,
    shuffled by seed, gives val_size validation pairs (its first) and test_size test pairs (its
    last). Any other data, a local file or a Hub dataset's --split: the same seeded shuffle of all
    its pairs, validation first, test last, the rest trains. No pair trains on a prompt that
    validation or test holds (counted), nor validates on a test prompt: the same prompt with other
    answers would leak them. num_examples: the first N training pairs only; 0 = all. test_size 0:
    no test split (what older checkpoints had)."""
    counts = {} if counts is None else counts
    if data != HUB_DATASET:
        pairs = load_pairs(data, hub_subset, split, skip_bad_lines, counts, render)
        random.Random(seed).shuffle(pairs)
        if len(pairs) <= val_size + test_size:
            raise DataError(f"{data}: {len(pairs)} usable pairs, not enough for {val_size} validation and "
                            f"{test_size} test pairs and some to train on")
        train_pairs = pairs[val_size:len(pairs) - test_size]
    else:
        if "test" in split:  # "test", "test[:90%]", "train+test": the pairs validation, test and judge.py read
            raise DataError(f"{HUB_DATASET} validates and tests on its test split: train on a --split without it "
                            f"(train), not {split}")
        train_pairs = load_pairs(HUB_DATASET, hub_subset, split, skip_bad_lines, counts)
        pairs = load_pairs(HUB_DATASET, hub_subset, "test", skip_bad_lines, counts)
        random.Random(seed).shuffle(pairs)
        if len(pairs) < val_size + test_size:
            raise DataError(f"{HUB_DATASET} ({hub_subset}) has {len(pairs)} test-split pairs, fewer than "
                            f"{val_size} validation + {test_size} test pairs")
    splits = kept_apart(Splits(train_pairs, pairs[:val_size], pairs[len(pairs) - test_size:] if test_size else []),
                        lambda pair: pair.prompt, counts)  # the same pair twice, or the same prompt, other answers
    return splits._replace(train=splits.train[:num_examples]) if num_examples else splits


def kept_apart(splits: Splits, prompt_of: Callable, counts: dict) -> Splits:
    """The splits with no prompt on two sides: a validation pair with a test pair's prompt and a
    training pair with a held-out pair's are dropped (counted); the test pairs are all kept.
    prompt_of says what one prompt is: its text (split_data), or its kept token ids (tokenize_splits)."""
    train, validation, test = splits
    validation = without_prompts(validation, {prompt_of(item) for item in test}, prompt_of, "a test pair's prompt", counts)
    held_out = {prompt_of(item) for item in validation + test}
    return Splits(without_prompts(train, held_out, prompt_of, "a held-out pair's prompt", counts), validation, test)


def without_prompts(items: list, prompts: set, prompt_of: Callable, reason: str, counts: dict) -> list:
    """The items whose prompt is not one of prompts; the others counted under reason."""
    kept = [item for item in items if prompt_of(item) not in prompts]
    if len(kept) < len(items):
        counts[reason] = counts.get(reason, 0) + len(items) - len(kept)
    return kept


# ---------------------------------------------------------------------------------------
# Pairs -> token ids -> batches, and the order of batches
# ---------------------------------------------------------------------------------------

@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def keep_prompt_end(prompt_ids: list[int], lead: tuple[int, ...] | int | None, max_prompt_length: int) -> list[int]:
    """The prompt's lead (its BOS, or the special tokens a tokenizer puts before a text: prompt_lead;
    an int is one BOS id), if the prompt starts with it, and its last tokens: the turns that
    matter. At most max_prompt_length ids in all, the lead included."""
    lead = list(lead) if isinstance(lead, tuple) else [] if lead is None else [lead]
    head = lead if lead and prompt_ids[:len(lead)] == lead else []
    rest, keep = prompt_ids[len(head):], max(0, max_prompt_length - len(head))
    return head + rest[max(0, len(rest) - keep):]  # not rest[-keep:]: at keep = 0 that is all of it


def prompt_lead(tokenizer) -> tuple[int, ...]:
    """What leads a prompt and stays when it is cut: the special tokens the tokenizer puts before
    a text (a BOS; GLM's "[gMASK] <sop>"; BERT's "[CLS]"), or else the BOS a chat template writes."""
    before, _ = special_tokens_around(tokenizer)
    return before or ((tokenizer.bos_token_id,) if tokenizer.bos_token_id is not None else ())


@functools.cache
def special_tokens_around(tokenizer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The special tokens this tokenizer puts before a text (its BOS) and after it (an EOS, where
    it ships "add_eos_token": true, as some Llama and Mistral fine-tunes do), measured on the
    tokenizer itself: a text encoded with and without them. The ones after a text never go
    after a prompt (docs/PITFALLS.md 19): nothing stands between a prompt and its answer."""
    plain = tokenizer(SEAM_PROBE, add_special_tokens=False).input_ids
    whole = tokenizer(SEAM_PROBE).input_ids
    for start in range(len(whole) - len(plain) + 1):
        if whole[start:start + len(plain)] == plain:
            return tuple(whole[:start]), tuple(whole[start + len(plain):])
    raise DataError(f"the tokenizer's special tokens change a text's own tokens ({SEAM_PROBE!r}: {plain} alone, "
                    f"{whole} with them), so no one can tell where a prompt ends")


SEAM_PROBE = "Hello there"


def prompt_token_ids(tokenizer, text: str) -> list[int]:
    """A prompt's token ids, whole: the special tokens the tokenizer puts before a text (its BOS;
    not when the text writes it itself, as Gemma's chat template writes "<bos>"), then the
    text's own, never those it puts after a text (kept_prompt_ids: as training, scoring and
    generation read a prompt)."""
    return led_by_specials(tokenizer, tokenizer(text, add_special_tokens=False).input_ids)


def led_by_specials(tokenizer, own: list[int]) -> list[int]:
    """A text's own token ids behind the special tokens the tokenizer puts before a text, unless
    they lead already (a template that writes "<bos>" gives its id itself: one BOS, not two)."""
    before, _ = special_tokens_around(tokenizer)
    return [*before, *own] if before and own[:len(before)] != list(before) else own


def answer_token_ids(tokenizer, prompt: str, prompt_own: list[int], answer: str) -> list[int] | None:
    """An answer's token ids as the tokenizer writes it after its prompt: the tokens of prompt +
    answer past the prompt's own ones (prompt_own, without special tokens). Alone, some tokenizers
    write a text's start otherwise: SentencePiece's dummy prefix puts a space before it, so an
    answer tokenised apart would read " Hi" where the template wrote "Hi" (docs/PITFALLS.md 19).
    Where a token spans the seam (the whole does not begin with the prompt's own tokens) there is
    no clean cut: the answer's own tokens (docs/PITFALLS.md 1), if prompt and answer so
    tokenised still read as the whole text; else None."""
    whole = tokenizer(prompt + answer, add_special_tokens=False).input_ids
    if whole[:len(prompt_own)] == prompt_own:
        return whole[len(prompt_own):]
    alone = tokenizer(answer, add_special_tokens=False).input_ids
    read = lambda ids: tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return alone if read(prompt_own + alone) == read(whole) else None


def prompt_text(prompt: str) -> str:
    """The text a prompt's ids are made of: the prompt less its trailing spaces, which start each
    answer instead. A space before a word is that word's (" Yes", one token), and with a dummy
    prefix an answer after "Answer: " would read "Answer:  Yes" (docs/PITFALLS.md 19). The whole
    text is unchanged; only where it is cut."""
    return prompt.rstrip(" ")


def kept_prompt_ids(tokenizer, prompt: str, max_prompt_length: int) -> list[int]:
    """The prompt's ids as a run keeps them and generation reads them: its lead, if any, and its
    last tokens (keep_prompt_end), of its text less trailing spaces (prompt_text)."""
    return keep_prompt_end(prompt_token_ids(tokenizer, prompt_text(prompt)), prompt_lead(tokenizer), max_prompt_length)


SEAM_DROP = "no clean cut between prompt and answer (a token spans it; apart they read otherwise)"


def tokenize_pair(pair: Pair, tokenizer, max_length: int, max_prompt_length: int) -> TokenizedPair | str:
    """Token ids of prompt and responses, or a drop reason. The prompt is tokenised on its own,
    so chosen and rejected rows share its tokens (docs/PITFALLS.md 1), with the special tokens
    a tokenizer puts before a text, never the ones after it; each answer as the tokenizer writes
    it after the prompt (answer_token_ids, docs/PITFALLS.md 19), the prompt's trailing spaces
    its start (prompt_text). A row is then the whole text as the tokenizer writes it, or reads
    as it; where neither holds, the pair is dropped (SEAM_DROP).

    The prompt keeps its last max_prompt_length tokens (the turns that matter, docs/PITFALLS.md 11)
    and its lead (a BOS) if it has one; responses get EOS (docs/PITFALLS.md 2) and keep their
    start. A response cut by max_length loses its EOS: it did not end there. A prompt of no
    token at all (empty text, a tokenizer without BOS) is dropped: the answer's first token
    would be scored from a column that has seen the whole answer.
    """
    text = prompt_text(pair.prompt)
    carried = pair.prompt[len(text):]  # its trailing spaces: the answers' start
    own = tokenizer(text, add_special_tokens=False).input_ids
    prompt_ids = keep_prompt_end(led_by_specials(tokenizer, own), prompt_lead(tokenizer), max_prompt_length)
    if not prompt_ids:  # no BOS, no text: nothing before the answer's first token to predict it from
        return "empty prompt"
    answers = [answer_token_ids(tokenizer, text, own, carried + answer) for answer in (pair.chosen, pair.rejected)]
    if None in answers:
        return SEAM_DROP
    budget = max_length - len(prompt_ids)
    eos = [tokenizer.eos_token_id]
    chosen_ids, rejected_ids = ((ids + eos)[:budget] for ids in answers)
    if budget <= 0 or not chosen_ids or not rejected_ids:
        return "no response token left after truncation"
    return TokenizedPair(prompt_ids, chosen_ids, rejected_ids)


def fingerprint(items: list[TokenizedPair]) -> str:
    """sha256 of the token ids, in order: what a run trained or validated on, whatever made them
    (the file, a chat template's rendering, the tokenizer, the cuts). Saved in every checkpoint."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps([item.prompt_ids, item.chosen_ids, item.rejected_ids]).encode())
    return digest.hexdigest()


def prompt_key(prompt_ids: list[int]) -> int:
    """A kept prompt as one int64: the first 8 bytes of the sha256 of its ids."""
    return int.from_bytes(hashlib.sha256(json.dumps(list(prompt_ids)).encode()).digest()[:8], "little", signed=True)


def prompt_keys(prompts: Iterable[list[int]]) -> Tensor:
    """The distinct kept prompts given (their ids; prompt_key), sorted: what "one prompt" means to
    a run (kept_apart), small enough for a checkpoint to carry every one it trained or validated
    on, so that a program that shows "test" pairs from elsewhere can leave those out."""
    return torch.tensor(sorted({prompt_key(ids) for ids in prompts}), dtype=torch.int64)


def tokenize_pairs(pairs: list[Pair], tokenizer, max_length: int, max_prompt_length: int,
                   counts: dict) -> list[TokenizedPair]:
    """The pairs that keep a response token after truncation; the others are counted as dropped."""
    tokenized = []
    for pair in pairs:
        item = tokenize_pair(pair, tokenizer, max_length, max_prompt_length)
        if isinstance(item, str):
            count(counts, item)
        else:
            tokenized.append(item)
    return tokenized


def tokenize_splits(splits: Splits, tokenizer, max_length: int, max_prompt_length: int, counts: dict) -> Splits:
    """The three splits as token ids (tokenize_pairs), kept apart again (kept_apart) by what the
    model sees: two prompts that differ only before their kept last max_prompt_length tokens are
    one prompt to it, so no pair trains on a held-out pair's kept prompt, nor validates on a test
    pair's. The test pairs are never dropped."""
    return kept_apart(Splits(*(tokenize_pairs(pairs, tokenizer, max_length, max_prompt_length, counts) for pairs in splits)),
                      lambda item: tuple(item.prompt_ids), counts)


@dataclass
class Batch:
    """What one forward pass reads, and which of its hidden states score which response token.

    B pairs make 2B sequences, s = 0..B-1 chosen, B..2B-1 rejected. They are laid out as R rows
    of T tokens: two rows a pair (collate, R = 2B), or one row a pair that holds the prompt
    once (collate_shared, R = B). Sequence s lives in row s % R either way.
    """
    input_ids: Tensor       # (R, T) token rows, right-padded
    attention_mask: Tensor  # (R, T) 1 on tokens, 0 on padding; or (R, 1, T, T) bool: query q may see key k
    position_ids: Tensor    # (R, T) each token's position in its own sequence
    response_mask: Tensor   # (R, T) True on response tokens (EOS included), never prompt or padding
    source: Tensor          # (2B, L) for the l-th response token of sequence s: the column of its row
                            #         whose hidden state predicts it (the token before it in s)
    targets: Tensor         # (2B, L) that response token
    target_mask: Tensor     # (2B, L) True on the sequence's response tokens, False on padding
    index: Tensor           # (B,) which pairs, for the reference cache

    @property
    def sequence_tokens(self) -> int:
        """Tokens of the 2B sequences, prompt counted in both: what a two-row batch holds
        without padding, whichever layout this batch has (bench/ counts speed in these)."""
        prompt_lengths = self.source[:, 0] + 1  # the first response token is predicted at the prompt's end
        return int(prompt_lengths.sum() + self.target_mask.sum())


def scored_positions(batch_sources: list[list[int]], batch_targets: list[list[int]]) -> tuple[Tensor, Tensor, Tensor]:
    """Lists of (source column, target token) per sequence -> source, targets, target_mask (2B, L)."""
    width = max(len(t) for t in batch_targets)
    source = torch.zeros((len(batch_targets), width), dtype=torch.long)
    targets = torch.zeros((len(batch_targets), width), dtype=torch.long)
    target_mask = torch.zeros((len(batch_targets), width), dtype=torch.bool)
    for s, (columns, tokens) in enumerate(zip(batch_sources, batch_targets)):
        source[s, :len(columns)] = torch.tensor(columns)
        targets[s, :len(tokens)] = torch.tensor(tokens)
        target_mask[s, :len(tokens)] = True
    return source, targets, target_mask


def collate(items: list[TokenizedPair], index: list[int], pad_id: int) -> Batch:
    """Two rows a pair, prompt + chosen and prompt + rejected: every model can read this.

    Right-padded (docs/PITFALLS.md 4): positions start at 0 in every row, as GPT-2's absolute
    position embeddings expect. Padding is found from lengths, never by comparing ids with
    pad_id, which may equal EOS (docs/PITFALLS.md 2). Response token t of a row is predicted by
    the hidden state at t - 1: the one-position shift."""
    sequences = [(it.prompt_ids, it.chosen_ids) for it in items] + [(it.prompt_ids, it.rejected_ids) for it in items]
    width = max(len(p) + len(r) for p, r in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    response_mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, (prompt, response) in enumerate(sequences):
        n = len(prompt) + len(response)
        input_ids[row, :n] = torch.tensor(prompt + response)
        attention_mask[row, :n] = 1
        response_mask[row, len(prompt):n] = True
    position_ids = torch.arange(width).expand(len(sequences), width)
    source, targets, target_mask = scored_positions(
        [list(range(len(p) - 1, len(p) + len(r) - 1)) for p, r in sequences], [r for _, r in sequences])
    return Batch(input_ids, attention_mask, position_ids, response_mask, source, targets, target_mask,
                 torch.tensor(index))


def collate_shared(items: list[TokenizedPair], index: list[int], pad_id: int) -> Batch:
    """One row a pair, prompt + chosen + rejected: the prompt is computed once, not twice.

    Prefix sharing (Wang & Hegde 2024, "Accelerating Direct Preference Optimization with
    Prefix Sharing", arXiv 2410.20305). Three things make the row compute exactly what the two
    rows of collate compute (docs/PITFALLS.md 15):
      - a block mask: every token sees the prompt and the earlier tokens of its own response;
        rejected tokens never see chosen ones;
      - positions: the rejected response's positions continue from the prompt's end, as in
        its own row (P, P+1, ...), not from the chosen response's end.
      - scores: the first rejected token is predicted by the prompt's last hidden state, which
        also predicts the first chosen token, not by the chosen response's last one.

        row:       [ prompt (P) | chosen (C) | rejected (R) | padding ]
        position:    0 .. P-1     P .. P+C-1   P .. P+R-1     0
        sees:        causal       prompt +     prompt +       itself only (no row of the
                                  chosen<=t    rejected<=t    mask may be empty)
    """
    width = max(len(it.prompt_ids) + len(it.chosen_ids) + len(it.rejected_ids) for it in items)
    rows = len(items)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((rows, width), dtype=torch.long)
    response_mask = torch.zeros((rows, width), dtype=torch.bool)
    causal = torch.ones((width, width), dtype=torch.bool).tril()   # (T, T): key <= query
    attention_mask = torch.eye(width, dtype=torch.bool).repeat(rows, 1, 1)  # (R, T, T)
    chosen_sources, rejected_sources = [], []
    for row, it in enumerate(items):
        p, c, r = len(it.prompt_ids), len(it.chosen_ids), len(it.rejected_ids)
        n = p + c + r
        input_ids[row, :n] = torch.tensor(it.prompt_ids + it.chosen_ids + it.rejected_ids)
        position_ids[row, :n] = torch.cat([torch.arange(p + c), torch.arange(p, p + r)])
        response_mask[row, p:n] = True
        attention_mask[row, :n, :n] = causal[:n, :n]
        attention_mask[row, p + c:n, p:p + c] = False  # rejected queries never see chosen keys
        chosen_sources.append(list(range(p - 1, p + c - 1)))
        rejected_sources.append([p - 1] + list(range(p + c, n - 1)))
    source, targets, target_mask = scored_positions(
        chosen_sources + rejected_sources, [it.chosen_ids for it in items] + [it.rejected_ids for it in items])
    return Batch(input_ids, attention_mask[:, None], position_ids, response_mask, source, targets, target_mask,
                 torch.tensor(index))


def chosen_rows(batch: Batch) -> Batch:
    """The chosen sequences of a two-row batch (its first half), without the columns only the
    rejected ones needed: what the supervised stage trains on."""
    if batch.attention_mask.dim() != 2:
        raise ValueError("chosen_rows takes a two-row batch (collate), not a shared-prefix one")
    half = batch.input_ids.shape[0] // 2
    width = int(batch.attention_mask[:half].sum(-1).max())  # right-padded: the longest chosen row
    scored = int(batch.target_mask[:half].sum(-1).max())
    return Batch(batch.input_ids[:half, :width], batch.attention_mask[:half, :width], batch.position_ids[:half, :width],
                 batch.response_mask[:half, :width], batch.source[:half, :scored], batch.targets[:half, :scored],
                 batch.target_mask[:half, :scored], batch.index)


def to_device(batch: Batch, device: torch.device) -> Batch:
    return Batch(*(getattr(batch, f.name).to(device) if f.name != "index" else batch.index for f in fields(Batch)))


def padded_length(item: TokenizedPair) -> int:
    """The width the pair's longer sequence needs in a batch."""
    return len(item.prompt_ids) + max(len(item.chosen_ids), len(item.rejected_ids))


def epoch_batches(items: list[TokenizedPair], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch as lists of pair indices: a seeded shuffle, then pairs of similar
    length grouped into a batch (less padding), then the batches shuffled. A function of
    (seed, epoch) only, so a resumed run sees the same order.

    Every batch is whole: the len(items) % batch_size pairs that would make a short batch are
    left out of this epoch, chosen by the shuffle before any grouping. (A short batch would get
    a whole batch's weight, and under torchrun leave some ranks with nothing to train on.)
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(items)))
    rng.shuffle(order)
    order = order[:len(order) - len(order) % batch_size]
    window = batch_size * 16  # sort within windows, so batches still mix the data
    order = [i for start in range(0, len(order), window)
             for i in sorted(order[start:start + window], key=lambda i: padded_length(items[i]))]
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches
