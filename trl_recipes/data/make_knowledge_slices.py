"""Write the packaged NQ-open slices from the upstream files (a maintainer's tool; users get the slices with the package).

    python -m trl_recipes.data.make_knowledge_slices --nq_open_dir DIR   # DIR: NQ-open.dev.jsonl and
                                                                          # NQ-open.efficientqa.dev.1.1.jsonl

Both files come from https://github.com/google-research-datasets/natural-questions (folder `nq_open/`, CC BY-SA 3.0).
The slices, and why each is what it is (PROVENANCE.md beside this file gives their sha256):

* `nq_open_kpm_calibration.jsonl`: the 256 NQ-open dev records that the KPM recipe calibrated on when it read the
  whole file (`calibrate`'s seeded subset: `random.Random(0).shuffle` of the record indices, the first 256), in that
  order. With exactly 256 records `calibrate` takes them all in file order, so the recipe calibrates on the same
  conversations, token for token, as in the runs that measured it.
* `efficientqa_knowledge_eval.jsonl`: the first 200 EfficientQA dev records (file order) whose question is not an
  NQ-open dev question (lower case, outer spaces stripped): the knowledge set of `benchmarks.recipe_forgetting`,
  disjoint from the whole NQ-open dev file the calibration slice comes from.
* `efficientqa_knowledge_final.jsonl`: the next 200 such records: the final knowledge test set. The recipes'
  rates were chosen on `efficientqa_knowledge_eval.jsonl`, which benchmarks now use as their validation split.
"""

from __future__ import annotations

import argparse
import json
import os
import random

from peft_ext import read_jsonl

HERE = os.path.dirname(os.path.abspath(__file__))
CALIBRATION_SAMPLES, CALIBRATION_SEED, KNOWLEDGE_EXAMPLES = 256, 0, 200


def calibration_slice(dev: list[dict]) -> list[dict]:
    order = list(range(len(dev)))
    random.Random(CALIBRATION_SEED).shuffle(order)
    return [dev[i] for i in order[:CALIBRATION_SAMPLES]]


def knowledge_slices(dev: list[dict], efficientqa: list[dict]) -> tuple[list[dict], list[dict]]:
    """(eval, final): the first 200 EfficientQA dev records whose question is not in NQ-open dev, the next 200."""
    seen = {r["question"].strip().lower() for r in dev}
    pool = [r for r in efficientqa if r["question"].strip().lower() not in seen]
    return pool[:KNOWLEDGE_EXAMPLES], pool[KNOWLEDGE_EXAMPLES:2 * KNOWLEDGE_EXAMPLES]


def write(name: str, records: list[dict]) -> None:
    with open(os.path.join(HERE, name), "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in records)
    print(f"wrote {len(records)} records to {os.path.join(HERE, name)}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nq_open_dir", required=True, help="folder with the upstream nq_open JSONL files")
    args = ap.parse_args(argv)
    dev = read_jsonl(os.path.join(args.nq_open_dir, "NQ-open.dev.jsonl"))
    efficientqa = read_jsonl(os.path.join(args.nq_open_dir, "NQ-open.efficientqa.dev.1.1.jsonl"))
    write("nq_open_kpm_calibration.jsonl", calibration_slice(dev))
    evaluation, final = knowledge_slices(dev, efficientqa)
    write("efficientqa_knowledge_eval.jsonl", evaluation)
    write("efficientqa_knowledge_final.jsonl", final)


if __name__ == "__main__":
    main()
