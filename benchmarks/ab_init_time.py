"""Interleaved A/B of get_peft_model init time on SmolLM2-135M-Instruct between two checkouts of this repository
(for example the code before and after a restructuring), DuDe beside peft's PiSSA+DoRA as the control: peft's code is
the same on both sides, so its before/after ratio shows the machine's noise.

    git worktree add /tmp/before <commit>
    python -m benchmarks.ab_init_time --before /tmp/before --after . --rounds 4 --out benchmarks/results/ab_init_time/x.md

Each measurement is one fresh process of that checkout's `benchmarks/bench_dude.py --worker init METHOD`; the sides
alternate order every round; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from benchmarks.common import ROOT, machine, markdown_table, stamp, write_report

METHODS = ["dude_exact", "dude_rand4", "pissa_dora", "pissa4_dora"]


def measure(root: str, method: str) -> float:
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_dude.py"), "--worker", "init",
                           method, "--threads", "2"], capture_output=True, text=True, env=env, cwd=root)
    if proc.returncode:
        sys.exit(f"error: {root} {method}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["init_s"]


def report(res: dict, command: str, out: str) -> None:
    before, after = res
    rows = []
    for m in METHODS:
        b, a = statistics.median(res[before][m]), statistics.median(res[after][m])
        rows.append([m, f"{b:.2f}", f"{a:.2f}", f"{a / b:.3f}"])
    ratio = {side: (statistics.median(res[side]["dude_exact"]) / statistics.median(res[side]["pissa_dora"]),
                    statistics.median(res[side]["dude_rand4"]) / statistics.median(res[side]["dude_exact"]))
             for side in res}
    text = "\n\n".join([
        "# get_peft_model init time, A/B between two checkouts (SmolLM2-135M-Instruct, r=16)",
        f"Command: `{command}`  \nMachine: {machine()}  \nDate: {stamp()}",
        markdown_table(["init", f"{before} (s, median)", f"{after} (s, median)", "after / before"], rows),
        markdown_table(["side", "DuDe exact / peft pissa", "DuDe randomized / DuDe exact"],
                       [[side, f"{r[0]:.3f}", f"{r[1]:.3f}"] for side, r in ratio.items()]),
        "peft's PiSSA rows run the same peft code on both sides: their after/before ratios are the machine's noise "
        "for this measurement.",
    ])
    write_report(out, text, res)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="checkout (directory) of the code before")
    ap.add_argument("--after", default=ROOT, help="checkout of the code after (default: this one)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--labels", default="before,after")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "ab_init_time", "init_ab.md"))
    args = ap.parse_args()
    labels = args.labels.split(",")
    sides = dict(zip(labels, (args.before, args.after)))
    res = {label: {m: [] for m in METHODS} for label in labels}
    for rnd in range(args.rounds):
        for m in METHODS:
            for label, root in (sides.items() if rnd % 2 == 0 else reversed(list(sides.items()))):
                res[label][m].append(measure(root, m))
                print(rnd, label, m, f"{res[label][m][-1]:.2f}", flush=True)
    report(res, "python -m benchmarks.ab_init_time " + " ".join(sys.argv[1:]), args.out)


if __name__ == "__main__":
    main()
