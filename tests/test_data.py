"""data.py's record formats and files: HH dialogues, explicit prompt/chosen/rejected, and conversational
messages, from .jsonl, .jsonl.gz, .json and .parquet, all down one path to the same token ids."""
import contextlib
import gzip
import json

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import data
from conftest import gpt2_tokenizer

H, A = "\n\nHuman:", "\n\nAssistant:"
# A Gemma-style template that writes its own BOS, as many do.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else "
                 "m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
                 "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = gpt2_tokenizer()  # no chat template: conversations are rendered as HH writes them
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@pytest.fixture(scope="module")
def chat_tokenizer():
    tokenizer = gpt2_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.add_bos_token = True  # the tokenizer adds a BOS too: the template's must not be doubled
    return tokenizer


def in_three_formats(turns: list[str], chosen: str, rejected: str) -> dict[str, dict]:
    """One preference pair as an HH record, an explicit record and a conversational record.
    turns: the dialogue's messages, human first, ending with a human turn."""
    roles = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    conversation = [{"role": role, "content": text} for role, text in zip(roles, turns)]
    prompt = data.render_hh(conversation, add_generation_prompt=True)  # "\n\nHuman: ...\n\nAssistant:"
    return {"hh": {"chosen": prompt + " " + chosen, "rejected": prompt + " " + rejected},
            "explicit": {"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected},
            "conversational": {"prompt": conversation, "chosen": [{"role": "assistant", "content": chosen}],
                               "rejected": [{"role": "assistant", "content": rejected}]}}


def write(path, records):
    """Records into a file of the type its name says."""
    name = str(path)
    if name.endswith(".parquet"):
        import datasets
        datasets.Dataset.from_list(records).to_parquet(name)
    elif name.endswith(".json"):
        path.write_text(json.dumps(records))
    else:
        lines = "".join(json.dumps(record) + "\n" for record in records)
        (gzip.open(path, "wt") if name.endswith(".gz") else open(path, "w")).write(lines)
    return name


text = st.text(st.sampled_from("abcdefgh ijk,.?!'XYZ0123"), min_size=1, max_size=30).map(str.strip).filter(bool)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(turns=st.integers(0, 2).flatmap(lambda n: st.lists(text, min_size=2 * n + 1, max_size=2 * n + 1)),
       chosen=text, rejected=text)
def test_one_pair_in_any_format_gives_the_same_token_ids(tokenizer, turns, chosen, rejected):
    assume(chosen != rejected)
    records = in_three_formats(turns, chosen, rejected)
    render = data.chat_renderer(tokenizer)
    pairs = {name: data.records_to_pairs([(1, record)], name, False, {}, render) for name, record in records.items()}
    assert pairs["hh"] == pairs["explicit"] == pairs["conversational"] and len(pairs["hh"]) == 1
    ids = {name: data.tokenize_pair(found[0], tokenizer, 256, 128) for name, found in pairs.items()}
    assert ids["hh"] == ids["explicit"] == ids["conversational"]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".json", ".parquet"])
@pytest.mark.parametrize("record_format", data.FORMATS)
def test_every_file_type_holds_every_format(tmp_path, tokenizer, suffix, record_format):
    pairs = [in_three_formats([f"Question {i}?"], f"Answer {i}.", "No.") for i in range(3)]
    path = write(tmp_path / f"d{suffix}", [pair[record_format] for pair in pairs])
    loaded = data.load_pairs(path, render=data.chat_renderer(tokenizer))
    assert loaded == [data.Pair(f"{H} Question {i}?{A}", f" Answer {i}.", " No.") for i in range(3)]


def test_a_chat_template_renders_the_prompt_up_to_the_answer_and_its_bos_is_not_doubled(chat_tokenizer):
    record = in_three_formats(["Hi there", "Hello!", "Name a colour."], "Blue.", "I won't.")["conversational"]
    [pair] = data.records_to_pairs([(1, record)], "x", False, {}, data.chat_renderer(chat_tokenizer))
    assert pair.prompt == ("<|endoftext|><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\nHello!"
                           "<end_of_turn>\n<start_of_turn>user\nName a colour.<end_of_turn>\n<start_of_turn>model\n")
    assert (pair.chosen, pair.rejected) == ("Blue.<end_of_turn>\n", "I won't.<end_of_turn>\n")
    item = data.tokenize_pair(pair, chat_tokenizer, 256, 128)
    bos = chat_tokenizer.bos_token_id
    assert item.prompt_ids[0] == bos and item.prompt_ids[1] != bos  # the template's BOS, once
    assert chat_tokenizer("x").input_ids[0] == bos  # (the tokenizer would have added one)
    chat_tokenizer.chat_template = CHAT_TEMPLATE.replace("'model' if m['role'] == 'assistant' else ", "")
    try:  # a template that names the answer's turn otherwise than its generation prompt does: refused
        with pytest.raises(data.DataError, match="does not write the prompt the same way"):
            data.records_to_pairs([(1, record)], "x", False, {}, data.chat_renderer(chat_tokenizer))
    finally:
        chat_tokenizer.chat_template = CHAT_TEMPLATE


def test_a_record_of_another_format_is_an_error_naming_the_line_or_a_counted_drop(tmp_path, tokenizer):
    formats = in_three_formats(["Hi?"], "Yes.", "No.")
    path = write(tmp_path / "mixed.jsonl", [formats["hh"], formats["explicit"], formats["hh"]])
    with pytest.raises(data.DataError, match=r"mixed\.jsonl:2: malformed record \(a explicit record in hh data"):
        data.load_pairs(path)
    counts = {}
    assert len(data.load_pairs(path, skip_bad_lines=True, counts=counts)) == 2 and counts == {"malformed line": 1}


@pytest.mark.parametrize("record, message", [
    ({"prompt": "q", "chosen": 1, "rejected": "b"}, "'prompt' and 'chosen' and 'rejected' must be strings"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": []}, "'chosen' must be a list of messages"),
    ({"prompt": [{"role": "robot", "content": "q"}], "chosen": [], "rejected": []}, "'prompt' must be a list of messages"),
])
def test_malformed_records_of_each_format_name_file_and_line(tmp_path, record, message):
    path = write(tmp_path / "d.jsonl", [record])
    with pytest.raises(data.DataError, match=rf"d\.jsonl:1: malformed record \({message}"):
        data.load_pairs(path, render=data.render_hh)


def test_conversational_data_without_a_tokenizer_and_unknown_files_are_clear_errors(tmp_path):
    path = write(tmp_path / "d.jsonl", [in_three_formats(["Hi?"], "Yes.", "No.")["conversational"]])
    with pytest.raises(data.DataError, match="rendered with the model's chat template"):
        data.load_pairs(path)
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(data.DataError, match="must be one of .jsonl, .jsonl.gz, .json, .parquet"):
        data.load_pairs(str(tmp_path / "d.csv"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(data.DataError, match=r"cannot load .*bad\.parquet: "):
        data.load_pairs(str(tmp_path / "bad.parquet"))


# ----- what a review of the new breadth found (each trained on the wrong thing, or crashed) ------

@pytest.mark.parametrize("record_format", ["hh", "conversational"])
def test_a_malformed_first_record_does_not_decide_the_files_format(tmp_path, record_format):
    """A bad first line ("prompt": null) once made the file explicit, every good HH record "another format"."""
    good = [in_three_formats([f"Question {i}?"], f"Answer {i}.", "No.")[record_format] for i in range(3)]
    path = write(tmp_path / "d.jsonl", [{"prompt": None, "chosen": "a", "rejected": "b"}, *good])
    with pytest.raises(data.DataError, match=r"d\.jsonl:1: malformed record \('prompt' and 'chosen'"):
        data.load_pairs(path, render=data.render_hh)
    counts = {}
    assert len(data.load_pairs(path, skip_bad_lines=True, counts=counts, render=data.render_hh)) == 3
    assert counts == {"malformed line": 1}


@pytest.mark.parametrize("answer_roles", [["assistant", "user"], ["user"], ["assistant", "system"]])
def test_an_answer_of_a_conversation_holds_assistant_turns_only(tmp_path, tokenizer, chat_tokenizer, answer_roles):
    record = in_three_formats(["Hi?"], "Yes.", "No.")["conversational"]
    record["chosen"] = [{"role": role, "content": f"turn {i}"} for i, role in enumerate(answer_roles)]
    path = write(tmp_path / "d.jsonl", [record])
    for renderer in (tokenizer, chat_tokenizer):  # the HH renderer and a chat template alike
        with pytest.raises(data.DataError, match=r"d\.jsonl:1: malformed record \('chosen' must hold assistant "
                                                 r"turns only, not (system|user)\)"):
            data.load_pairs(path, render=data.chat_renderer(renderer))


def test_a_chat_template_that_refuses_a_conversation_is_a_malformed_record(tmp_path, chat_tokenizer):
    """Llama 2's and Mistral's templates raise on roles that do not alternate; Gemma 2's on a system turn."""
    strict = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
              "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
              "{% endif %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}{% if add_generation_prompt %}[assistant]"
              "{% endif %}")
    chat_tokenizer.chat_template = strict
    try:
        ok = in_three_formats(["Hi?"], "Yes.", "No.")["conversational"]
        refused = {**ok, "prompt": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}
        path = write(tmp_path / "d.jsonl", [ok, refused, ok])
        render = data.chat_renderer(chat_tokenizer)
        with pytest.raises(data.DataError, match=r"d\.jsonl:2: malformed record \(the chat template refuses it: "
                                                 r"TemplateError: Conversation roles must alternate"):
            data.load_pairs(path, render=render)
        counts = {}
        assert len(data.load_pairs(path, render=render, skip_bad_lines=True, counts=counts)) == 2
        assert counts == {"malformed line": 1}
    finally:
        chat_tokenizer.chat_template = CHAT_TEMPLATE


def test_an_empty_prompt_without_bos_is_dropped_not_scored_from_the_rows_last_column(tokenizer):
    assert tokenizer("").input_ids == [] and tokenizer.bos_token_id not in tokenizer("x").input_ids  # GPT-2 adds no BOS
    assert data.tokenize_pair(data.Pair("", " Yes.", " No."), tokenizer, 64, 32) == "empty prompt"
    counts = {}
    assert data.tokenize_pairs([data.Pair("", " Yes.", " No."), data.Pair("Q?", " Yes.", " No.")], tokenizer, 64, 32,
                               counts) and counts == {"empty prompt": 1}


SOURCES = ["hh .jsonl", "explicit .json", "conversational .parquet", "Anthropic/hh-rlhf"]


@contextlib.contextmanager
def source_with(pair_ids: list[int], source: str, tmp_path):
    """The same pairs (one per id: a file may repeat a pair) as one data source. The Hub's
    Anthropic/hh-rlhf cannot be reached here: inside, its two splits come from files through
    data.load_pairs, the train split the pairs, the test split a shifted copy (some prompts on
    both sides)."""
    with pytest.MonkeyPatch.context() as monkeypatch:  # undone after each example, not each test
        if source == data.HUB_DATASET:
            files = {split: write(tmp_path / f"{split}.jsonl", [in_three_formats([f"Question {i + shift}?"],
                                                                                 f"Answer {i}.", "No.")["hh"]
                                                                for i in pair_ids])
                     for split, shift in (("train", 0), ("test", 3))}
            load = data.load_pairs
            monkeypatch.setattr(data, "load_pairs", lambda name, subset, split, *args: load(files[split], subset, "train",
                                                                                            *args))
            yield data.HUB_DATASET
        else:
            record_format, suffix = source.split(" ")
            yield write(tmp_path / f"d{suffix}", [in_three_formats([f"Question {i}?"], f"Answer {i}.", "No.")[record_format]
                                                  for i in pair_ids])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(0, 9), min_size=12, max_size=40), st.integers(1, 5), st.integers(0, 4), st.integers(0, 3),
       st.sampled_from(SOURCES))
def test_the_three_splits_share_no_prompt_for_every_source_and_seed(tmp_path_factory, pair_ids, val_size, test_size, seed,
                                                                      source):
    """Repeated records (a file that holds a pair twice) never land on two sides: no pair trains
    on a validation or test prompt, nor validates on a test prompt; every pair is accounted for."""
    assume(len(pair_ids) > val_size + test_size)
    render = data.render_hh if source.startswith("conversational") else None
    counts = {}
    with source_with(pair_ids, source, tmp_path_factory.mktemp("d")) as path:
        splits = data.split_data(path, val_size=val_size, test_size=test_size, seed=seed, counts=counts, render=render)
        assert data.split_data(path, val_size=val_size, test_size=test_size, seed=seed, render=render) == splits
    train_prompts, val_prompts, test_prompts = ({p.prompt for p in split} for split in splits)
    assert not train_prompts & val_prompts and not train_prompts & test_prompts and not val_prompts & test_prompts
    assert len(splits.test) == test_size and len(splits.validation) + counts.get("a test pair's prompt", 0) == val_size
    trained_on = len(pair_ids) if source == data.HUB_DATASET else len(pair_ids) - val_size - test_size
    assert len(splits.train) + counts.get("a held-out pair's prompt", 0) == trained_on


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=3, max_size=12), st.lists(st.integers(0, 5), min_size=1, max_size=4),
       st.lists(st.integers(0, 5), max_size=4), st.integers(4, 40))
def test_prompts_that_differ_only_before_the_kept_tokens_never_land_on_two_sides(tokenizer, train_ids, val_ids, test_ids,
                                                                                  max_prompt_length):
    """Every prompt's text is its own (a preamble with its pair's number), so split_data keeps them
    all; but only the last max_prompt_length tokens reach the model, and there two prompts with
    the same last question are one: no pair may train on what a held-out pair's kept prompt is,
    nor validate on a test pair's. Test pairs are never dropped; every other pair is accounted for."""
    def pairs(ids, side):
        return [data.Pair(f"{H} This is {side} dialogue {n}, told at some length before its question. "
                          f"So: {A} Go on.{H} What is question {k}?{A}", f" Answer {k}.", " No.")
                for n, k in enumerate(ids)]
    splits = data.Splits(pairs(train_ids, "train"), pairs(val_ids, "validation"), pairs(test_ids, "test"))
    assert len({p.prompt for split in splits for p in split}) == sum(map(len, splits))  # text: all different
    counts = {}
    items = data.tokenize_splits(splits, tokenizer, max_prompt_length + 8, max_prompt_length, counts)
    kept = [{tuple(item.prompt_ids) for item in split} for split in items]
    assert not kept[0] & (kept[1] | kept[2]) and not kept[1] & kept[2]
    plain = [data.tokenize_pairs(split, tokenizer, max_prompt_length + 8, max_prompt_length, {}) for split in splits]
    assert items.test == plain[2]
    assert len(items.validation) + counts.get("a test pair's prompt", 0) == len(plain[1])
    assert len(items.train) + counts.get("a held-out pair's prompt", 0) == len(plain[0])
    assert all(item in items.train for item in plain[0] if tuple(item.prompt_ids) not in kept[1] | kept[2])  # only those


def test_a_training_pair_with_a_held_out_prompt_and_other_answers_is_dropped_too(tmp_path):
    rows = [in_three_formats([f"Question {i}?"], f"Answer {i}.", "No.")["hh"] for i in range(6)]
    rows += [in_three_formats([f"Question {i}?"], f"Answer {i}.", f"Other {i}.")["hh"] for i in range(6)]
    counts = {}
    train_pairs, validation, test = data.split_data(write(tmp_path / "d.jsonl", rows), val_size=3, test_size=2,
                                                    counts=counts)
    held_out = {p.chosen for p in validation + test}
    assert not {p.chosen for p in train_pairs} & held_out  # no held-out answer trained on
    assert not {p.chosen for p in validation} & {p.chosen for p in test}
    assert len(train_pairs) + counts["a held-out pair's prompt"] == 12 - 3 - 2  # each pair between trains or is dropped
    assert len(validation) + counts.get("a test pair's prompt", 0) == 3


@pytest.mark.parametrize("split", ["test", "test[:90%]", "train+test"])
def test_the_hubs_test_split_is_never_trained_on_since_it_validates(split):
    with pytest.raises(data.DataError, match="Anthropic/hh-rlhf validates and tests on its test split: train on a "
                                             "--split without it"):
        data.split_data(data.HUB_DATASET, split=split)


# ----- what a row holds: the seam between a prompt and its answer (docs/PITFALLS.md 19) ---------

# A Llama-2-style template: the answer after " [/INST]" with a space of the template's own, the
# turn ended by the EOS it writes; and a Gemma-style one: the answer right after "model\n".
LLAMA2_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] {{ m['content'] }} [/INST]"
                   "{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}")
SEAM_MERGES = ((":", "\u2581"), ("\n", "H"))  # tokens that span a seam: ": " + answer, "\n" + "Hi"


def seam_pairs(render, spaced: bool) -> list[data.Pair]:
    """Pairs whose answers start with a space or not, in HH text or through a chat template."""
    answers = [("Hi there.", "No."), ("Sure: here it is.", "Go away.")]
    lead = " " if spaced else ""
    if render is None:
        return [data.Pair(f"{H} Can you help?{A}", lead + chosen, lead + rejected) for chosen, rejected in answers]
    conversation = [{"role": "user", "content": "Can you help?"}]
    prompt = render(conversation, True)
    return [data.Pair(prompt, data.answer_text(render, conversation, prompt, [{"role": "assistant", "content": chosen}]),
                      data.answer_text(render, conversation, prompt, [{"role": "assistant", "content": rejected}]))
            for chosen, rejected in answers]


@settings(max_examples=50, deadline=None)
@given(add_bos=st.booleans(), add_eos=st.booleans(), add_prefix_space=st.booleans(), lead=st.sampled_from(["", " "]),
       trailing=st.sampled_from(["", " "]), template=st.sampled_from([None, CHAT_TEMPLATE, LLAMA2_TEMPLATE]),
       merges=st.sampled_from([(), SEAM_MERGES]))
def test_a_row_is_the_prompt_then_its_answer_with_nothing_between_for_any_tokenizer_flags(add_bos, add_eos, add_prefix_space,
                                                                                         lead, trailing, template, merges):
    """A tokenizer that adds EOS after every text ("add_eos_token": true) must not put it between a
    prompt and its answer, and SentencePiece's dummy prefix must not put a space there the text
    does not hold (an answer alone, or after a prompt that ends in a space). With no token
    spanning the seam the row is, id for id, the whole text as the tokenizer writes it (less what
    it puts after a text); with one, the row reads as that text, or the pair is dropped, said why."""
    from conftest import sentencepiece_style_tokenizer
    tokenizer = sentencepiece_style_tokenizer(add_bos, add_eos, add_prefix_space, merges, template)
    before, after = data.special_tokens_around(tokenizer)
    assert before == ((tokenizer.bos_token_id,) if add_bos else ()) and after == ((tokenizer.eos_token_id,) if add_eos else ())
    render = data.chat_renderer(tokenizer) if template else None
    read = lambda ids: tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    for pair in seam_pairs(render, lead == " "):
        pair = data.Pair(pair.prompt + trailing, pair.chosen, pair.rejected)
        item = data.tokenize_pair(pair, tokenizer, 256, 128)
        if item == data.SEAM_DROP:
            assert merges  # only where a token spans the seam
            continue
        assert item.prompt_ids.count(tokenizer.bos_token_id) == int(add_bos or template is not None)  # one BOS at most
        for answer, ids in ((pair.chosen, item.chosen_ids), (pair.rejected, item.rejected_ids)):
            assert ids[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in item.prompt_ids
            whole = data.prompt_token_ids(tokenizer, pair.prompt + answer)
            assert read(item.prompt_ids + ids[:-1]) == read(whole)
            if not merges:
                assert item.prompt_ids + ids[:-1] == whole


def test_a_prompt_cut_from_the_left_keeps_every_special_token_the_tokenizer_leads_it_with():
    """A tokenizer may lead a text with more than a BOS (GLM's "[gMASK] <sop>", BERT's "[CLS]"):
    a prompt cut to its last tokens keeps that whole lead, in training and in generation alike."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from conftest import sentencepiece_style_tokenizer
    base = sentencepiece_style_tokenizer(add_bos=False)
    backend = base.backend_tokenizer
    backend.add_special_tokens(["[gMASK]", "<sop>"])
    mask, sop = backend.token_to_id("[gMASK]"), backend.token_to_id("<sop>")
    backend.post_processor = processors.TemplateProcessing(single="[gMASK] <sop> $A", special_tokens=[("[gMASK]", mask),
                                                                                                    ("<sop>", sop)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="</s>")
    assert data.special_tokens_around(tokenizer) == ((mask, sop), ()) and tokenizer.bos_token_id is None
    pair = data.Pair(f"{H} A long question, with a great many words in it?{A}", " Yes.", " No.")
    item = data.tokenize_pair(pair, tokenizer, 40, 12)
    assert item.prompt_ids[:2] == [mask, sop] and len(item.prompt_ids) == 12
    assert item.prompt_ids == data.kept_prompt_ids(tokenizer, pair.prompt, 12)  # what generation reads


def test_gpt2s_rows_are_the_whole_text_as_its_bpe_writes_it_and_unchanged(tokenizer):
    """GPT-2's byte-level BPE adds no special token and has no dummy prefix: the row of every
    bundled pair is the whole text's tokens, so the measured seam changed nothing there."""
    for pair in data.load_pairs(data.BUNDLED_DATA)[:200]:
        item = data.tokenize_pair(pair, tokenizer, 10_000, 10_000)
        assert item.prompt_ids == tokenizer(pair.prompt).input_ids
        assert item.chosen_ids[:-1] == tokenizer(pair.chosen).input_ids  # the answer alone writes the same tokens
        assert item.prompt_ids + item.chosen_ids[:-1] == tokenizer(pair.prompt + pair.chosen).input_ids


def test_generation_prompts_are_the_training_prompts_ids_no_eos_after_them():
    """sampling.sample feeds the model the very prompt ids training scores from: its BOS once, and
    never the EOS a tokenizer with add_eos_token puts after a text (it would tell the model the
    dialogue is over before the answer it is asked for)."""
    import sampling
    from conftest import sentencepiece_style_tokenizer, tiny_llama
    tokenizer = sentencepiece_style_tokenizer(add_bos=True, add_eos=True)
    model = tiny_llama(vocab_size=len(tokenizer))
    prompts = [f"{H} Can you help?{A}", f"{H} A much longer question, is it not?{A}"]
    drawn = list(sampling.sample(model, tokenizer, prompts, max_new_tokens=3, temperature=0.0, batch_size=2))
    for answer in drawn:
        expected = data.kept_prompt_ids(tokenizer, prompts[answer.position], 64 - 3)
        assert answer.prompt_ids == expected and expected[-1] != tokenizer.eos_token_id and expected[0] == tokenizer.bos_token_id


def test_a_dated_chat_template_renders_the_same_text_on_any_day(monkeypatch):
    """Llama 3's templates write "Today Date: ..." through transformers' strftime_now: the run's
    token ids (and so its fingerprints) would change at midnight. Rendered as of one fixed date,
    measured as dated, and the same on two days; an undated template is measured as such."""
    import datetime

    from transformers.utils import chat_template_utils
    tokenizer = gpt2_tokenizer()
    tokenizer.chat_template = ("{{ 'Today Date: ' + strftime_now('%d %b %Y') + '\\n' }}{% for m in messages %}"
                               "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                               "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}")
    conversation = [{"role": "user", "content": "Hello?"}]
    rendered = []
    for day in (datetime.datetime(2026, 12, 3, 23, 59), datetime.datetime(2026, 12, 4, 0, 1)):
        class Clock(datetime.datetime):  # the machine's clock on that day
            @classmethod
            def now(cls, tz=None, day=day):
                return day
        monkeypatch.setattr(chat_template_utils, "datetime", Clock)
        assert tokenizer.apply_chat_template(conversation, tokenize=False).startswith(f"Today Date: {day:%d %b %Y}")
        rendered.append(data.chat_renderer(tokenizer)(conversation, True))
        assert chat_template_utils.datetime is Clock  # put back as it was
    assert rendered[0] == rendered[1] == f"Today Date: {data.TEMPLATE_DATE:%d %b %Y}\nuser: Hello?\nassistant:"
    assert data.template_is_dated(tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    assert not data.template_is_dated(tokenizer)
