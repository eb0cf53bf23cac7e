"""GRPO's verifiable rewards for GSM8K-style answers (a worked solution ending in "#### <number>"), in TRL's reward
function form: `f(completions, answer, **columns) -> list[float]`, one per completion."""

from __future__ import annotations

import re

from .evaluate import final_number

FORMAT = re.compile(r"####\s*-?\d[\d,]*(?:\.\d+)?\s*$")  # the answer's last line: "#### <number>"
FORMAT_REWARD = 0.2


def completion_text(completion) -> str:
    """A completion as text: TRL passes conversational completions as a list of messages."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion)
    return str(completion)


def correctness_reward(completions, answer, **_) -> list[float]:
    """1 where the final number equals the reference answer's, else 0."""
    return [float(final_number(completion_text(c)) is not None
                  and final_number(completion_text(c)) == final_number(ref)) for c, ref in zip(completions, answer)]


def format_reward(completions, **_) -> list[float]:
    """FORMAT_REWARD where the answer ends in "#### <number>", else 0."""
    return [FORMAT_REWARD * bool(FORMAT.search(completion_text(c).strip())) for c in completions]


REWARD_FUNCS = [correctness_reward, format_reward]


def total_reward(completions, answers) -> list[float]:
    """The sum of the rewards GRPO trains with, per completion."""
    return [sum(r) for r in zip(*(f(completions, answer=answers) for f in REWARD_FUNCS))]
