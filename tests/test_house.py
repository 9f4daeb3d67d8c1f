"""The house: imports flow one way, and no program is another program's library."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROOMS = {path.stem: path for path in ROOT.glob("*.py")}
PROGRAMS = {"train", "judge", "export", "report"}  # what a user runs; the rest are the rooms they import


def our_imports(path: Path) -> set[str]:
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    return imported & set(ROOMS)


def test_imports_flow_one_way_without_a_circle():
    graph = {room: our_imports(path) for room, path in ROOMS.items()}
    order, placed = [], set()
    while len(placed) < len(graph):  # Kahn's order: a room after everything it imports
        ready = sorted(room for room, imports in graph.items() if room not in placed and imports <= placed)
        assert ready, f"a circle among {sorted(set(graph) - placed)}"
        order += ready
        placed |= set(ready)


def test_no_program_imports_another_program():
    for room, path in ROOMS.items():
        assert not our_imports(path) & (PROGRAMS - {room}), f"{room}.py imports a program"
    for path in (ROOT / "bench").glob("*.py"):  # the benchmarks of train.py's own step and validation may
        if "train" in our_imports(path):
            assert path.stem in {"bench", "levers", "study", "fold_precision", "gpt2_shape", "gpu_check"}, path
