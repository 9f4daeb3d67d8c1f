"""The run report: the per-token implicit reward comes from the trainer's own numbers, the text
pieces are the answer's text, the KL estimate is the policy's distance from its reference, judge.py's
log shows as it printed, and a real browser renders one self-contained page that fetches nothing."""
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import checkpoints
import data
import judge
import lora
import models
import report
import report_page
import sampling
import train
from conftest import gpt2_tokenizer
from settings import config_from_dict
from stand_in_judges import longer_is_better
from test_train import synthetic_rows, tiny_config, write_jsonl


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_gpt2_dir):
    """A finished tiny run: train.py wrote its report.html at the end."""
    folder = tmp_path_factory.mktemp("report-run")
    data_file = write_jsonl(folder / "d.jsonl", synthetic_rows(24))
    train.train(tiny_config(data_file, tiny_gpt2_dir, folder / "run", epochs=2, test_size=6))
    return folder / "run"


@pytest.fixture(scope="module")
def scoring(run_dir):
    best = checkpoints.load_checkpoint(str(run_dir / "best.pt"))
    return report_page.Scoring.of(best), checkpoints.held_out_pairs(best, "best.pt")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.sampled_from(list("ab é€🙂\n,.")), min_size=1, max_size=30), st.integers(0, 2**31 - 1))
def test_the_coloured_pieces_joined_are_the_answers_text_and_keep_every_tokens_reward(tokenizer, text, seed):
    """Byte-level BPE splits some characters over tokens: such tokens join one piece, rewards summed."""
    ids = tokenizer(text).input_ids
    rewards = torch.randn(len(ids), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    pieces = report_page.spans(tokenizer, ids, rewards)
    assert "".join(piece.text for piece in pieces) == tokenizer.decode(ids)
    assert sum(piece.tokens for piece in pieces) == len(ids)
    assert sum(piece.reward for piece in pieces) == pytest.approx(rewards.sum().item(), abs=1e-9)


def validation_rewards(best, pairs):
    """The rewards train.compute_loss gives the pairs: what validation and the test score compute."""
    config = config_from_dict(best["config"])
    model, tokenizer = checkpoints.load_policy(best)
    items = [data.tokenize_pair(pair, tokenizer, config.max_length, config.max_prompt_length) for pair in pairs]
    collate = models.collate_function(config, model, tokenizer.pad_token_id, lambda _: None)
    with torch.no_grad():
        result = train.compute_loss(model, collate(items, list(range(len(items)))), train.ReferenceCache(len(items)), config)
    return result.chosen_rewards, result.rejected_rewards


def test_per_token_rewards_sum_to_the_rewards_validation_computes(run_dir):
    best = checkpoints.load_checkpoint(str(run_dir / "best.pt"))
    pairs = checkpoints.held_out_pairs(best, "best.pt")
    scored = report_page.score_pairs(best, pairs)
    chosen, rejected = validation_rewards(best, pairs)
    assert [pair.index for pair in scored] == list(range(len(pairs)))
    torch.testing.assert_close(torch.tensor([pair.chosen_reward for pair in scored]), chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor([pair.rejected_reward for pair in scored]), rejected, rtol=1e-5, atol=1e-5)
    for pair in scored:  # and the pieces shown add up to the answer's reward
        assert sum(span.reward for span in pair.chosen) == pytest.approx(pair.chosen_reward, abs=1e-9)


def test_the_end_of_run_test_score_logs_every_test_pairs_rewards_the_report_picks_by(run_dir):
    """The report picks its pairs from the test row, not a second pass: those rewards are validation's."""
    best = checkpoints.load_checkpoint(str(run_dir / "best.pt"))
    rows = checkpoints.read_log(run_dir / "metrics.jsonl")
    test_row = next(row for row in rows if row["split"] == "test")
    chosen, rejected = validation_rewards(best, checkpoints.held_out_pairs(best, "best.pt"))
    torch.testing.assert_close(torch.tensor(test_row["pair_rewards"]), torch.stack([chosen, rejected], -1),
                               rtol=1e-4, atol=1e-5)
    run_row = rows[-1]  # and the run's wall time and why it stopped
    assert run_row["split"] == "run" and run_row["seconds"] > 0
    assert run_row["stopped"] == f"all 2 epoch(s) done ({run_row['step']} steps)" and run_row["step"] == rows[-3]["step"]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(st.integers(0, 999), min_size=1, max_size=12), min_size=1, max_size=4), st.integers(0, 5))
def test_the_kl_estimate_is_zero_with_the_adapters_off_and_not_with_them_on(scoring, answers, first):
    """Any answers, as token ids after a test prompt's ids: the policy's log-ratio to itself is 0."""
    (scoring, pairs) = scoring
    items, _ = scoring.tokenized(pairs)
    sampled = [sampling.Sampled(i, items[(first + i) % len(items)].prompt_ids, ids) for i, ids in enumerate(answers)]
    with lora.adapters_disabled(scoring.model):  # the policy is its reference
        off = scoring.drift(sampled)
    assert off.answers == len(answers) and off.tokens == sum(map(len, answers))  # every token drawn, none cut
    assert off.per_answer == 0.0 and off.per_token == 0.0
    on = scoring.drift(sampled)  # best.pt's adapters moved the model
    assert on.tokens == off.tokens and on.per_answer != 0.0
    assert on.per_token == pytest.approx(on.per_answer * on.answers / on.tokens)


def test_the_kl_estimate_scores_the_tokens_the_policy_drew_up_to_its_stop(scoring):
    (scoring, pairs) = scoring
    prompts = [pair.prompt for pair in pairs[:3]]
    drawn = list(sampling.sample(scoring.model, scoring.tokenizer, prompts, 10, 1.0))
    _, stop_ids = sampling.stop_ids_of(scoring.tokenizer)
    texts = [answer for _, answer in sampling.generate_answers(scoring.model, scoring.tokenizer, prompts, 10, 1.0)]
    for answer, text in zip(drawn, texts):  # the same draw (seed per batch) as the text judge.py logs
        assert 1 <= len(answer.answer_ids) <= 10 and not any(token in stop_ids for token in answer.answer_ids[:-1])
        assert text == data.plain_answer(scoring.tokenizer.decode(sampling.cut_at_eos(answer.answer_ids, stop_ids),
                                                                  skip_special_tokens=True), "")
    drift = scoring.drift(drawn)
    assert drift.answers == 3 and drift.tokens == sum(len(answer.answer_ids) for answer in drawn)


def test_the_kl_estimate_is_the_models_own_log_ratio_on_samples_longer_than_any_the_layout_was_probed_on():
    """The run's layout is probed at --max-length (10 here), where one shared row a pair is exact
    for a model whose local attention window (12) is longer; sampled answers run past it, where a
    shared row loses the window (transformers passes a 4-D mask through). The estimate must be
    the model's own log pi - log pi_ref, from its plain forward, at any length."""
    import types

    from conftest import tiny_gemma3
    model = tiny_gemma3(sliding_window=12)
    lora.add_lora(model, lora.LoRAConfig(r=4))
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            layer.lora_B.normal_(std=0.2, generator=torch.Generator().manual_seed(1))
    config = train.TrainConfig(max_length=10, max_prompt_length=4, batch_size=2, dtype="float32")
    collate = models.collate_function(config, model, 0, lambda _: None)
    assert collate.func is data.collate_shared  # what the run trains and validates with
    scoring = report_page.Scoring(model, types.SimpleNamespace(pad_token_id=0), config, collate)
    ids = torch.randint(1, 64, (60,), generator=torch.Generator().manual_seed(0)).tolist()
    drawn = [sampling.Sampled(0, ids[:6], ids[6:36]), sampling.Sampled(1, ids[36:44], ids[44:60])]

    def own(answer) -> float:
        row = torch.tensor([answer.prompt_ids + answer.answer_ids])
        logps = torch.log_softmax(model(row).logits[0, :-1].double(), -1)[torch.arange(row.shape[1] - 1), row[0, 1:]]
        return logps[len(answer.prompt_ids) - 1:].sum().item()
    with torch.no_grad():
        policy = [own(answer) for answer in drawn]
        with lora.adapters_disabled(model):
            reference = [own(answer) for answer in drawn]
    expected = sum(p - r for p, r in zip(policy, reference)) / len(drawn)
    assert scoring.drift(drawn).per_answer == pytest.approx(expected, abs=1e-4)


class Rendered(HTMLParser):
    """The rendered DOM's pairs: {pair index: {side: the text of its token spans, joined}}."""

    def __init__(self):
        super().__init__()
        self.pairs, self.stack, self.pair, self.side, self.in_token = {}, [], None, None, 0
        self.sources = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.sources += [value for name, value in attrs.items() if name in ("src", "href", "srcset", "poster")]
        if "data-pair" in attrs:
            self.pair = int(attrs["data-pair"])
            self.pairs[self.pair] = {}
        if "data-side" in attrs and self.pair is not None:
            self.side = attrs["data-side"]
            self.pairs[self.pair][self.side] = []
        if tag == "span" and attrs.get("class") == "tok":
            self.in_token += 1

    def handle_endtag(self, tag):
        if tag == "span" and self.in_token:
            self.in_token -= 1

    def handle_data(self, text):
        if self.in_token and self.pair is not None and self.side:
            self.pairs[self.pair][self.side].append(text)


def browser() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    assert found, "no Chromium: the README's test setup installs Debian's (apt-get install -y chromium)"
    return found


QUIET = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-default-apps", "--no-first-run", "--disable-extensions"]


def render(page, tmp_path) -> tuple[str, list[str]]:
    """The DOM Chromium renders from a file, and the addresses it fetched for the page (its net
    log's requests made in the page's file:// context, not the browser's own)."""
    net_log = tmp_path / f"{page.stem}-net.json"
    dom = subprocess.run([browser(), *QUIET, f"--log-net-log={net_log}", "--dump-dom", page.resolve().as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    log = json.loads(net_log.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    fetched = [event["params"]["url"] for event in log["events"] if event["type"] == start
               and event.get("params", {}).get("network_isolation_key", "").startswith("file://")]
    return dom, fetched


def test_a_real_browser_renders_every_pairs_tokens_as_the_answers_text_and_fetches_nothing(run_dir, scoring, tmp_path):
    control = tmp_path / "control.html"  # the check can fail: a page that does fetch
    control.write_text('<img src="http://203.0.113.9/a.png"><link rel="stylesheet" href="https://example.invalid/s.css">')
    assert sorted(render(control, tmp_path)[1]) == ["http://203.0.113.9/a.png", "https://example.invalid/s.css"]

    page = run_dir / "report.html"  # as train.py wrote it at the end of the run
    dom, fetched = render(page, tmp_path)
    assert fetched == [] and "DPO run report" in dom
    parsed = Rendered()
    parsed.feed(dom)
    assert all(source.startswith("data:") for source in parsed.sources) and parsed.sources  # the curves, inline
    (scoring, pairs) = scoring
    items, kept = scoring.tokenized(pairs)
    assert len(parsed.pairs) == len(re.findall(r'data-pair="', page.read_text())) == min(9, len(items))  # all 6 here
    for index, sides in parsed.pairs.items():
        item = items[kept.index(index)]
        assert "".join(sides["chosen"]) == scoring.tokenizer.decode(item.chosen_ids)
        assert "".join(sides["rejected"]) == scoring.tokenizer.decode(item.rejected_ids)


def test_judge_logs_show_side_by_side_with_the_verdicts_and_the_trust_line_judge_printed(run_dir, tmp_path):
    log = run_dir / "judgements.jsonl"
    results = judge.evaluate(judge.JudgeConfig(str(run_dir / "best.pt"), num_test_questions=2, sanity=2, max_new_tokens=6,
                                               output=str(log)), judge=longer_is_better)
    path = report_page.write_report(run_dir, pair_count=3)
    page = path.read_text()
    records = checkpoints.read_log(log)
    answers = [r for r in records if r["kind"] == "answer"]
    for record in answers:  # every answer, with its length
        assert f'data-model="{record["model"]}"' in page and f"({len(record['answer'].strip())} characters)" in page
    assert len(re.findall(r'data-prompt="\d+"', page)) == 2
    assert page.count("<tr><td>dpo_vs_base</td>") == page.count("<tr><td>dpo_vs_dataset</td>") == 2
    trust = judge.report(results).splitlines()[-1]
    assert trust.startswith("Trust: ") and trust.replace("'", "&#x27;") in page
    assert not any(f"<tr><td>{name}</td>" in page for name in [*judge.CONTROLS, "sanity"])  # the dataset's, not the models'
    assert any(r["kind"] == "judgement" and r["comparison"] in judge.CONTROLS for r in records)
    assert "judge.py's answers are not used for it" in page  # sampled at 0.7, not from the policy itself
    assert report.main([str(run_dir), "--pairs", "3", "--samples", "2"]) == 0
    assert "the policy's own samples (2 answers sampled here at temperature 1" in path.read_text()  # the KL estimate
    log.unlink()  # another run's log given by hand is refused in one line
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"kind": "header", "checkpoint_sha256": "0" * 64}) + "\n")
    assert report.main([str(run_dir), "--judge-log", str(other)]) == 1


def test_an_older_run_without_per_pair_rewards_is_scored_whole_and_a_missing_folder_is_one_line(run_dir, tmp_path, capsys):
    rows = checkpoints.read_log(run_dir / "metrics.jsonl")
    older = tmp_path / "older"
    older.mkdir()
    for name in ("best.pt", "curves.png"):
        shutil.copy(run_dir / name, older / name)
    (older / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in row.items() if k != "pair_rewards"}) + "\n"
                                                 for row in rows if row["split"] != "run"))
    messages = []
    page = report_page.write_report(older, pair_count=3, say=messages.append).read_text()
    assert messages == ["report: scoring all 6 test pairs (the run's log has no per-pair rewards of these pairs)"]
    assert "not logged (a train.py from before Dec 2026)" in page and 'data-pair="' in page
    assert report.main([str(tmp_path / "absent")]) == 1
    assert capsys.readouterr().err.startswith("report.py: error: ")
