"""Judges that stand in for the llama.cpp one where a test needs to script the verdicts. Light to
import (no torch): the judge's child process imports this file to make one."""
import hashlib
import math
import os
import signal
import unicodedata


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


class Reader:
    """A judge that reads: it knows each conversation's own answer (the dataset's chosen one) and
    prefers it, whichever position it is shown in; otherwise it cannot tell."""

    def __init__(self, own: dict):
        self.own = {conversation: plain(answer) for conversation, answer in own.items()}

    def __call__(self, conversation, answer_a, answer_b):
        own = self.own.get(conversation)
        return 0.9 if plain(answer_a) == own else 0.1 if plain(answer_b) == own else 0.5


def plain(text):
    """Words joined by single spaces, Unicode-normalised: how the judge's controls write an answer."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def coin(conversation, answer_a, answer_b):
    """A judge that reads nothing: p(A) drawn from the question's hash, the same for the same question."""
    digest = hashlib.sha256("\x00".join((conversation, answer_a, answer_b)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def first_position(conversation, answer_a, answer_b):
    """A judge pulled to the first position: A, whatever the answers."""
    return 0.9
