"""A GGUF judge on its controls and on people's labels: what judge.py's trust line decides from,
measured on more pairs, with seconds a pair (both orders, as judge.py asks).

    python bench/judge_trust.py                                   # the bundled Gemma 3 270M
    python bench/judge_trust.py --judge-model SmolLM2-135M-Instruct.Q4_1.gguf --controls 25 --sanity 50

The pairs are the bundled data's test split under the default split (200 pairs nothing was
trained or chosen on): the controls built from them (judge.control_items) and the human pairs
themselves (chosen against rejected). The report is judge.py's, less the win rates.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import data  # noqa: E402
import judge  # noqa: E402
import llama_judge  # noqa: E402
import models  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--judge-model", default="", help="GGUF file; empty = the bundled Gemma 3 270M")
    parser.add_argument("--controls", type=int, default=25, help="pairs of each control")
    parser.add_argument("--sanity", type=int, default=50, help="human-labelled pairs")
    parser.add_argument("--threads", type=int, default=0, help="judge threads; 0 = judge.py's default")
    args = parser.parse_args(argv)
    pairs = data.split_data(data.BUNDLED_DATA).test
    items = judge.control_items([p.prompt for p in pairs], [p.chosen for p in pairs], args.controls)
    items["sanity"] = [(i, p.prompt, p.chosen, p.rejected) for i, p in enumerate(pairs[:args.sanity])]
    model_file = args.judge_model or models.bundled_model()
    llm = llama_judge.LlamaJudge(model_file, n_threads=args.threads)
    scratch = tempfile.TemporaryDirectory()
    log = judge.JudgementLog(str(Path(scratch.name) / "judgements.jsonl"), {}, resume=False)
    results, seconds = {}, {}
    for name, rows in items.items():
        began = time.time()
        results[name] = judge.summarise(name, judge.judge_comparison(llm, name, rows, log, 0.05, progress=False), 0.05)
        seconds[name] = (time.time() - began) / max(1, len(rows))
    llm.close()
    print(f"judge {Path(model_file).name}, {len(pairs)} bundled test pairs")
    print("| pairs | right (people: agreement), 95% Wilson interval | decisive of n | position consistency | s a pair |")
    print("| --- | --- | --- | --- | --- |")
    for name, result in results.items():
        print(f"| {name} | {judge.percent(result.win_rate)} [{result.ci_low:.0%}, {result.ci_high:.0%}] | "
              f"{result.wins + result.losses} of {result.n} | {judge.percent(result.position_consistency)} | {seconds[name]:.2f} |")
    print(judge.report(results, "harmless-base").split("\n\n")[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
