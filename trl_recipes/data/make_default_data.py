"""Write the default run's dataset: short arithmetic word problems with worked answers ending in "#### <number>".

Written by this project (seeded templates below), in TRL's conversational prompt/completion format, so SFTTrainer
computes the loss on the answer only and the evaluation's GSM8K-style exact match applies to it.

    python -m trl_recipes.data.make_default_data   # rewrites train.jsonl, test.jsonl, test_final.jsonl beside this file

The first 600 distinct problems are the training set, the next 60 the test set (the recipes' held-out exact match; the
recipes' rates were chosen on it, so benchmarks now use it as their validation split), the 60 after those the final
test set, on which no choice was made and benchmarks report.
"""

from __future__ import annotations

import json
import os
import random

NAMES = ["Ada", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jun", "Kemi", "Lars", "Mina", "Noor"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "shells", "cards", "coins"]


def problem(rng: random.Random) -> tuple[str, str]:
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    kind = rng.randrange(6)
    a, b = rng.randint(3, 60), rng.randint(2, 30)
    if kind == 0:
        q = f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?"
        ans = a + b
        steps = f"{name} has {a} + {b} = {ans} {item}."
    elif kind == 1:
        a = a + b
        q = f"{name} has {a} {item} and gives {b} to {other}. How many {item} does {name} have left?"
        ans = a - b
        steps = f"{name} has {a} - {b} = {ans} {item} left."
    elif kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        q = f"{name} buys {a} boxes with {b} {item} in each box. How many {item} does {name} buy?"
        ans = a * b
        steps = f"{name} buys {a} * {b} = {ans} {item}."
    elif kind == 3:
        b, per = rng.randint(2, 9), rng.randint(2, 12)
        a = b * per
        q = f"{name} shares {a} {item} equally among {b} friends. How many {item} does each friend get?"
        ans = per
        steps = f"Each friend gets {a} / {b} = {ans} {item}."
    elif kind == 4:
        c = rng.randint(1, b)
        q = (f"{name} has {a} {item}. {other} gives {name} {b} more, and then {name} loses {c}. "
             f"How many {item} does {name} have now?")
        mid = a + b
        ans = mid - c
        steps = f"After the gift {name} has {a} + {b} = {mid} {item}. After losing {c}, {name} has {mid} - {c} = {ans}."
    else:
        n, price = rng.randint(2, 9), rng.randint(2, 15)
        q = f"One of {other}'s {item} costs {price} dollars. How many dollars do {n} of them cost?"
        ans = n * price
        steps = f"{n} of them cost {n} * {price} = {ans} dollars."
    return q, f"{steps}\n#### {ans}"


def record(q: str, a: str) -> dict:
    return {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}


def main(n_train: int = 600, n_test: int = 60, n_validation: int = 60, seed: int = 20261125) -> None:
    rng = random.Random(seed)
    seen, rows = set(), []
    while len(rows) < n_train + n_test + n_validation:
        q, a = problem(rng)
        if q not in seen:
            seen.add(q)
            rows.append(record(q, a))
    here = os.path.dirname(os.path.abspath(__file__))
    parts = (("train.jsonl", rows[:n_train]), ("test.jsonl", rows[n_train:n_train + n_test]),
             ("test_final.jsonl", rows[n_train + n_test:]))
    for name, part in parts:
        with open(os.path.join(here, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
        print(f"wrote {len(part)} examples to {os.path.join(here, name)}")


if __name__ == "__main__":
    main()
