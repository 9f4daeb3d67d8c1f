"""Win rates of a DPO checkpoint, judged pairwise by a local LLM through llama.cpp.

    python judge.py checkpoints/best.pt --num-test-questions 50 --sanity 100
    python judge.py checkpoints/best.pt --judge-model judge.gguf   # any local GGUF judge

Three steps, as in the DPO paper's evaluation (Rafailov et al. 2023, arXiv 2305.18290,
Section 6), with a small local judge in the place of GPT-4:

  1. Answers. On the run's test prompts (nothing trained or was chosen on them), the base
     model, then (with the checkpoint's adapters added to that same network: no second
     copy) the DPO model (adapters merged
     into the weights) each sample one answer; after an SFT stage, the SFT model too (DPO's
     reference: adapters off), as the paper compares DPO with it.
  2. Verdicts. The judge reads the conversation and two answers, A and B, and we read its
     next-token probabilities of "A" and "B" (one forward pass, no text parsing),
     renormalised over the two:
         p(A) = exp(l_A) / (exp(l_A) + exp(l_B))
     LLM judges favour a position (Zheng et al. 2023, "Judging LLM-as-a-Judge",
     arXiv 2306.05685, Section 3.3), so every pair is judged in both orders and averaged:
         pref(X over Y) = (p_A(X shown first) + p_B(X shown second)) / 2
     A constant pull towards A cancels; identical answers get exactly 0.5 without asking.
  3. Win rates. A pair is a tie when |pref - 0.5| <= tie margin, else a win or a loss for X.
     The win rate is wins / (wins + losses) with a 95% Wilson score interval.

The judge states its own trust. It also judges --controls pairs whose right answer is not in
doubt (an answer against another conversation's, against its own words shuffled or cut, against
itself written twice), and --sanity human-labelled test pairs. The last line decides from the
controls: a judge not shown to pick the right answer there, or pulled to one position, is not
reading the answers, and its win rates are no evidence. Agreement with people is printed beside,
with what judges reach on the same set: on HH-RLHF harmless-base even GPT-4o agrees with the
labels about half the time, so that agreement cannot tell a good judge from a coin. With
--controls 0 it decides, as before: no evidence when its interval holds 50%.

Every answer and verdict is appended to a JSONL log as it is made, after a header with what
they depend on, so --resume loses nothing and never mixes two runs. The judge runs in a child
process (llama_judge.py): llama.cpp is native code, and when it dies it takes its process
with it, silently; from a child its death becomes one line here, and the log keeps every verdict.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import random
import sys
import unicodedata
from dataclasses import asdict, dataclass

from tqdm import tqdm

import checkpoints
import cli
import data
import lora
import models
import settings
from dpo import wilson_interval  # how sure a measured share is: a win rate here, reward accuracy in train.py
from llama_judge import Judge, JudgeDied, JudgeProcess, LlamaJudge  # Judge: LlamaJudge, or any function (tests)
from sampling import generate_answers  # the answers judged: batched, seeded per batch

JUDGE_REPO = "TheBloke/Llama-2-7b-Chat-GGUF"  # the seed's judge, on the Hugging Face Hub...
JUDGE_FILE = "llama-2-7b-chat.Q4_K_M.gguf"     # ...as a 4-bit GGUF file (4.1 GB)


@dataclass
class JudgeConfig:
    checkpoint: str                    # checkpoint .pt written by train.py
    # answers
    num_test_questions: int = 5        # the run's test prompts answered by every model (base, SFT, DPO) and judged
    max_new_tokens: int = 128          # most tokens per answer (an answer ends earlier at EOS)
    temperature: float = 0.7           # sampling temperature of the answers; 0 = greedy
    seed: int = 0                      # sampling seed: batch k samples under (seed, k), the same for every model
    batch_size: int = 8                # prompts generated together, left-padded
    # judge
    judge_model: str = ""              # GGUF file of the judge; empty = the seed's Llama-2-7b-chat from the Hub (offline: Gemma 3 270M, at chance)
    judge_context: int = 4096          # judge context window in tokens (llama.cpp n_ctx)
    judge_threads: int = 0             # CPU threads of the judge; 0 = half the cores (more than are free is much slower)
    judge_max_chars: int = 2000        # characters the judge sees of the dialogue (its end) and of each answer (its start)
    tie_margin: float = 0.05           # a pair is a tie when |pref - 0.5| <= this
    # 25 sanity pairs: a 95% interval of +-18 points around 50%, so a judge at chance is exposed and one that
    # agrees on 18 of 25 (72%) is shown better than a coin, for 50 judge calls (2.5x those of 5 questions).
    sanity: int = 25                   # also judge this many human-labelled test pairs: agreement with people; 0 = skip
    # Controls: pairs whose right answer is not in doubt (an answer against another conversation's, its words
    # shuffled, cut, written twice), built from the test pairs. 12 of each: a judge that reads gets 12 of 12 and an
    # interval [76%, 100%]; a coin's holds 50%. 4 x 12 pairs, 96 judge calls.
    controls: int = 12                 # judge this many pairs of each control; the trust line decides from them; 0 = skip
    # log
    output: str = "judgements.jsonl"  # JSONL log of every answer and verdict, written as made
    resume: bool = False               # continue --output, skipping what it holds (otherwise it starts afresh)
    verbose: bool = False              # also show llama.cpp's and transformers' own log lines
    progress: bool = True              # show progress bars

    def __post_init__(self):
        if min(self.num_test_questions, self.sanity, self.controls) < 0 or \
                self.num_test_questions + self.sanity + self.controls == 0:
            raise ValueError("num_test_questions, sanity and controls must be >= 0, and not all 0")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {self.max_new_tokens}, {self.batch_size}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 <= self.tie_margin < 0.5:
            raise ValueError(f"tie_margin must be in [0, 0.5), got {self.tie_margin}")
        if self.judge_context < 64 or self.judge_max_chars < 1 or self.judge_threads < 0:
            raise ValueError(f"judge_context must be >= 64, judge_max_chars >= 1 and judge_threads >= 0, "
                             f"got {self.judge_context}, {self.judge_max_chars}, {self.judge_threads}")


# ---------------------------------------------------------------------------------------
# 1. Answers: sampling.generate_answers, logged as made (JudgementLog, below)
# ---------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------
# 2. Verdicts
# ---------------------------------------------------------------------------------------

def judge_model_file(judge_model: str) -> str:
    """The judge's GGUF file: --judge-model if given; else the seed's judge, downloaded once from
    the Hub; else, when the Hub cannot be reached, the bundled Gemma 3 270M, saying in one line
    what its verdicts are worth."""
    if not judge_model:
        reason = models.hub_unreachable_reason()
        if reason is None:
            judge_model = download_judge()
        else:
            cli.say(f"the Hugging Face Hub cannot be reached ({reason}): the judge is the bundled Gemma 3 270M, a "
                      f"base-model stand-in at chance, so its verdicts are no evidence; pass --judge-model FILE "
                      f"(e.g. {JUDGE_FILE}) for a real judge")
            judge_model = models.bundled_model()
    if not os.path.isfile(judge_model):
        raise ValueError(f"judge model not found: {judge_model}")
    if not os.access(judge_model, os.R_OK):
        raise ValueError(f"judge model is not readable: {judge_model}")
    return judge_model


def download_judge() -> str:
    """The seed's judge from the Hub, through huggingface_hub as llama-cpp-python's
    Llama.from_pretrained does: downloaded once into the Hugging Face cache, found there later."""
    from huggingface_hub import hf_hub_download
    try:
        return hf_hub_download(JUDGE_REPO, JUDGE_FILE)
    except Exception as error:  # no network, a cut transfer, a full disk: one line, never a traceback
        raise ValueError(f"cannot download the judge {JUDGE_FILE} from {JUDGE_REPO}: {data.one_line(error)}; "
                         f"rerun to try again, or pass --judge-model FILE to judge with a local GGUF file") from None


def judge_pair(judge: Judge, conversation: str, answer_x: str, answer_y: str) -> tuple[float | None, float | None, float]:
    """(p_A with X shown first, p_B with X shown second, pref(X over Y) = their mean).

    With two verdict tokens p_B = 1 - p_A, so pref(X, Y) + pref(Y, X) = 1 for any judge
    that gives the same prompt the same p_A. Identical answers: 0.5, and no judge call.
    """
    if answer_x.strip() == answer_y.strip():
        return None, None, 0.5
    p_a_x_first = judge(conversation, answer_x, answer_y)
    p_b_x_second = 1.0 - judge(conversation, answer_y, answer_x)
    return p_a_x_first, p_b_x_second, (p_a_x_first + p_b_x_second) / 2


def outcome(preference: float, tie_margin: float) -> str:
    """'win' or 'loss' for X, or 'tie' when |pref - 0.5| <= tie_margin (so 0.5 is a tie even at margin 0)."""
    if abs(preference - 0.5) <= tie_margin:
        return "tie"
    return "win" if preference > 0.5 else "loss"


# ---------------------------------------------------------------------------------------
# Controls: pairs whose right answer is not in doubt, X always the right one
# ---------------------------------------------------------------------------------------

CUT_WORDS = 4  # "cut": an answer against its first 4 words (answers of more than twice as many)
CONTROLS = {  # name: (what X and Y are, whether the trust line decides from it, where it comes from)
    "relevance": ("this conversation's answer vs another conversation's answer", True,
                  "an answer to another question, as in MT-Bench's and LLMBar's off-topic outputs"),
    "shuffled": ("an answer vs the same answer with its words shuffled", True, "integrity: the same words, no sense"),
    "cut": (f"an answer vs its first {CUT_WORDS} words", True, "integrity: a reply cut off"),
    "repeated": ("an answer vs the same answer written twice", False,
                 "verbosity bias, Zheng et al. 2023 (arXiv 2306.05685) Section 3.3, repetitive-list attack"),
}


def shuffled_words(text: str, seed: int) -> str | None:
    """The text's words in another order (a seeded shuffle), or None when no order differs."""
    words = text.split()
    if len(set(words)) < 2:
        return None
    rng = random.Random(seed)
    order = list(words)
    while order == words:
        rng.shuffle(order)
    return " ".join(order)


def cut_words(text: str) -> str | None:
    """The text's first CUT_WORDS words, when it has more than twice as many."""
    words = text.split()
    return " ".join(words[:CUT_WORDS]) if len(words) > 2 * CUT_WORDS else None


def plain(text: str) -> str:
    """A text as the controls compare it: Unicode-normalised (NFKC), its words joined by single
    spaces, so that a control's two answers differ in what the control is about, never in spacing."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def control_items(prompts: list[str], answers: list[str], count: int) -> dict[str, list[tuple[int, str, str, str]]]:
    """Up to count (prompt_id, conversation, right answer X, wrong answer Y) items of each control,
    from the held-out pairs' conversations and their chosen answers, in order, skipping a pair
    where a control cannot be built (an answer too short to cut, one word to shuffle). Both
    answers are plain(): a shuffle or a cut never also drops a newline a judge could count."""
    items = {name: [] for name in CONTROLS}
    plain_prompts, plain_answers = [plain(p) for p in prompts], [plain(a) for a in answers]
    for i, (prompt, answer) in enumerate(zip(prompts, plain_answers)):
        others = [j for j in [*range(i + 1, len(plain_answers)), *range(i)]  # another question, another answer
                  if plain_prompts[j].casefold() != plain_prompts[i].casefold()
                  and plain_answers[j].casefold() != answer.casefold() and plain_answers[j]]
        wrong = {"relevance": plain_answers[others[0]] if others else None, "shuffled": shuffled_words(answer, i),
                 "cut": cut_words(answer), "repeated": f"{answer} {answer}" if answer else None}
        for name, wrong_answer in wrong.items():
            if answer and wrong_answer is not None and len(items[name]) < count:
                items[name].append((i, prompt, answer, wrong_answer))
    return items


# ---------------------------------------------------------------------------------------
# The log: every answer and verdict, appended and flushed as it is made
# ---------------------------------------------------------------------------------------

class JudgementLog:
    """A JSONL file: a header {"kind": "header", ...} with what its answers and verdicts depend
    on (run_header), then records {"kind": "answer"|"judgement", ...}, indexed by (kind, model
    or comparison, prompt_id), and at its end {"kind": "summary", "report": what judge.py printed}.
    --resume continues a log only if its header is this run's."""

    def __init__(self, path: str, header: dict, resume: bool):
        self.path, self.header = path, {"kind": "header", **header}
        self.records: dict[tuple[str, str, int], dict] = {}  # (kind, model or comparison, prompt_id) -> record
        previous = checkpoints.read_log(path, "judge.py; use another --output") if resume and os.path.exists(path) else []
        if previous:
            check_header(path, previous[0], self.header)
        for line_no, record in enumerate(previous[1:], 2):
            try:
                self.index(record)
            except (KeyError, TypeError):
                raise ValueError(f"{path}:{line_no}: not a record of judge.py; use another --output") from None
        self.continues = bool(previous)  # append to the file, or start it afresh
        self.file = None  # opened at the first record: a run that fails before it leaves an older log as it was

    def index(self, record: dict) -> None:
        if record["kind"] == "summary":  # the report of a run that got to its end; a resumed one writes its own
            return
        self.records[(record["kind"], record.get("model") or record["comparison"], record["prompt_id"])] = record

    def find(self, kind: str, name: str, prompt_id: int, prompt: str) -> dict | None:
        record = self.records.get((kind, name, prompt_id))
        if record is not None and record["prompt"] != prompt:
            raise ValueError(f"{self.path} holds another prompt as {name} #{prompt_id}: it is the log of another "
                             f"run; use another --output")
        return record

    def append(self, record: dict) -> None:
        if self.file is None:
            with checkpoints.writing(self.path):
                self.file = open(self.path, "a" if self.continues else "w", encoding="utf-8")
            if not self.continues:
                self.write(self.header)
        self.write(record)
        self.index(record)

    def write(self, record: dict) -> None:
        with checkpoints.writing(self.path):
            self.file.write(json.dumps(record) + "\n")  # one write per line: a kill can cut only the last one
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):  # each record was flushed; a failed one was reported already
                self.file.close()


RESUME_SETTINGS = ("judge_model", "seed", "temperature", "max_new_tokens", "batch_size", "judge_max_chars",
                   "num_test_questions")


def run_header(config: JudgeConfig, checkpoint: dict, judge_file: str) -> dict:
    """What a log's answers and verdicts depend on, written as its first record.

    The checkpoint by path and content (step, sha256 of the file: a run retrained into the same
    path is another run); the judge by file name and size (a hash of 4 GB would cost more than
    the check is worth); the sampling settings, batch size and question count included, since
    batch k samples under (seed, k) and the count decides what the last batch holds; and the
    characters the judge sees.
    """
    with open(config.checkpoint, "rb") as file:
        checkpoint_sha256 = hashlib.file_digest(file, "sha256").hexdigest()
    settings = {name: getattr(config, name) for name in RESUME_SETTINGS}
    settings["judge_model"] = f"{os.path.basename(judge_file)} ({os.path.getsize(judge_file)} bytes)"
    return {"checkpoint": os.path.abspath(config.checkpoint), "checkpoint_step": checkpoint["step"],
            "checkpoint_sha256": checkpoint_sha256, **settings}


def check_header(path: str, found: dict, expected: dict) -> None:
    """--resume continues only a log of this very run, or says which setting differs."""
    if found.get("kind") != "header":
        raise ValueError(f"{path} has no header (an older judge.py wrote it), so nothing says which run it belongs "
                         f"to; use another --output, or drop --resume to start it afresh")
    for name, value in expected.items():
        if found.get(name) != value:
            setting = f"--{name.replace('_', '-')}" if name in RESUME_SETTINGS else name.replace("_", " ")
            raise ValueError(f"{path} was made with {setting} {found.get(name)}, not {value}: it is the log of "
                             f"another run; use another --output, or drop --resume to start it afresh")


def add_missing_answers(name: str, model, tokenizer, prompts: list[str], config: JudgeConfig, judgements: JudgementLog) -> None:
    missing = {i for i, prompt in enumerate(prompts) if judgements.find("answer", name, i, prompt) is None}
    answers = generate_answers(model, tokenizer, prompts, config.max_new_tokens, config.temperature,
                               config.batch_size, config.seed, wanted=missing,
                               desc=f"{name} answers" if config.progress else None)
    for prompt_id, answer in answers:
        if prompt_id in missing:  # the batch's other answers are logged already, and the same
            judgements.append({"kind": "answer", "model": name, "prompt_id": prompt_id, "prompt": prompts[prompt_id],
                        "answer": answer})


def policy_name(checkpoint: dict) -> str:
    """What the checkpoint's adapters make of the base model: the DPO model, or an SFT run's SFT model."""
    return "sft" if checkpoint["config"].get("loss_type") == "sft" else "dpo"


def model_names(checkpoint: dict) -> list[str]:
    """The models whose answers are judged: base, the SFT model of an SFT stage, the policy."""
    return ["base", *(["sft"] if "sft" in checkpoint else []), policy_name(checkpoint)]


def answer_with_every_model(model, tokenizer, checkpoint: dict, prompts: list[str], config: JudgeConfig,
                            judgements: JudgementLog) -> None:
    """Log the answers the log lacks of each of model_names(checkpoint), all from one network.

    model: the checkpoint's base model, bare; it answers first, then gets the checkpoint's
    adapters (checkpoints.add_trained_adapters: an SFT stage folded into the weights, DPO's adapters
    on top) and so turns into the SFT model (adapters off) and the policy (adapters merged).
    """
    add_missing_answers("base", model, tokenizer, prompts, config, judgements)
    checkpoints.add_trained_adapters(model, checkpoint)
    if "sft" in checkpoint:
        with lora.adapters_disabled(model):  # DPO's reference: the SFT model
            add_missing_answers("sft", model, tokenizer, prompts, config, judgements)
    with lora.adapters_merged(model):  # W0 + (alpha/r) B A once: one matmul per layer while generating
        add_missing_answers(policy_name(checkpoint), model, tokenizer, prompts, config, judgements)


def judge_comparison(judge: Judge, comparison: str, items: list[tuple[int, str, str, str]], judgements: JudgementLog,
                     tie_margin: float, progress: bool = True) -> list[dict]:
    """Judge (prompt_id, prompt, answer_x, answer_y) items, skipping those the log holds."""
    records = []
    for prompt_id, prompt, answer_x, answer_y in tqdm(items, desc=comparison, disable=not (items and progress)):
        record = judgements.find("judgement", comparison, prompt_id, prompt)
        if record is None:
            p_a_x_first, p_b_x_second, preference = judge_pair(judge, prompt, answer_x, answer_y)
            record = {"kind": "judgement", "comparison": comparison, "prompt_id": prompt_id, "prompt": prompt,
                      "answer_x": answer_x, "answer_y": answer_y, "p_a_x_first": p_a_x_first,
                      "p_b_x_second": p_b_x_second, "preference": preference,
                      "outcome": outcome(preference, tie_margin)}
            judgements.append(record)
        records.append(record)
    return records


# ---------------------------------------------------------------------------------------
# 3. Win rates
# ---------------------------------------------------------------------------------------

def share(count: int, total: int) -> float | None:
    return count / total if total else None


@dataclass
class ComparisonResult:
    comparison: str
    n: int                                # pairs judged
    wins: int                             # pairs X won (the DPO model; the human-chosen answer for sanity)
    losses: int
    ties: int
    win_rate: float | None                # wins / (wins + losses); None without a decisive pair
    ci_low: float                         # 95% Wilson score interval of win_rate
    ci_high: float
    position_consistency: float | None    # share of judge-called pairs whose two orders pick the same answer
    longer_preferred: float | None        # share of decisive pairs (lengths differing) won by the longer answer
    x_longer: float | None                # share of pairs (lengths differing) where X is the longer answer
    x_mean_chars: float                   # mean length of X's answers, in characters (DPO tends to lengthen them)
    y_mean_chars: float

    @property
    def significant(self) -> bool:
        """The interval excludes 0.5: X wins (or loses) more often than a coin would say."""
        return not self.ci_low <= 0.5 <= self.ci_high


def summarise(comparison: str, records: list[dict], tie_margin: float) -> ComparisonResult:
    """Outcomes are re-derived from the preferences, so --resume with another --tie-margin works."""
    outcomes = [outcome(record["preference"], tie_margin) for record in records]
    wins, losses, ties = (outcomes.count(kind) for kind in ("win", "loss", "tie"))
    judged = [r for r in records if r["p_a_x_first"] is not None]
    consistent = sum((r["p_a_x_first"] > 0.5) == (r["p_b_x_second"] > 0.5) for r in judged)
    lengths = [(len(r["answer_x"].strip()), len(r["answer_y"].strip()), result) for r, result in zip(records, outcomes)]
    x_longer = [x > y for x, y, _ in lengths if x != y]
    longer_won = [(result == "win") == (x > y) for x, y, result in lengths if x != y and result != "tie"]
    return ComparisonResult(comparison, len(records), wins, losses, ties, share(wins, wins + losses),
                            *wilson_interval(wins, wins + losses), share(consistent, len(judged)),
                            share(sum(longer_won), len(longer_won)), share(sum(x_longer), len(x_longer)),
                            *(sum(length[side] for length in lengths) / max(1, len(lengths)) for side in (0, 1)))


@dataclass(frozen=True)
class Comparison:
    x_label: str     # "Number of wins of the ..." for X, whose win rate is reported
    y_label: str
    x_winner: str    # "Winner: ..."
    y_winner: str
    rate_label: str
    x_answer: str    # "... is the longer answer"


COMPARISONS = {
    "dpo_vs_base": Comparison("DPO model", "base model", "DPO", "Base", "DPO win rate", "the DPO answer"),
    "dpo_vs_sft": Comparison("DPO model", "SFT model", "DPO", "SFT", "DPO win rate", "the DPO answer"),
    "dpo_vs_dataset": Comparison("DPO model", "dataset answers", "DPO", "Dataset", "DPO win rate", "the DPO answer"),
    "sft_vs_base": Comparison("SFT model", "base model", "SFT", "Base", "SFT win rate", "the SFT answer"),
    "sft_vs_dataset": Comparison("SFT model", "dataset answers", "SFT", "Dataset", "SFT win rate", "the SFT answer"),
    "sanity": Comparison("human-chosen answers", "human-rejected answers", "Chosen", "Rejected",
                         "Judge agreement with people", "the human-chosen answer"),
}


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def format_result(result: ComparisonResult) -> str:
    labels = COMPARISONS[result.comparison]
    winner = (labels.x_winner if result.wins > result.losses else
              labels.y_winner if result.losses > result.wins else "Both")
    verdict = "significant" if result.significant else "no significant difference"
    return "\n".join([
        f"== {labels.x_label} vs {labels.y_label}: {result.n} pairs ==",
        f"Number of wins of the {labels.y_label}: {result.losses}",
        f"Number of wins of the {labels.x_label}: {result.wins}",
        f"Winner: {winner}",
        f"Number of ties: {result.ties}",
        f"{labels.rate_label} (ties excluded): {percent(result.win_rate)}, 95% CI "
        f"[{percent(result.ci_low)}, {percent(result.ci_high)}]: {verdict}",
        f"Position consistency (both orders pick the same answer): {percent(result.position_consistency)}",
        f"Judge prefers the longer answer in {percent(result.longer_preferred)} of decisive pairs "
        f"({labels.x_answer} is the longer in {percent(result.x_longer)} of pairs)",
        f"Mean answer length: {labels.x_label} {result.x_mean_chars:.0f} characters, {labels.y_label} "
        f"{result.y_mean_chars:.0f}",
    ])


def trust_line(sanity: ComparisonResult | None) -> str:
    """Whether the win rates are evidence: only if the judge agrees with people more often than a
    coin would, i.e. the Wilson interval of its agreement on the sanity pairs lies above 50%."""
    if sanity is None:
        return "Judge agreement with people not measured (--sanity 0): the win rates above rest on an unchecked judge"
    agreement = (f"Judge agreement with people {percent(sanity.win_rate)} [{sanity.ci_low:.0%}, {sanity.ci_high:.0%}] "
                 f"on {sanity.wins + sanity.losses} decisive of {sanity.n} human-labelled pairs")
    if not sanity.significant:
        return (f"{agreement}: this judge is not shown to be better than a coin, so the win rates above are "
                f"no evidence either way")
    if sanity.win_rate > 0.5:
        return f"{agreement}: better than a coin, so the win rates above are evidence, as far as this judge goes"
    return (f"{agreement}: worse than a coin (it prefers what people rejected), so the win rates above are "
            f"no evidence either way")


# Where the human pairs' agreement stands: what judges and people reach on HH-RLHF harmless-base.
ANCHORS = {"harmless-base": "judges measured on HH-RLHF harmless-base agree with its labels about half the time "
                            "(RewardBench's anthropic_harmless, 2.27k pairs: GPT-4o 52.5%, Claude-3-haiku 51.0%, "
                            "Llama-3-70B-Instruct 47.2%), researchers with its crowdworkers about 63% (Bai et al. 2022, "
                            "arXiv 2204.05862): the labels' noise as much as the judge's"}


def subset_of(checkpoint: dict) -> str | None:
    """The HH-RLHF subset a run's held-out pairs come from (the bundled file is harmless-base), else None."""
    config = settings.config_from_dict(checkpoint["config"])
    return config.hub_subset if config.data == data.HUB_DATASET else "harmless-base" if config.data == data.BUNDLED_DATA else None


def interval(result: ComparisonResult) -> str:
    return (f"{percent(result.win_rate)} [{result.ci_low:.0%}, {result.ci_high:.0%}] on {result.wins + result.losses} "
            f"decisive of {result.n}")


def people_line(sanity: ComparisonResult | None, subset: str | None) -> str:
    """The judge's agreement with people's labels, as what it is: beside what others reach on the same set."""
    if sanity is None:
        return "Judge agreement with people not measured (--sanity 0)"
    anchor = f" ({ANCHORS[subset]})" if subset in ANCHORS else ""
    return f"Judge agreement with people {interval(sanity)} human-labelled {subset + ' ' if subset else ''}pairs{anchor}"


def controls_block(controls: dict[str, ComparisonResult]) -> str:
    lines = ["Controls, where the right answer is not in doubt (both orders; X is the right one):"]
    for name, result in controls.items():
        what, decides, _ = CONTROLS[name]
        lines.append(f"  {name} ({what}): right in {interval(result)}, position consistency "
                     f"{percent(result.position_consistency)}{'' if decides else ' (reported, not deciding)'}")
    return "\n".join(lines)


def controls_trust_line(controls: dict[str, ComparisonResult]) -> str:
    """Whether the win rates are evidence, decided by the controls: the judge must pick the right
    answer of every deciding control more often than a coin would (the Wilson interval of its right
    verdicts among all the control's pairs, ties counted as not right, above 50%),
    and its two orders must agree on at least half of those pairs (a judge pulled to one position
    is otherwise right by the order, not the answers)."""
    deciding = [name for name, (_, decides, _) in CONTROLS.items() if decides]
    missing = [name for name in deciding if name not in controls]
    if missing:  # not measured is not failed: the judge is unchecked
        return (f"Trust: no pair of the test split could make the {', '.join(missing)} control, so the judge is "
                f"unchecked and the win rates above are no evidence either way")
    # right in more than half of ALL its pairs, a tie counting as not right: a judge that decides few pairs is not reading
    failed = [name for name in deciding if wilson_interval(controls[name].wins, controls[name].n)[0] <= 0.5]
    weighted = [(controls[name].position_consistency, controls[name].n) for name in deciding
                if name in controls and controls[name].position_consistency is not None]
    consistency = sum(c * n for c, n in weighted) / sum(n for _, n in weighted) if weighted else None
    reasons = [f"not shown to pick the right answer on {', '.join(failed)}"] if failed else []
    if consistency is not None and consistency < 0.5:
        reasons.append(f"position-biased: its two orders agree on {consistency:.0%} of the control pairs")
    if reasons:
        return (f"Trust: the judge fails its controls ({'; '.join(reasons)}): it is not shown to read the answers, so "
                f"the win rates above are no evidence either way")
    return (f"Trust: the judge passes its controls (the right answer on {', '.join(deciding)}; its two orders agree on "
            f"{consistency:.0%}): the win rates above are the verdicts of a judge that reads the answers, with its "
            f"agreement with people beside them")


def report(results: dict[str, ComparisonResult], subset: str | None = None) -> str:
    """The comparisons, each opening with the seed's three lines, then how far to trust the judge:
    with controls, what they found, the agreement with people and the trust line they decide;
    without (--controls 0), the agreement with people decides, as before."""
    controls = {name: results[name] for name in CONTROLS if name in results}
    blocks = [format_result(result) for name, result in results.items() if name not in CONTROLS]
    if not controls:
        return "\n\n".join([*blocks, trust_line(results.get("sanity"))])
    return "\n\n".join([*blocks, "\n".join([controls_block(controls), people_line(results.get("sanity"), subset),
                                           controls_trust_line(controls)])])


def logged_answers(checkpoint: dict, prompts: list[str], config: JudgeConfig, judgements: JudgementLog) -> dict[str, list[str]]:
    """{model name: its answers} from the log; the model is loaded only if the log lacks some."""
    names = model_names(checkpoint)
    if any(judgements.find("answer", name, i, prompt) is None for name in names for i, prompt in enumerate(prompts)):
        model, tokenizer = checkpoints.load_base(checkpoint, config.checkpoint, verbose=config.verbose)
        answer_with_every_model(model, tokenizer, checkpoint, prompts, config, judgements)
    return {name: [judgements.find("answer", name, i, prompt)["answer"] for i, prompt in enumerate(prompts)]
            for name in names}


def evaluate(config: JudgeConfig, judge: Judge | None = None) -> dict[str, ComparisonResult]:
    """Answer, judge and summarise; results by comparison name: dpo_vs_base, dpo_vs_sft (after an SFT
    stage), dpo_vs_dataset, sanity (sft_vs_base and sft_vs_dataset for an SFT run's checkpoint).

    What a user can get wrong is checked before any model loads: the checkpoint, the held-out
    pair counts, the judge file and the log. Then the judge loads (a bad GGUF fails
    before the generation), then the policy if the log lacks answers. judge: a stand-in for the
    judge that config.judge_model names (tests); None = that judge through llama.cpp.
    """
    with contextlib.ExitStack() as stack:
        checkpoint = checkpoints.load_checkpoint(config.checkpoint)
        pairs = checkpoints.held_out_pairs(checkpoint, config.checkpoint)
        if len(pairs) < max(config.num_test_questions, config.sanity):
            raise ValueError(f"the run holds out {len(pairs)} test pairs, fewer than --num-test-questions "
                             f"{config.num_test_questions} or --sanity {config.sanity}: ask for at most {len(pairs)}")
        judge_file = judge_model_file(config.judge_model)
        judgements = stack.enter_context(contextlib.closing(
            JudgementLog(config.output, run_header(config, checkpoint, judge_file), config.resume)))
        if judge is None:
            judge = stack.enter_context(contextlib.closing(JudgeProcess(functools.partial(
                LlamaJudge, judge_file, config.judge_context, config.judge_max_chars, config.judge_threads,
                verbose=config.verbose), judge_file, cli.say)))
        questions = pairs[:config.num_test_questions]
        answers = logged_answers(checkpoint, [pair.prompt for pair in questions], config, judgements)
        turn_end = data.assistant_turn_end(data.chat_renderer(models.cached_tokenizer(checkpoint["base_model"])))
        answers["dataset"] = [data.without_turn_end(pair.chosen, turn_end) for pair in questions]  # no template markup
        policy = policy_name(checkpoint)
        compared = [(policy, "base"), *([("dpo", "sft")] if "sft" in checkpoint else []), (policy, "dataset")]
        items = {  # (prompt_id, prompt, answer X, answer Y): X is the side whose win rate is reported
            f"{x}_vs_{y}": [(i, pair.prompt, answers[x][i], answers[y][i]) for i, pair in enumerate(questions)]
            for x, y in compared}
        items["sanity"] = [(i, pair.prompt, data.without_turn_end(pair.chosen, turn_end), data.without_turn_end(pair.rejected, turn_end))
                           for i, pair in enumerate(pairs[:config.sanity])]
        if config.controls:
            items.update(control_items([pair.prompt for pair in pairs],
                                       [data.without_turn_end(pair.chosen, turn_end) for pair in pairs], config.controls))
        results = {name: summarise(name, judge_comparison(judge, name, items[name], judgements, config.tie_margin,
                                                          config.progress), config.tie_margin)
                   for name in items if items[name]}
        judgements.append({"kind": "summary", "report": report(results, subset_of(checkpoint)),  # what judge.py prints, for report.py
                           "results": {name: asdict(result) for name, result in results.items()}})
        return results


def run_eval(model_name: str = settings.HUB_MODEL, dataset: str = data.HUB_DATASET, num_test_questions: int = 5,
             load_path: str = "checkpoints/best.pt", **options) -> dict[str, ComparisonResult]:
    """The seed's entry point: judge the DPO checkpoint at load_path on num_test_questions
    test prompts; evaluate(JudgeConfig(load_path, num_test_questions, **options)).

    Where the seed's meaning differs: the checkpoint names its own base model and data, so
    model_name and dataset choose nothing; they are checked. Their defaults (gpt2,
    Anthropic/hh-rlhf) always pass, since an offline training run replaced them by the bundled
    Gemma 3 270M and pairs; any other value must be the checkpoint's own, or it is a ValueError.
    The prompts are the run's test pairs (never trained or chosen on), not the dataset's first
    test rows. The results are returned, not printed: print(report(results)) prints what judge.py
    does. options: any other JudgeConfig field, e.g. judge_model, sanity or output.
    """
    checkpoint = checkpoints.load_checkpoint(load_path)
    trained_on = {"model_name": (model_name, settings.HUB_MODEL, checkpoint["base_model"]),
                  "dataset": (dataset, data.HUB_DATASET, settings.config_from_dict(checkpoint["config"]).data)}
    for name, (given, default, own) in trained_on.items():
        if given not in (default, own):
            raise ValueError(f"{name} {given!r} is not what {load_path} was trained with ({own!r}); the checkpoint "
                             f"knows its own: leave {name} at its default")
    return evaluate(JudgeConfig(load_path, num_test_questions=num_test_questions, **options))


# ---------------------------------------------------------------------------------------
# CLI: built from JudgeConfig, so --help lists every field with its default and meaning
# ---------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    return cli.config_parser(JudgeConfig, "judge.py",
                               "Judge a DPO checkpoint against its base model and the data with a local LLM.")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        config = JudgeConfig(**vars(parser.parse_args(argv)))
    except ValueError as error:
        parser.error(str(error))
    try:
        results = evaluate(config)
    except (ValueError, OSError) as error:  # missing or bad checkpoint, judge file or download, data or log
        print(f"judge.py: error: {error}", file=sys.stderr)
        return 2
    except JudgeDied as error:
        print(f"judge.py: error: {error}; {config.output} keeps every answer and verdict made so far "
              f"(then rerun with --resume)", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"judge.py: interrupted; {config.output} keeps what was done: rerun with --resume", file=sys.stderr)
        return 130
    print(report(results, subset_of(checkpoints.load_checkpoint(config.checkpoint))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
