"""report.py: the per-token implicit reward comes from the trainer's own numbers, the text
pieces are the answer's text, and the page is one self-contained file."""
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import checkpoints
import data
import models
import report
import train
from conftest import gpt2_tokenizer
from settings import config_from_dict
from test_train import synthetic_rows, tiny_config, write_jsonl


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_gpt2_dir):
    folder = tmp_path_factory.mktemp("report-run")
    data_file = write_jsonl(folder / "d.jsonl", synthetic_rows(24))
    train.train(tiny_config(data_file, tiny_gpt2_dir, folder / "run", epochs=2, test_size=6))
    return folder / "run"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.sampled_from(list("ab é€🙂\n,.")), min_size=1, max_size=30), st.integers(0, 2**31 - 1))
def test_the_coloured_pieces_joined_are_the_answers_text_and_keep_every_tokens_reward(tokenizer, text, seed):
    """Byte-level BPE splits some characters over tokens: such tokens join one piece, rewards summed."""
    ids = tokenizer(text).input_ids
    rewards = torch.randn(len(ids), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    pieces = report.spans(tokenizer, ids, rewards)
    assert "".join(piece.text for piece in pieces) == tokenizer.decode(ids)
    assert sum(piece.tokens for piece in pieces) == len(ids)
    assert sum(piece.reward for piece in pieces) == pytest.approx(rewards.sum().item(), abs=1e-9)


def test_per_token_rewards_sum_to_the_rewards_validation_computes(run_dir):
    best = checkpoints.load_checkpoint(str(run_dir / "best.pt"))
    pairs = checkpoints.held_out_pairs(best, "best.pt")
    scored = report.score_pairs(best, pairs)
    config = config_from_dict(best["config"])
    model, tokenizer = checkpoints.load_policy(best)
    items = [data.tokenize_pair(pair, tokenizer, config.max_length, config.max_prompt_length) for pair in pairs]
    collate = models.collate_function(config, model, tokenizer.pad_token_id, lambda _: None)
    with torch.no_grad():
        result = train.compute_loss(model, collate(items, list(range(len(items)))), train.ReferenceCache(len(items)), config)
    assert [pair.index for pair in scored] == list(range(len(items)))
    chosen = torch.tensor([pair.chosen_reward for pair in scored])
    rejected = torch.tensor([pair.rejected_reward for pair in scored])
    torch.testing.assert_close(chosen, result.chosen_rewards, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rejected, result.rejected_rewards, rtol=1e-5, atol=1e-5)
    for pair in scored:  # and the pieces shown add up to the answer's reward
        assert sum(span.reward for span in pair.chosen) == pytest.approx(pair.chosen_reward, abs=1e-9)


def test_the_report_is_one_file_that_fetches_nothing_and_shows_every_chosen_pair(run_dir):
    path = report.write_report(run_dir, pair_count=6)
    page = path.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # styles and the curves inline
    assert 'src="data:image/png;base64,' in page
    assert len(re.findall(r'data-pair="\d+"', page)) >= 2 and 'class="tok"' in page
    assert "test (best.pt)" in page  # the test figure, labelled by its split
