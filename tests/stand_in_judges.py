"""Judges that stand in for the llama.cpp one where a test needs to script the verdicts. Light to
import (no torch): the judge's child process imports this file to make one."""
import math
import os
import signal


def longer_is_better(conversation, answer_a, answer_b, bias=0.0):
    """A scripted judge: prefers the longer answer, with an optional pull towards A."""
    return 1 / (1 + math.exp(-(len(answer_a) - len(answer_b)) / 10 - bias))


class KillsItself:
    """A judge, in the child's place of llama.cpp, that dies of SIGSEGV at call number
    $CRASH_AT (0 = while loading; call 1 is the self-check's probe), as the AMX matmul does.
    With extra buffer types off it never dies (as llama.cpp without its AMX matmul)."""

    def __init__(self, model_path, *args, extra_buffer_types=True, **options):
        self.crash_at, self.calls = int(os.environ["CRASH_AT"]), 0
        if not extra_buffer_types:
            self.crash_at = -1
        if self.crash_at == 0:
            os.kill(os.getpid(), signal.SIGSEGV)

    def __call__(self, conversation, answer_a, answer_b):
        self.calls += 1
        if self.calls == self.crash_at:
            os.kill(os.getpid(), signal.SIGSEGV)
        return longer_is_better(conversation, answer_a, answer_b)
