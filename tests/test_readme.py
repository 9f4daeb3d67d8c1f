"""README.md is what a user follows: CI must run its install and test commands as written there."""
import re
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
