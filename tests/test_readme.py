"""README.md is what a user follows: CI must run its install and test commands as written there,
and its commands followed top to bottom must leave the suite passing."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def command_lines(text: str) -> list[str]:
    """The commands of a shell script: no comments, no shell settings, no cd."""
    lines = [line.split("  #")[0].strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith(("#", "set ", "cd ", "export "))]


def test_ci_runs_the_readmes_install_and_test_commands_character_for_character():
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1]
    install = re.search(r"^    (pip install [^&#\n]*?)\s*&&", quickstart, re.M).group(1)  # before "&& python train.py"
    ci = command_lines((ROOT / ".ci" / "run").read_text())
    assert ci[0] == install == "pip install -r requirements.txt"
    readme_lines = {line.strip() for line in readme.splitlines() if line.startswith("    ")}  # its code lines
    assert all(line in readme_lines for line in ci), [line for line in ci if line not in readme_lines]
    assert ci[-1].endswith("python -m pytest")


def test_ci_sets_nothing_that_changes_what_gets_built():
    exported = re.findall(r"^\s*export\s+(.*)$", (ROOT / ".ci" / "run").read_text(), re.M)
    names = {assignment.split("=")[0] for line in exported for assignment in line.split("#")[0].split()}
    assert names <= {"PIP_DISABLE_PIP_VERSION_CHECK"}, names  # quiet only; CMAKE_ARGS, CFLAGS, PIP_* would differ


def test_every_test_runs_in_a_folder_of_its_own():
    assert Path.cwd() != ROOT and not any(Path.cwd().iterdir())


def test_the_suite_passes_in_a_clone_where_the_quickstart_left_its_run(tmp_path):
    """README's Quickstart leaves checkpoints/ (a run) and judgements.jsonl in the working
    directory; the Tests section's pytest then met that run's folder in place of the error a test
    asked for (1 failed). Here a folder holds what the Quickstart leaves, and a test that runs
    train.main with its default --checkpoint-dir runs from there: it passes, and leaves the
    user's files as they were."""
    clone = tmp_path / "clone"
    (clone / "checkpoints").mkdir(parents=True)
    left = {clone / "checkpoints" / "metrics.jsonl": b'{"step": 0, "split": "val"}\n', clone / "checkpoints" / "last.pt": b"x",
            clone / "judgements.jsonl": b'{"kind": "header"}\n'}
    for path, content in left.items():
        path.write_bytes(content)
    done = subprocess.run([sys.executable, "-m", "pytest", "-c", str(ROOT / "pytest.ini"), "--rootdir", str(ROOT),
                           "--basetemp", str(tmp_path / "inner"), "-p", "no:warnings",
                           f"{ROOT}/tests/test_train.py::test_cli_errors_are_one_line_without_traceback"],
                          cwd=clone, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    assert {path: path.read_bytes() for path in left} == left and sorted(clone.rglob("*")) == sorted(
        [clone / "checkpoints", *left])
