"""A run's report as one self-contained HTML page: what ran and how it learned, its validation
and test figures with their intervals, DPO's implicit reward over the text of test pairs,
token by token, how far the policy moved from its reference, and judge.py's answers and
verdicts side by side. train.py writes it at the end of a run; report.py makes it again.

The implicit reward of an answer (Eq. 5, without the beta log Z(x) that cancels in a margin)
is a sum over its tokens,

    r(x, y) = sum_t beta * (log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)),

which Rafailov, Hejna, Park & Finn 2024 ("From r to Q*: Your Language Model is Secretly a
Q-Function", arXiv 2404.12358) read as credit assignment over tokens. Each term here comes
from models.batch_logps, the path that trains and validates (dpo.SequenceLogps.tokens): the
policy is best.pt's adapters on, the reference the same network with them off.

How far the policy moved: the Monte-Carlo estimate of the KL divergence the paper puts on the
x-axis of its Figure 2, from answers y sampled from the policy itself,

    KL(pi || pi_ref)(x) = E_{y ~ pi(.|x)} [ log pi(y | x) - log pi_ref(y | x) ]
                        ~ (1/N) sum_i (log pi(y_i | x_i) - log pi_ref(y_i | x_i)),

per answer and per token; and the same log-ratio on the dataset's answers, which the policy
did not write (there it is r / beta, no KL).

Not here: the page's command line (report.py) or judging (judge.py, whose log this reads).
"""
from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import html
import random
from dataclasses import dataclass
from pathlib import Path

import torch

import checkpoints
import cli
import data
import dpo
import lora
import models
import sampling
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


@dataclass
class Drift:
    """Mean log pi - log pi_ref over some answers: per answer (the sum over its tokens) and per token."""
    answers: int
    tokens: int
    per_answer: float
    per_token: float

    @staticmethod
    def of(sums: list[float], token_counts: list[int]) -> "Drift":
        return Drift(len(sums), sum(token_counts), sum(sums) / max(1, len(sums)), sum(sums) / max(1, sum(token_counts)))


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
    rejected terms), each (len(answer ids),). beta = 1: the log-ratios themselves."""
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


@dataclass
class Scoring:
    """What the report scores with: best.pt's policy (adapters on; off: the reference), its
    tokenizer, its run's settings and batch layout."""
    model: torch.nn.Module
    tokenizer: object
    config: settings.TrainConfig
    collate: object

    @staticmethod
    def of(checkpoint: dict, policy: tuple | None = None, path: str = "the checkpoint") -> "Scoring":
        config = settings.config_from_dict(checkpoint["config"])
        if policy is None:
            dtype = models.with_measured_dtype(config, torch.device("cpu"), 1, cli.say).dtype
            policy = checkpoints.load_policy(checkpoint, dtype, path=path)
        model, tokenizer = policy
        return Scoring(model, tokenizer, config, models.collate_function(config, model, tokenizer.pad_token_id, lambda _: None))

    def tokenized(self, pairs: list[data.Pair]) -> tuple[list[data.TokenizedPair], list[int]]:
        """The pairs that keep a response token, as the run tokenized them, and their positions in pairs."""
        items, kept = [], []
        for i, pair in enumerate(pairs):
            item = data.tokenize_pair(pair, self.tokenizer, self.config.max_length, self.config.max_prompt_length)
            if isinstance(item, data.TokenizedPair):
                items.append(item)
                kept.append(i)
        return items, kept

    def score(self, pairs: list[data.Pair], items: list[data.TokenizedPair], kept: list[int]) -> list[ScoredPair]:
        scored = []
        for i, item, (chosen, rejected) in zip(kept, items, token_rewards(self.model, items, self.collate, self.config.beta,
                                                                            self.config.batch_size)):
            scored.append(ScoredPair(i, pairs[i].prompt, spans(self.tokenizer, item.chosen_ids, chosen),
                                     spans(self.tokenizer, item.rejected_ids, rejected), chosen.sum().item(),
                                     rejected.sum().item()))
        return scored

    def drift(self, answers: list[sampling.Sampled]) -> Drift:
        """log pi - log pi_ref on answers sampled from the policy, scored exactly as drawn: the
        prompt ids generation saw, then every token drawn (its stop token included); no cut to
        --max-length. So these rows may be longer than any the run's layout was measured on
        (models.probe_layout): one shared row a pair, past a sliding attention window, would
        score other log-probs than the model's own. They go as one row an answer, the model's
        own padding mask and positions (data.collate; the full output where the probe said
        so), which holds at any length; the one-token second answer of each item is not read."""
        items = [data.TokenizedPair(a.prompt_ids, a.answer_ids, a.answer_ids[:1]) for a in answers if a.answer_ids]
        own_rows = functools.partial(data.collate, pad_id=self.tokenizer.pad_token_id)
        terms = [chosen for chosen, _ in token_rewards(self.model, items, own_rows, 1.0, self.config.batch_size)]
        return Drift.of([t.sum().item() for t in terms], [len(t) for t in terms])

    def sample_and_drift(self, prompts: list[str], progress: bool = True) -> Drift:
        """The KL estimate from one answer per prompt drawn from the policy at temperature 1
        (adapters on, not merged: merging bf16 weights and back would round the reference)."""
        tokens = min(SAMPLE_TOKENS, self.model.config.max_position_embeddings // 2)  # a small model: half its context
        return self.drift(list(sampling.sample(self.model, self.tokenizer, prompts, tokens, 1.0,
                                                  desc="report's samples" if progress else None)))


def score_pairs(checkpoint: dict, pairs: list[data.Pair]) -> list[ScoredPair]:
    """The pairs scored token by token with the checkpoint's policy and its reference."""
    scoring = Scoring.of(checkpoint)
    return scoring.score(pairs, *scoring.tokenized(pairs))


def logged_rewards(rows: list[dict], items: list[data.TokenizedPair]) -> list[list[float]] | None:
    """[r(x, y_w), r(x, y_l)] of every test pair, as the run's end-of-run test score logged them,
    if they are of these very pairs (the same token ids); else None."""
    test = [row for row in rows if row["split"] == "test" and "pair_rewards" in row]
    if test and test[-1].get("pairs_sha256") == data.fingerprint(items) and len(test[-1]["pair_rewards"]) == len(items):
        return test[-1]["pair_rewards"]
    return None


def chosen_for_report(margins: list[float], count: int, seed: int = 0) -> dict[str, list[int]]:
    """Positions of the pairs ranked most confidently right (largest margin), most confidently
    wrong (most negative) and a few at random from the rest: count in all, a third each."""
    by_margin = sorted(range(len(margins)), key=lambda i: margins[i])
    third = max(1, count // 3)
    right = [i for i in by_margin[::-1][:third] if margins[i] > 0]
    wrong = [i for i in by_margin[:third] if margins[i] < 0]
    rest = [i for i in range(len(margins)) if i not in right and i not in wrong]
    return {"ranked most confidently right": right, "ranked most confidently wrong": wrong,
            "at random": random.Random(seed).sample(rest, max(0, min(len(rest), count - len(right) - len(wrong))))}


# ---------------------------------------------------------------------------------------
# judge.py's logs of this run
# ---------------------------------------------------------------------------------------

@dataclass
class JudgeLog:
    path: Path
    checkpoint: str                 # the file in the run folder it judged: best.pt or last.pt
    header: dict
    prompts: dict                   # prompt_id -> prompt
    answers: dict                   # (model, prompt_id) -> answer
    judgements: list[dict]
    summary: str | None             # what judge.py printed, trust line last; None if it never got to its end


def sha256_of(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def judge_logs(run_dir: Path, given: list[str]) -> list[JudgeLog]:
    """The judge.py logs of this run's checkpoints: those given, and any in the run folder or
    the working directory (judge.py's default --output). A log is this run's when its header's
    checkpoint hash is that of a checkpoint in the folder; a given log that is not is an error."""
    own = {sha256_of(path): path.name for path in sorted(run_dir.glob("*.pt"))}
    given_paths = {Path(p).resolve() for p in given}
    missing = [p for p in given if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"no judge.py log {missing[0]}")
    candidates = [Path(p) for p in given] + sorted(set(run_dir.glob("*.jsonl")) | {Path("judgements.jsonl")})
    logs, seen = [], set()
    for path in candidates:
        if not path.is_file() or path.resolve() in seen or path.name == "metrics.jsonl":
            continue
        seen.add(path.resolve())
        try:
            records = checkpoints.read_log(path, "judge.py", repair=False)  # judge.py may be appending to it now
        except ValueError:
            records = []
        header = records[0] if records and records[0].get("kind") == "header" else None
        if header is None or header.get("checkpoint_sha256") not in own:
            if path.resolve() in given_paths:
                raise ValueError(f"{path} is not a judge.py log of a checkpoint in {run_dir}")
            continue
        answers = [r for r in records if r.get("kind") == "answer"]
        logs.append(JudgeLog(path, own[header["checkpoint_sha256"]], header, {r["prompt_id"]: r["prompt"] for r in answers},
                             {(r["model"], r["prompt_id"]): r["answer"] for r in answers},
                             [r for r in records if r.get("kind") == "judgement"],
                             next((r["report"] for r in reversed(records) if r.get("kind") == "summary"), None)))
    return logs


# ---------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------

STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; margin: 0 auto; max-width: 1200px; padding: 0.5em 1em; color: #222; }
p { overflow-wrap: anywhere; } h1 { font-size: 1.5em; } h2 { font-size: 1.25em; margin-top: 1.5em; border-bottom: 1px solid #ddd; }
.wide { overflow-x: auto; } table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 2px 8px; vertical-align: top; text-align: left; }
.pair { border: 1px solid #ddd; border-radius: 6px; padding: 0.5em 1em; margin: 1em 0; }
.answers { display: flex; gap: 1em; flex-wrap: wrap; } .answer { flex: 1 1 300px; min-width: 0; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; } pre { white-space: pre-wrap; overflow-wrap: anywhere;
  background: #f6f6f6; padding: 0.4em; margin: 0.3em 0; font-size: 0.9em; }
.tok { border-radius: 2px; } .legend span { padding: 0 6px; } .right { color: #17692e; } .wrong { color: #a31515; }
details summary { cursor: pointer; color: #555; } img { max-width: 100%; height: auto; }
"""
# The browser may load nothing from anywhere: the page's own styles, and pictures written into it.
POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
PROMPT_SHOWN = 300  # characters of a prompt's end shown; the rest folds
SAMPLE_TOKENS = 128  # most tokens of an answer sampled for the KL estimate (judge.py's --max-new-tokens)


def colour(reward: float, scale: float) -> str:
    """A diverging scale: green where the token raised the reward, red where it lowered it."""
    strength = min(1.0, abs(reward) / scale) if scale else 0.0
    hue = 130 if reward >= 0 else 0
    return f"hsl({hue}, 70%, {100 - 45 * strength:.0f}%)"


def escaped(text: str) -> str:
    return html.escape(text, quote=True)


def prompt_html(prompt: str) -> str:
    """The prompt's end; a longer prompt's start folds away."""
    if len(prompt) <= PROMPT_SHOWN:
        return f"<pre>{escaped(prompt)}</pre>"
    return (f"<details><summary>the prompt's start ({len(prompt) - PROMPT_SHOWN} characters)</summary>"
            f"<pre>{escaped(prompt[:-PROMPT_SHOWN])}</pre></details><pre>{escaped(prompt[-PROMPT_SHOWN:])}</pre>")


def answer_html(label: str, side: str, pieces: list[Span], reward: float, scale: float) -> str:
    tokens = "".join(f'<span class="tok" style="background:{colour(span.reward, scale)}" title="{span.reward:+.4f}">'
                     f"{escaped(span.text)}</span>" for span in pieces)
    return (f'<div class="answer" data-side="{side}"><b>{label}</b>: reward {reward:+.3f}'
            f'<div class="text">{tokens}</div></div>')


def pair_html(pair: ScoredPair, scale: float, split: str) -> str:
    verdict = ('<span class="right">ranks it as people did</span>' if pair.margin > 0 else
               '<span class="wrong">ranks it against people</span>' if pair.margin < 0 else "ties it (counted as half right)")
    return (f'<div class="pair" data-pair="{pair.index}"><p>{split} pair {pair.index}: margin '
            f"r(x, y<sub>w</sub>) &minus; r(x, y<sub>l</sub>) = {pair.margin:+.3f}; the model {verdict}</p>"
            f"{prompt_html(pair.prompt)}<div class=\"answers\">"
            f"{answer_html('chosen (people preferred it)', 'chosen', pair.chosen, pair.chosen_reward, scale)}"
            f"{answer_html('rejected', 'rejected', pair.rejected, pair.rejected_reward, scale)}</div></div>")


def interval_of(row: dict) -> tuple[float, float]:
    return tuple(row.get("reward_accuracy_interval") or dpo.wilson_interval(round(row["reward_accuracy"] * row["n"]), row["n"]))


def figures_html(rows: list[dict]) -> str:
    lines = ['<div class="wide"><table><tr><th>step</th><th>split</th><th>pairs</th><th>loss</th>'
             "<th>reward accuracy [95% interval]</th><th>margin</th></tr>"]
    for row in rows:
        if row["split"] not in ("val", "test") or "reward_accuracy" not in row:
            continue
        low, high = interval_of(row)
        split = "test (best.pt; nothing was chosen on it)" if row["split"] == "test" else "validation"
        lines.append(f"<tr><td>{row['step']}</td><td>{split}</td><td>{row['n']}</td><td>{row['loss']:.4f}</td>"
                     f"<td>{row['reward_accuracy']:.3f} [{low:.3f}, {high:.3f}]</td><td>{row['reward_margin']:.4f}</td></tr>")
    return "\n".join(lines) + "</table></div>"


def run_html(run_dir: Path, best: dict, config: settings.TrainConfig, rows: list[dict]) -> str:
    sessions = [row for row in rows if row["split"] == "run"]
    defaults = settings.TrainConfig()
    changed = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
               if getattr(config, f.name) != getattr(defaults, f.name) and f.name not in ("resume", "progress")}
    if sessions:
        seconds = sum(row["seconds"] for row in sessions)
        time_line = (f"{seconds / 60:.1f} min of wall time ({seconds:.0f} s{f', in {len(sessions)} sessions' if len(sessions) > 1 else ''}); "
                     f"stopped: {escaped(sessions[-1]['stopped'])}")
    else:
        time_line = "wall time and why it stopped: not logged (a train.py from before Dec 2026)"
    settings_rows = "".join(f"<tr><td>--{name.replace('_', '-')}</td><td>{escaped(str(value))}</td></tr>"
                            for name, value in changed.items()) or "<tr><td>none</td><td></td></tr>"
    steps = max(row["step"] for row in rows)
    return (f"<p>{escaped(str(run_dir))}: model {escaped(best['base_model'])}, data {escaped(config.data)}; "
            f"{steps} steps, best.pt at step {best['step']} (lowest validation loss); {time_line}.</p>"
            f"<h3>Settings that differ from the defaults</h3><div class=\"wide\"><table>{settings_rows}</table></div>")


def drift_html(on_samples: tuple[str, Drift] | None, chosen: Drift, rejected: Drift, run_dir: Path) -> str:
    def row(what: str, drift: Drift) -> str:
        return (f"<tr><td>{what}</td><td>{drift.answers}</td><td>{drift.tokens}</td>"
                f"<td>{drift.per_answer:+.4f}</td><td>{drift.per_token:+.5f}</td></tr>")
    table = ["<div class=\"wide\"><table><tr><th>answers</th><th>how many</th><th>tokens</th>"
             "<th>log &pi; &minus; log &pi;<sub>ref</sub> per answer</th><th>per token</th></tr>"]
    if on_samples is not None:
        table.append(row(f"the policy's own samples ({escaped(on_samples[0])}): the KL estimate", on_samples[1]))
    table += [row("the dataset's chosen answers (r / &beta;)", chosen), row("the dataset's rejected answers", rejected)]
    note = ("" if on_samples is not None else
            f"<p>The KL estimate needs answers sampled from the policy, slow on a CPU, so this page has none: "
            f"<code>python report.py {escaped(str(run_dir))} --samples 8</code> samples 8.</p>")
    note += ("<p>judge.py's answers are not used for it: they are sampled at its --temperature (0.7 by default), "
             "from a sharpened &pi;, not from &pi;, and kept as text cut at the turn's end, not as the tokens drawn.</p>")
    return ("<p>On the policy's own answers the mean of log &pi; &minus; log &pi;<sub>ref</sub> estimates "
            "KL(&pi; || &pi;<sub>ref</sub>), the x-axis of the paper's Figure 2: how far DPO moved the model from its "
            "reference to earn its reward. On the dataset's answers it is the implicit reward over &beta;.</p>"
            + "".join(table) + "</table></div>" + note)


def probability(value: float | None) -> str:
    return "n/a (identical answers)" if value is None else f"{value:.3f}"


def judge_html(log: JudgeLog, names: list[str]) -> str:
    """Each prompt's answers side by side with their lengths, and the verdicts on them in both orders."""
    verdicts = {}
    for record in log.judgements:
        if "_vs_" in record["comparison"]:  # models' answers; the sanity pairs and controls are the dataset's, for trust
            verdicts.setdefault(record["prompt_id"], []).append(record)
    parts = [f"<h3>{escaped(log.path.name)}: answers of {escaped(log.checkpoint)}'s models, judge "
             f"{escaped(str(log.header.get('judge_model')))}, sampled at temperature {log.header.get('temperature')}</h3>"]
    for prompt_id, prompt in sorted(log.prompts.items()):
        answers = "".join(f'<div class="answer" data-model="{escaped(name)}"><b>{escaped(name)}</b> '
                          f"({len(log.answers[(name, prompt_id)].strip())} characters)"
                          f'<div class="text">{escaped(log.answers[(name, prompt_id)])}</div></div>'
                          for name in names if (name, prompt_id) in log.answers)
        rows = "".join(f"<tr><td>{escaped(r['comparison'])}</td><td>{probability(r['p_a_x_first'])}</td>"
                       f"<td>{probability(r['p_b_x_second'])}</td><td>{r['preference']:.3f}</td>"
                       f"<td>{escaped(r['outcome'])}</td></tr>" for r in verdicts.get(prompt_id, []))
        parts.append(f'<div class="pair" data-prompt="{prompt_id}"><p>prompt {prompt_id}</p>{prompt_html(prompt)}'
                     f'<div class="answers">{answers}</div><div class="wide"><table><tr><th>comparison (X vs Y)</th>'
                     f"<th>p(A) with X shown first</th><th>p(B) with X shown second</th><th>pref(X over Y)</th>"
                     f"<th>outcome for X</th></tr>{rows}</table></div></div>")
    summary = log.summary or "judge.py did not get to its end: its summary is missing (run it again with --resume)"
    parts.append(f"<p>What judge.py printed, its trust line last:</p><pre>{escaped(summary)}</pre>")
    return "".join(parts)


def curves_html(run_dir: Path) -> str:
    curves = run_dir / "curves.png"
    if not curves.exists():
        return "<p>curves.png is missing.</p>"
    return f'<img alt="training curves" src="data:image/png;base64,{base64.b64encode(curves.read_bytes()).decode()}">'


def write_report(run_dir: str | Path, pair_count: int = 9, samples: int = 0, judge_log_paths: list[str] = (),
                 policy: tuple | None = None, say=cli.say) -> Path:
    """RUN_DIR/report.html, from the run's files and its best.pt on its test pairs. policy:
    (model, tokenizer) with best.pt's adapters on, if the caller holds it (train.py); else loaded.
    samples: answers to sample from the policy for the KL estimate (0: none, said on the page)."""
    run_dir = Path(run_dir)
    best_path = run_dir / "best.pt"
    best = checkpoints.load_checkpoint(str(best_path))
    config = settings.config_from_dict(best["config"])
    if config.loss_type != "sigmoid":  # sft: no reward; ipo: ranks by per-token means, not Eq. 5's sums
        raise ValueError(f"{best_path} is of a --loss-type {config.loss_type} run: the report shows DPO's implicit "
                         f"reward, a sum over tokens (--loss-type sigmoid)")
    rows = checkpoints.read_log(run_dir / "metrics.jsonl")
    logs = judge_logs(run_dir, list(judge_log_paths))
    pairs = checkpoints.held_out_pairs(best, str(best_path))
    split = "test" if config.test_size else "validation"  # an older run has no test split (held_out_pairs says so)
    if config.data == data.HUB_DATASET and models.hub_unreachable_reason() is not None:  # held_out_pairs said so
        split = "bundled test"  # HH-RLHF test-split pairs, standing in for the Hub's, which cannot be reached
    scoring = Scoring.of(best, policy, str(best_path))
    items, kept = scoring.tokenized(pairs)
    rewards = logged_rewards(rows, items)
    if rewards is None:  # an older run, or pairs other than the run's: all scored here
        say(f"report: scoring all {len(items)} {split} pairs (the run's log has no per-pair rewards of these pairs)")
        scored = scoring.score(pairs, items, kept)
        rewards = [[pair.chosen_reward, pair.rejected_reward] for pair in scored]
    picked = chosen_for_report([c - r for c, r in rewards], pair_count)
    shown = sorted({i for positions in picked.values() for i in positions})
    by_position = dict(zip(shown, scoring.score(pairs, [items[i] for i in shown], [kept[i] for i in shown])))
    scale = max((abs(span.reward) for pair in by_position.values() for span in pair.chosen + pair.rejected), default=1.0)
    sections = "".join(f"<h3>{escaped(title)} ({len(positions)})</h3>" +
                       "".join(pair_html(by_position[i], scale, split) for i in positions)
                       for title, positions in picked.items())
    chosen_drift = Drift.of([c / config.beta for c, _ in rewards], [len(item.chosen_ids) for item in items])
    rejected_drift = Drift.of([r / config.beta for _, r in rewards], [len(item.rejected_ids) for item in items])
    on_samples = None
    if samples:
        drift = scoring.sample_and_drift([pair.prompt for pair in pairs[:samples]])
        on_samples = (f"{drift.answers} answers sampled here at temperature 1, one for each of the first "
                      f"{min(samples, len(pairs))} {split} prompts", drift)
    judged = "".join(judge_html(log, ["base", "sft", "dpo"]) for log in logs) or (
        "<p>No judge.py log of this run's checkpoints (in the run folder or ./judgements.jsonl): "
        f"<code>python judge.py {escaped(str(best_path))} --output {escaped(str(run_dir / 'judgements.jsonl'))}</code>, "
        "then this report again.</p>")
    legend = (f"<p class=\"legend\">Each token coloured by &beta; &middot; (log &pi; &minus; log &pi;<sub>ref</sub>), "
              f"its share of the answer's reward r(x, y): <span style=\"background:{colour(scale, scale)}\">+{scale:.3f}</span>"
              f"<span style=\"background:{colour(0, scale)}\">0</span><span style=\"background:{colour(-scale, scale)}\">"
              f"&minus;{scale:.3f}</span> (hover a token for its value). An answer's reward is the sum of its tokens'; "
              f"the model ranks a pair as people did when the chosen answer's is the higher.</p>")
    page = (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{POLICY}\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>DPO run report: {escaped(str(run_dir))}</title><style>{STYLE}</style></head><body>"
            f"<h1>DPO run report</h1>{run_html(run_dir, best, config, rows)}"
            f"<h2 id=\"learned\">How it learned</h2>{curves_html(run_dir)}{figures_html(rows)}"
            f"<h2 id=\"tokens\">The implicit reward, token by token, on {split} pairs</h2>{legend}{sections}"
            f"<h2 id=\"kl\">How far the policy moved from its reference</h2>{drift_html(on_samples, chosen_drift, rejected_drift, run_dir)}"
            f"<h2 id=\"judge\">judge.py's answers and verdicts</h2>{judged}</body></html>")
    path = run_dir / "report.html"
    with checkpoints.writing(path):
        path.write_text(page, encoding="utf-8")
    return path
