"""Scale-out of the CorDA/DuDe init (issue 15), side by side in one run, each measurement in its own process:

1. SmolLM2-135M-Instruct, r=16, all linear projections, 256 calibration samples of up to 256 tokens (NQ-open for
   KPM, GSM8K for IPM): block-by-block vs whole-model `calibrate` vs peft's `preprocess_corda` (batch 1): wall time
   of calibration + decomposition, and extra peak memory over the loaded model (VmHWM reset after loading), beside
   `python -m peft_ext.plan`'s prediction.
2. Depth sweep on random Llama models with SmolLM2's widths (8, 16, 32 blocks; 64 random samples of 128 tokens):
   extra peak memory of `calibrate`, block by block vs whole-model.
3. 2 gloo ranks × 1 thread vs 1 process × 1 thread, a random 16-block model with SmolLM2's widths: DuDe
   `get_peft_model` and CorDA-IPM `calibrate` + `get_peft_model` (each rank half of 64 samples), time per rank.

    python -m benchmarks.bench_scaleout        # writes benchmarks/results/bench_scaleout/scaleout_smollm2.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks.common import (ROOT, SMOLLM2_TARGETS, add_calibration_arguments, machine, markdown_table, median,
                               peak_rss_since_reset_mb, reset_peak_rss, run_worker, stamp, write_report)

SCRIPT = "benchmarks.bench_scaleout"
SMOL_WIDTHS = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                   vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)


def _measure(model, kind: str, mode: str, data, tokenizer, n: int, max_length: int, batch_size: int) -> dict:
    """calibrate (or peft's preprocess_corda), then get_peft_model; times and peaks over the loaded model."""
    from peft import get_peft_model

    from peft_ext import CorDAConfig, calibrate, calibrate_with_peft, peft_corda_config

    base = peak_rss_since_reset_mb()
    reset_peak_rss()
    t = time.perf_counter()
    if kind == "peft":  # its hooks need batch 1; it also computes its decomposition here
        config = peft_corda_config(r=16, lora_alpha=16, target_modules=SMOLLM2_TARGETS, corda_method=mode)
        calibrate_with_peft(model, config, data, verbose=False)
    else:
        config = CorDAConfig(r=16, lora_alpha=16, target_modules=SMOLLM2_TARGETS, corda_method=mode)
        calibrate(model, config, data, tokenizer=tokenizer, num_samples=n, max_length=max_length,
                  batch_size=batch_size, sequential=kind == "sequential", verbose=False)
    out = {"calibration_s": time.perf_counter() - t, "calibration_peak_mb": peak_rss_since_reset_mb() - base}
    t = time.perf_counter()
    get_peft_model(model, config)
    out.update(decomposition_s=time.perf_counter() - t, total_peak_mb=peak_rss_since_reset_mb() - base)
    return out


def smol_worker(kind: str, mode: str, data_dir: str, n: int, max_length: int, batch_size: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.bench_corda import load_texts
    from trl_recipes.models import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    texts = load_texts(data_dir, mode, n)
    rows = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    with torch.no_grad():  # page the memory-mapped weights in
        model(input_ids=torch.tensor([rows[0][:4]]), use_cache=False)
    data = rows if kind == "peft" else texts
    return {"tokens": sum(map(len, rows)), **_measure(model, kind, mode, data, tokenizer, n, max_length, batch_size)}


def random_model(blocks: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=blocks, **SMOL_WIDTHS)).eval()


def random_batches(n: int, length: int, batch_size: int, rank: int = 0, world: int = 1) -> list:
    import torch

    from peft_ext.corda.calibration import batch_rows

    g = torch.Generator().manual_seed(1)
    rows = torch.randint(1, SMOL_WIDTHS["vocab_size"], (n, length), generator=g).tolist()
    return batch_rows(rows, batch_size, 0)[rank::world]


def depth_worker(kind: str, blocks: int, n: int, max_length: int, batch_size: int) -> dict:
    import torch

    model = random_model(blocks)
    with torch.no_grad():
        model(input_ids=torch.ones((1, 4), dtype=torch.long), use_cache=False)
    return _measure(model, kind, "ipm", random_batches(n, max_length, batch_size), None, n, max_length, batch_size)


def ranks_worker(method: str, blocks: int, n: int, max_length: int, batch_size: int) -> dict:
    """Under torchrun (or alone): the init's wall time on this rank; rank 0 returns every rank's."""
    import torch
    import torch.distributed as dist
    from peft import get_peft_model

    from peft_ext import CorDAConfig, DuDeConfig, calibrate

    torch.set_num_threads(1)
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    model = random_model(blocks)
    if distributed:
        dist.barrier()
    t = time.perf_counter()
    if method == "dude":
        config = DuDeConfig(r=16, lora_alpha=16, target_modules=SMOLLM2_TARGETS)
    else:
        config = CorDAConfig(r=16, lora_alpha=16, target_modules=SMOLLM2_TARGETS, corda_method="ipm")
        calibrate(model, config, random_batches(n, max_length, batch_size, rank, world), verbose=False)
    get_peft_model(model, config)
    times = [time.perf_counter() - t]
    if distributed:
        gathered = [None] * world
        dist.all_gather_object(gathered, times[0])
        times = gathered
        dist.destroy_process_group()
    return {"seconds_per_rank": times, "world": world}


def run_ranks(method: str, world: int, opts: list[str]) -> dict:
    args = ["--worker", "ranks", method, *opts]
    if world == 1:
        return run_worker(SCRIPT, args[1:], env_extra={"OMP_NUM_THREADS": "1"})
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", str(world), "-m", SCRIPT, *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-4000:])
    return next(json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{"))


def plan_numbers(n: int, max_length: int) -> dict:
    """`python -m peft_ext.plan`'s prediction for SmolLM2 at world 1, fp32 activations."""
    from peft_ext import DuDeConfig
    from peft_ext.plan import load_model_config, model_shape, plan
    from trl_recipes.models import default_model_path

    shape = model_shape(load_model_config(default_model_path()), DuDeConfig(r=16, target_modules=SMOLLM2_TARGETS))
    return plan(shape, method="corda", samples=n, max_length=max_length, world=1, act_bytes=4)


def _median_total_s(runs: list[dict]) -> float:
    """Median over rounds of calibration + decomposition seconds."""
    return median([r["calibration_s"] + r["decomposition_s"] for r in runs])


def part_smol(args, opts: list[str]) -> tuple[list, dict]:
    """Part 1, interleaved over rounds: for each mode, peft, whole-model, block by block; medians."""
    kinds = ("peft", "whole", "sequential")
    raw = {f"{kind}/{mode}": [] for mode in ("kpm", "ipm") for kind in kinds}
    for rnd in range(args.rounds):
        for key in raw:
            kind, mode = key.split("/")
            raw[key].append(run_worker(SCRIPT, ["smol", kind, mode, *opts]))
            print(f"[smol] round {rnd} {key}: {raw[key][-1]}", flush=True)
    planned = plan_numbers(args.samples, args.max_length)
    predicted = {"peft": planned["peak_peft_preprocess_corda"] + planned["peft_host_bytes"],  # all RAM here
                 "whole": planned["peak_whole_model"], "sequential": planned["peak_sequential"]}
    rows = []
    for key, runs in raw.items():
        kind, mode = key.split("/")
        med = {f: median([r[f] for r in runs]) for f in runs[0]}
        rows.append([mode.upper(), kind, med["calibration_s"], med["decomposition_s"],
                     _median_total_s(runs), med["calibration_peak_mb"],
                     med["total_peak_mb"], predicted[kind] / 2**20])
    return rows, raw


def part_depth(args) -> tuple[list, dict]:
    raw, rows = {}, []
    for blocks in (8, 16, 32):
        for kind in ("whole", "sequential"):
            raw[f"{kind}/{blocks}"] = r = run_worker(SCRIPT, ["depth", kind, str(blocks), "--samples", "64",
                                                              "--max_length", "128", "--batch_size", "8"])
            print(f"[depth] {blocks} {kind}: {r}", flush=True)
            rows.append([blocks, kind, r["calibration_s"], r["calibration_peak_mb"], r["total_peak_mb"]])
    return rows, raw


def part_ranks(args) -> tuple[list, dict]:
    opts = ["--blocks", "16", "--samples", "64", "--max_length", "128", "--batch_size", "8"]
    raw = {f"{method}/{world}": [] for method in ("dude", "corda") for world in (1, 2)}
    for rnd in range(args.rounds):
        for key in raw:
            method, world = key.split("/")
            raw[key].append(run_ranks(method, int(world), opts))
            print(f"[ranks] round {rnd} {key}: {raw[key][-1]}", flush=True)
    rows = []
    for method in ("dude", "corda"):
        one, two = (median([max(r["seconds_per_rank"]) for r in raw[f"{method}/{w}"]]) for w in (1, 2))
        per_rank = [median([r["seconds_per_rank"][k] for r in raw[f"{method}/2"]]) for k in range(2)]
        rows.append([method, one, two, ", ".join(f"{t:.1f}" for t in per_rank), two / one])
    return rows, raw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_calibration_arguments(ap)
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--parts", default="smol,depth,ranks")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the timed parts (smol, ranks), interleaved")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "bench_scaleout", "scaleout_smollm2.md"))
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, *rest = args.worker
        common = dict(n=args.samples, max_length=args.max_length, batch_size=args.batch_size)
        if kind == "smol":
            result = smol_worker(*rest, data_dir=args.data_dir, **common)
        elif kind == "depth":
            result = depth_worker(rest[0], int(rest[1]), **common)
        else:
            result = ranks_worker(rest[0], args.blocks, **common)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result))
        return
    report_parts(args)


def _goal(name: str, value: float, goal: float) -> list:
    return [name, value, f"≤ {goal}", "met" if value <= goal else "MISSED"]


def report_parts(args) -> None:
    parts = args.parts.split(",")
    opts = ["--data_dir", args.data_dir, "--samples", str(args.samples), "--max_length", str(args.max_length),
            "--batch_size", str(args.batch_size)]
    started = time.time()
    sections, raw, goals = [], {}, []
    if "smol" in parts:
        rows, raw["smol"] = part_smol(args, opts)
        goals += smol_goals(raw["smol"])
        sections.append(
            "## 1. SmolLM2-135M-Instruct: block by block vs whole-model vs peft's preprocess_corda\n\n"
            + markdown_table(["mode", "calibration", "calibrate s (peft: preprocess_corda)", "get_peft_model s",
                              "total s", "extra peak MB, calibration", "extra peak MB, with get_peft_model",
                              "planner's prediction MB"], rows)
            + "\n\nExtra peak: VmHWM over the RSS of the loaded model (reset after loading and one forward). The "
              "planner assumes every sample is max_length tokens long, an upper bound for the hidden-state cache.")
    if "depth" in parts:
        rows, raw["depth"] = part_depth(args)
        peak = {(r[0], r[1]): r[3] for r in rows}
        goals.append(_goal("block by block extra peak of calibrate, 32 / 8 blocks",
                           peak[(32, "sequential")] / peak[(8, "sequential")], 1.5))
        goals.append(["whole-model extra peak of calibrate, 32 / 8 blocks (reference)",
                      peak[(32, "whole")] / peak[(8, "whole")], "", ""])
        sections.append("## 2. Depth sweep, random models with SmolLM2's widths (64 × 128 random tokens, IPM)\n\n"
                        + markdown_table(["blocks", "calibration", "calibrate s", "extra peak MB, calibration",
                                          "extra peak MB, with get_peft_model"], rows))
    if "ranks" in parts:
        rows, raw["ranks"] = part_ranks(args)
        goals.append(_goal("DuDe get_peft_model, 2 ranks / 1 process", rows[0][4], 0.6))
        goals.append(["CorDA-IPM calibrate + get_peft_model, 2 ranks / 1 process (reference)", rows[1][4], "", ""])
        sections.append("## 3. 2 gloo ranks × 1 thread vs 1 process × 1 thread (random 16-block model, SmolLM2's "
                        "widths)\n\n" + markdown_table(["init", "1 process s", "2 ranks s (slowest)",
                                                        "2 ranks, s per rank", "ratio"], rows))
    command = " ".join(["python -m benchmarks.bench_scaleout", *opts[2:], "--parts", args.parts, "--rounds",
                        str(args.rounds)])
    report = "\n\n".join([
        "# Scale-out of the CorDA / DuDe init (issue 15)",
        f"Command: `{command}`  \nMachine: {machine()}  \nDate: {stamp()}; {(time.time() - started) / 60:.0f} min "
        f"in all. One process per measurement, r=16, q/k/v/o/gate/up/down. Parts 1 and 3: medians over "
        f"{args.rounds} interleaved rounds; part 2 (memory): one round.",
        "## Goals\n\n" + markdown_table(["measure", "measured", "goal", ""], goals),
        *sections,
    ])
    write_report(args.out, report, raw)


def smol_goals(raw: dict) -> list:
    goals = []
    for mode in ("kpm", "ipm"):
        def get(kind, field):
            return median([r[field] for r in raw[f"{kind}/{mode}"]])

        total = {k: _median_total_s(raw[f"{k}/{mode}"]) for k in ("peft", "sequential")}
        goals.append(_goal(f"{mode.upper()} block by block extra peak / peft's",
                           get("sequential", "total_peak_mb") / get("peft", "total_peak_mb"), 0.2))
        goals.append(_goal(f"{mode.upper()} block by block total time / peft's", total["sequential"] / total["peft"],
                           0.25))
    return goals


if __name__ == "__main__":
    main()
