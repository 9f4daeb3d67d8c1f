"""A run's report in one self-contained HTML file: what ran and how it learned, its validation
and test figures with their intervals, and DPO's implicit reward over the text of test pairs,
token by token.

    python report.py RUN_DIR                 # writes RUN_DIR/report.html
    python report.py RUN_DIR --pairs 9       # the 3 pairs ranked most confidently right, 3 wrong, 3 at random

The implicit reward of an answer (Eq. 5, without the beta log Z(x) that cancels in a margin)
is a sum over its tokens,

    r(x, y) = sum_t beta * (log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)),

which Rafailov, Hejna, Park & Finn 2024 ("From r to Q*: Your Language Model is Secretly a
Q-Function", arXiv 2404.12358) read as credit assignment over tokens. Each term here comes
from models.batch_logps, the path that trains and validates (dpo.SequenceLogps.tokens): the
policy is best.pt's adapters on, the reference the same network with them off.

Not here: how far the policy moved on its own samples (KL), and judge.py's answers side by
side (to come).
"""
from __future__ import annotations

import base64
import dataclasses
import html
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import checkpoints
import cli
import data
import dpo
import lora
import models
import settings


@dataclass
class Span:
    """A piece of an answer's text and the implicit reward of the tokens that make it."""
    text: str
    reward: float
    tokens: int


@dataclass
class ScoredPair:
    """One test pair with its answers' per-token implicit rewards."""
    index: int                # in the pairs held_out_pairs gives: the test split (an older run: validation)
    prompt: str
    chosen: list[Span]
    rejected: list[Span]
    chosen_reward: float      # r(x, y_w): the sum of the chosen answer's terms
    rejected_reward: float    # r(x, y_l)

    @property
    def margin(self) -> float:
        return self.chosen_reward - self.rejected_reward


# ---------------------------------------------------------------------------------------
# The per-token implicit reward, from the trainer's own scoring path
# ---------------------------------------------------------------------------------------

def response_terms(logps: dpo.SequenceLogps, batch: data.Batch) -> list[torch.Tensor]:
    """Each sequence's per-token log-probs, in the order of its response tokens (the scored
    targets of its row, row-major: the same order in either layout)."""
    return [logps.tokens[s][batch.target_mask[s]] for s in range(batch.target_mask.shape[0])]


@torch.no_grad()
def token_rewards(model, items: list[data.TokenizedPair], collate, beta: float,
                  batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """beta * (log pi - log pi_ref) for every response token of every pair: (chosen terms,
    rejected terms), each (len(answer ids),)."""
    model.eval()
    rewards = []
    for start in range(0, len(items), batch_size):
        index = list(range(start, min(start + batch_size, len(items))))
        batch = data.to_device(collate([items[i] for i in index], index), model.device)
        policy = response_terms(models.batch_logps(model, batch), batch)
        with lora.adapters_disabled(model):
            reference = response_terms(models.batch_logps(model, batch), batch)
        terms = [beta * (p.double() - r.double()) for p, r in zip(policy, reference)]  # (len(y),) each
        rewards += list(zip(terms[:len(index)], terms[len(index):]))  # chosen rows first, then rejected
    return rewards


def spans(tokenizer, ids: list[int], rewards: torch.Tensor) -> list[Span]:
    """The answer's tokens as text pieces with their rewards. A token that ends inside a
    character (byte-level BPE splits some UTF-8 characters) joins the next, rewards summed, so
    the pieces joined are tokenizer.decode(ids) exactly."""
    pieces, text, pending, pending_reward = [], "", 0, 0.0
    for i, reward in enumerate(rewards.tolist()):
        pending, pending_reward = pending + 1, pending_reward + reward
        decoded = tokenizer.decode(ids[:i + 1])
        if decoded.endswith("\ufffd") and i + 1 < len(ids) or not decoded.startswith(text):
            continue  # not a whole character yet (or a merge that rewrites the text before): wait
        pieces.append(Span(decoded[len(text):], pending_reward, pending))
        text, pending, pending_reward = decoded, 0, 0.0
    if pending:  # what never became a clean prefix: one piece
        pieces.append(Span(tokenizer.decode(ids)[len(text):], pending_reward, pending))
    return pieces


def score_pairs(checkpoint: dict, pairs: list[data.Pair]) -> list[ScoredPair]:
    """The pairs scored token by token with the checkpoint's policy and its reference."""
    config = settings.config_from_dict(checkpoint["config"])
    dtype = models.with_measured_dtype(config, torch.device("cpu"), 1, cli.say).dtype
    model, tokenizer = checkpoints.load_policy(checkpoint, dtype)
    items, kept = [], []
    for i, pair in enumerate(pairs):
        item = data.tokenize_pair(pair, tokenizer, config.max_length, config.max_prompt_length)
        if isinstance(item, data.TokenizedPair):
            items.append(item)
            kept.append(i)
    collate = models.collate_function(config, model, tokenizer.pad_token_id, cli.say)
    scored = []
    for i, item, (chosen, rejected) in zip(kept, items, token_rewards(model, items, collate, config.beta,
                                                                        config.batch_size)):
        scored.append(ScoredPair(i, pairs[i].prompt, spans(tokenizer, item.chosen_ids, chosen),
                                 spans(tokenizer, item.rejected_ids, rejected), chosen.sum().item(), rejected.sum().item()))
    return scored


def chosen_for_report(scored: list[ScoredPair], count: int, seed: int = 0) -> dict[str, list[ScoredPair]]:
    """The pairs ranked most confidently right (largest margin), most confidently wrong (most
    negative) and a few at random from the rest: count in all, a third each."""
    by_margin = sorted(scored, key=lambda pair: pair.margin)
    third = max(1, count // 3)
    right = by_margin[::-1][:third]
    wrong = [pair for pair in by_margin[:third] if pair.margin < 0]
    rest = [pair for pair in scored if pair not in right and pair not in wrong]
    return {"ranked most confidently right": right, "ranked most confidently wrong": wrong,
            "at random": random.Random(seed).sample(rest, min(len(rest), count - len(right) - len(wrong)))}


# ---------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------

STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; margin: 0 auto; max-width: 1200px; padding: 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { border: 1px solid #ccc; padding: 2px 8px; }
.pair { border: 1px solid #ddd; border-radius: 6px; padding: 0.5em 1em; margin: 1em 0; }
.answers { display: flex; gap: 1em; flex-wrap: wrap; } .answer { flex: 1 1 320px; }
.tok { white-space: pre-wrap; border-radius: 2px; } .legend span { padding: 0 6px; }
details summary { cursor: pointer; color: #555; } img { max-width: 100%; }
"""


def colour(reward: float, scale: float) -> str:
    """A diverging scale: green where the token raised the reward, red where it lowered it."""
    strength = min(1.0, abs(reward) / scale) if scale else 0.0
    hue = 130 if reward >= 0 else 0
    return f"hsl({hue}, 70%, {100 - 45 * strength:.0f}%)"


def answer_html(label: str, pieces: list[Span], reward: float, scale: float) -> str:
    tokens = "".join(f'<span class="tok" style="background:{colour(span.reward, scale)}" title="{span.reward:+.4f}">'
                     f"{html.escape(span.text)}</span>" for span in pieces)
    return f'<div class="answer"><b>{label}</b> (reward {reward:+.3f})<div>{tokens}</div></div>'


def pair_html(pair: ScoredPair, scale: float, split: str) -> str:
    prompt_end = pair.prompt[-300:]
    folded = (f"<details><summary>the prompt's start ({len(pair.prompt) - 300} characters)</summary>"
              f"<pre>{html.escape(pair.prompt[:-300])}</pre></details>" if len(pair.prompt) > 300 else "")
    verdict = "ranks it as people did" if pair.margin > 0 else "ranks it against people"
    return (f'<div class="pair" data-pair="{pair.index}"><p>{split} pair {pair.index}: margin {pair.margin:+.3f}, the model '
            f"{verdict}</p>{folded}<pre>{html.escape(prompt_end)}</pre><div class=\"answers\">"
            f"{answer_html('chosen (people preferred)', pair.chosen, pair.chosen_reward, scale)}"
            f"{answer_html('rejected', pair.rejected, pair.rejected_reward, scale)}</div></div>")


def figures_html(rows: list[dict]) -> str:
    val = [row for row in rows if row["split"] == "val"]
    lines = ["<table><tr><th>step</th><th>split</th><th>loss</th><th>reward accuracy (95% interval)</th><th>margin</th></tr>"]
    for row in val + [row for row in rows if row["split"] == "test"]:
        if "reward_accuracy" not in row:
            continue
        low, high = row.get("reward_accuracy_interval") or dpo.wilson_interval(round(row["reward_accuracy"] * row["n"]), row["n"])
        split = "test (best.pt)" if row["split"] == "test" else "validation"
        lines.append(f"<tr><td>{row['step']}</td><td>{split}</td><td>{row['loss']:.4f}</td>"
                     f"<td>{row['reward_accuracy']:.3f} [{low:.3f}, {high:.3f}]</td><td>{row['reward_margin']:.4f}</td></tr>")
    return "\n".join(lines) + "</table>"


def settings_html(config: settings.TrainConfig) -> str:
    defaults = settings.TrainConfig()
    changed = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
               if getattr(config, f.name) != getattr(defaults, f.name)}
    return "<table>" + "".join(f"<tr><td>--{name.replace('_', '-')}</td><td>{html.escape(str(value))}</td></tr>"
                               for name, value in changed.items()) + "</table>"


def write_report(run_dir: str | Path, pair_count: int = 9) -> Path:
    """RUN_DIR/report.html, from the run's files and its best.pt on its test pairs."""
    run_dir = Path(run_dir)
    best = checkpoints.load_checkpoint(str(run_dir / "best.pt"))
    config = settings.config_from_dict(best["config"])
    rows = checkpoints.read_log(run_dir / "metrics.jsonl")
    pairs = checkpoints.held_out_pairs(best, str(run_dir / "best.pt"))
    scored = score_pairs(best, pairs)
    scale = max((abs(span.reward) for pair in scored for span in pair.chosen + pair.rejected), default=1.0)
    split = "test" if config.test_size else "validation"  # an older run has no test split (held_out_pairs says so)
    sections = "".join(f"<h3>{html.escape(title)}</h3>" + "".join(pair_html(pair, scale, split) for pair in chosen)
                       for title, chosen in chosen_for_report(scored, pair_count).items())
    curves = run_dir / "curves.png"
    image = (f'<img alt="training curves" src="data:image/png;base64,{base64.b64encode(curves.read_bytes()).decode()}">'
             if curves.exists() else "")
    page = (f"<!doctype html><html><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, "
            f"initial-scale=1\"><title>DPO run report: {html.escape(str(run_dir))}</title><style>{STYLE}</style></head><body>"
            f"<h1>DPO run report</h1><p>{html.escape(str(run_dir))}: {html.escape(best['base_model'])}, data "
            f"{html.escape(config.data)}, best.pt at step {best['step']} of {max(row['step'] for row in rows)}.</p>"
            f"<h2>Settings that differ from the defaults</h2>{settings_html(config)}"
            f"<h2>How it learned</h2>{image}{figures_html(rows)}"
            f"<h2>The implicit reward, token by token, on {split} pairs</h2><p class=\"legend\">Each token coloured by "
            f"beta &middot; (log &pi; &minus; log &pi;<sub>ref</sub>): <span style=\"background:{colour(scale, scale)}\">"
            f"+{scale:.3f}</span> <span style=\"background:{colour(0, scale)}\">0</span> "
            f"<span style=\"background:{colour(-scale, scale)}\">&minus;{scale:.3f}</span>; an answer's reward is the "
            f"sum of its tokens'.</p>{sections}</body></html>")
    path = run_dir / "report.html"
    with checkpoints.writing(path):
        path.write_text(page, encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = cli.OneLineErrorParser(prog="report.py", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a train.py --checkpoint-dir (best.pt, metrics.jsonl)")
    parser.add_argument("--pairs", type=int, default=9, help="test pairs shown: a third most right, most wrong, random")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.run_dir, args.pairs)
    except (FileNotFoundError, ValueError, checkpoints.WriteFailed) as error:
        print(f"report.py: error: {error}", file=sys.stderr)
        return 1
    cli.say(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
