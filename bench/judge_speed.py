"""Seconds per judged pair of the llama.cpp judge (both orders, as judge.py asks), and what the
llama.cpp build was compiled with: the number behind docs/judge.md's "llama.cpp, built for your CPU".

    python bench/judge_speed.py                          # the bundled Gemma 3 270M, 20 bundled pairs
    python bench/judge_speed.py --judge-model j.gguf --pairs 50

Run it once per build to compare them, e.g. requirements.txt's against a portable AVX2 one
installed elsewhere (PYTHONPATH=that-folder python bench/judge_speed.py).
"""
import argparse
import sys
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
    parser.add_argument("--pairs", type=int, default=20, help="human-labelled pairs of the bundled data to judge")
    parser.add_argument("--threads", type=int, default=0, help="judge threads; 0 = judge.py's default")
    args = parser.parse_args(argv)
    import llama_cpp
    print(f"llama-cpp-python {llama_cpp.__version__} from {Path(llama_cpp.__file__).parent}")
    print(llama_judge.llama_cpp_system_info().strip())
    pairs = data.load_pairs(data.BUNDLED_DATA)[:args.pairs]
    model_file = args.judge_model or models.bundled_model()
    start = time.time()
    llm = llama_judge.LlamaJudge(model_file, n_threads=args.threads)
    loaded = time.time()
    preferences = [judge.judge_pair(llm, pair.prompt, pair.chosen, pair.rejected)[2] for pair in pairs]
    seconds = time.time() - loaded
    llm.close()
    agree = sum(p > 0.5 for p in preferences)
    print(f"{Path(model_file).name}: loaded in {loaded - start:.1f} s; {len(pairs)} pairs in {seconds:.1f} s = "
          f"{seconds / len(pairs):.2f} s a pair (two judge calls each); chosen preferred in {agree} of {len(pairs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
