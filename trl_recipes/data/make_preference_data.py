"""Write the second-stage data: preference pairs for DPO and prompts for GRPO, from the default run's generator.

    python -m trl_recipes.data.make_preference_data   # rewrites the four files below, beside this file

The problems continue the seeded stream of `make_default_data` after its 720 (train, test, final test), so none of
them is a training, validation or test problem of the SFT recipes (checked here and by tests/test_packaged_data.py):

* preferences_train.jsonl (300 pairs) and preferences_eval.jsonl (60 held-out pairs), in TRL's conversational
  preference format: `chosen` is the worked answer, `rejected` the same worked answer with one arithmetic slip (one
  step's result off by 1 to 3, carried through the later steps and into the final "#### <number>"). Every arm of a
  comparison trains on the same pairs; an SFT model's own wrong answers would differ from method to method.
* grpo_train.jsonl (200 prompts) and grpo_eval.jsonl (60 held-out prompts): the question and its reference answer
  (`answer`, the worked solution ending in "#### <number>"), which the verifiable reward checks.
"""

from __future__ import annotations

import json
import os
import random
import re

from .make_default_data import problem, record

SEED = 20261125  # make_default_data's: the same stream, continued
SFT_PROBLEMS = 720  # make_default_data's train + test + final test
PARTS = (("preferences_train.jsonl", 300), ("preferences_eval.jsonl", 60), ("grpo_train.jsonl", 200),
         ("grpo_eval.jsonl", 60))
STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a // b}


def problems_after_sft(n: int) -> list[tuple[str, str]]:
    """The n distinct problems that follow the SFT recipes' 720 in make_default_data's stream."""
    rng, seen, rows = random.Random(SEED), set(), []
    while len(rows) < SFT_PROBLEMS + n:
        q, a = problem(rng)
        if q not in seen:
            seen.add(q)
            rows.append((q, a))
    return rows[SFT_PROBLEMS:]


def with_slip(answer: str, rng: random.Random) -> str:
    """`answer` with one step's result off by 1 to 3 (never below 0), every later step recomputed from it and the
    final number following: a worked answer that is wrong where arithmetic slips."""
    steps = list(STEP.finditer(answer))
    slip, delta = rng.randrange(len(steps)), rng.choice([-3, -2, -1, 1, 2, 3])
    values: dict[str, str] = {}  # a correct intermediate result -> the value that replaces it
    out, last = [], 0
    for i, m in enumerate(steps):
        a, op, b, result = m.groups()
        a, b = values.get(a, a), values.get(b, b)  # nothing to replace before the slip
        new = OPS[op](int(a), int(b)) if i > slip else int(result)
        if i == slip:
            new = int(result) + delta if int(result) + delta >= 0 else int(result) + abs(delta)
        if str(new) != result:
            values[result] = str(new)
        out.append(answer[last:m.start()] + f"{a} {op} {b} = {new}")
        last = m.end()
    text = "".join(out) + answer[last:]
    head, _, final = text.rpartition("#### ")
    return f"{head}#### {values.get(final.strip(), final.strip())}"


def preference(q: str, a: str, rng: random.Random) -> dict:
    rec = record(q, a)
    return {"prompt": rec["prompt"], "chosen": rec["completion"],
            "rejected": [{"role": "assistant", "content": with_slip(a, rng)}]}


def main() -> None:
    rows = problems_after_sft(sum(n for _, n in PARTS))
    rng, here, start = random.Random(SEED + 1), os.path.dirname(os.path.abspath(__file__)), 0
    for name, n in PARTS:
        part = rows[start:start + n]
        start += n
        if name.startswith("preferences"):
            records = [preference(q, a, rng) for q, a in part]
        else:
            records = [{"prompt": [{"role": "user", "content": q}], "answer": a} for q, a in part]
        with open(os.path.join(here, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        print(f"wrote {len(records)} records to {os.path.join(here, name)}")


if __name__ == "__main__":
    main()
