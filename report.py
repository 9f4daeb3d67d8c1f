"""A run's report in one self-contained HTML file: what ran and how it learned, its validation
and test figures with their intervals, DPO's implicit reward over the text of test pairs token
by token, how far the policy moved from its reference, and judge.py's answers side by side.

    python report.py RUN_DIR                 # writes RUN_DIR/report.html (train.py writes it too, at the end)
    python report.py RUN_DIR --pairs 12      # 4 pairs ranked most confidently right, 4 wrong, 4 at random
    python report.py RUN_DIR --samples 8     # the KL estimate from 8 answers sampled here (default 4; slow on a CPU)
    python report.py RUN_DIR --judge-log judgements.jsonl

What the page holds and how each number is made: report_page.py.
"""
from __future__ import annotations

import sys
import time

import checkpoints
import cli
import report_page


def main(argv: list[str] | None = None) -> int:
    parser = cli.OneLineErrorParser(prog="report.py", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a train.py --checkpoint-dir (best.pt, metrics.jsonl)")
    parser.add_argument("--pairs", type=int, default=9, help="test pairs shown: a third most right, most wrong, random")
    parser.add_argument("--samples", type=int, default=4,
                        help="answers sampled from the policy at temperature 1 for the KL estimate, one per test prompt "
                             "(0: none; slow on a CPU: up to 128 new tokens an answer)")
    parser.add_argument("--judge-log", nargs="*", default=[], help="judge.py logs of this run's checkpoints (those in "
                        "RUN_DIR and ./judgements.jsonl are found by themselves)")
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.samples < 0:
        parser.error("--pairs must be >= 1 and --samples >= 0")
    began = time.time()
    try:
        path = report_page.write_report(args.run_dir, args.pairs, args.samples, args.judge_log)
    except (OSError, ValueError, checkpoints.WriteFailed) as error:  # a missing or unreadable file, a bad run
        print(f"report.py: error: {error}", file=sys.stderr)
        return 1
    cli.say(f"report: {path} ({time.time() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
