"""Where a trained adapter's update acts: its output energy on the knowledge inputs and on the task inputs.

Per target layer, the update is ΔW = s·(B·A − B₀·A₀), the trained factors against their init (LoRA's B₀ is zero),
and for an input covariance C (Σ x xᵀ / tokens of a calibration set) its energy E_C = tr(ΔW C ΔWᵀ) is the mean
squared change of that layer's output over those tokens. Summed over the layers, for the knowledge covariance (NQ-open,
what KPM calibrates on) and a task one (GSM8K training conversations, what IPM calibrates on), the ratio
knowledge / task says how much an update disturbs knowledge inputs per unit of change on task inputs.

The update splits into B's move, read through A's init directions, and A's move:
ΔW = s·((B − B₀)·A₀ + B·(A − A₀)). For CorDA-KPM the first part reads only the directions KPM chose; the second brings
in whatever directions the task's gradient points to. Each part's energies are reported too (the two parts' energies
do not add up to the whole's: cross terms).

    python -m benchmarks.update_energy --work_dir outputs/compare60 \\
        --task_covariance outputs/compare/ipm_covariance.safetensors --out benchmarks/results/update_energy/update_energy_60
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import torch

from benchmarks.common import ROOT, markdown_table, stamp, write_report

RUN_NAME = re.compile(r"^(?P<arm>.+)_lr(?P<lr>[0-9.e-]+)_s(?P<seed>\d+)$")


def layer_factors(adapter_dir: str):
    """(layer name, A, B, A₀, B₀, scaling) per target layer of a saved adapter, in float64; A₀, B₀ are zero where the
    adapter keeps no init factors (LoRA)."""
    from safetensors import safe_open

    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        config = json.load(f)
    r, alpha = config["r"], config["lora_alpha"]
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{adapter_dir}: rank_pattern/alpha_pattern are not supported here (one scaling per adapter)")
    scaling = alpha / r ** 0.5 if config.get("use_rslora") else alpha / r
    with safe_open(os.path.join(adapter_dir, "adapter_model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        for key in sorted(k for k in keys if k.endswith("lora_A.weight")):
            prefix = key[: -len("lora_A.weight")]
            A, B = f.get_tensor(key).double(), f.get_tensor(prefix + "lora_B.weight").double()
            has_init = prefix + "lora_init_A" in keys
            A0 = f.get_tensor(prefix + "lora_init_A").double() if has_init else torch.zeros_like(A)
            B0 = f.get_tensor(prefix + "lora_init_B").double() if has_init else torch.zeros_like(B)
            yield prefix.removeprefix("base_model.model.").rstrip("."), A, B, A0, B0, scaling


def energy(delta: torch.Tensor, cov: torch.Tensor) -> float:
    return float(((delta @ cov) * delta).sum())


def update_energies(adapter_dir: str, knowledge: dict, task: dict) -> dict:
    """Summed over the layers: the energies of the whole update, of B's part and of A's part on the knowledge and
    task covariances (`knowledge`, `task`: layer name -> covariance), and A's relative move ‖A − A₀‖/‖A₀‖."""
    sums = dict.fromkeys(["know", "task", "know_B", "task_B", "know_A", "task_A", "dA2", "A02"], 0.0)
    for name, A, B, A0, B0, s in layer_factors(adapter_dir):
        if name not in knowledge or name not in task:
            raise ValueError(f"{adapter_dir}: layer {name} has no covariance in the knowledge or task cache. Fix: "
                             "caches calibrated on the same model and targets as the adapter.")
        ck, ct = knowledge[name].double(), task[name].double()
        whole, part_b, part_a = s * (B @ A - B0 @ A0), s * (B - B0) @ A0, s * B @ (A - A0)
        for suffix, delta in (("", whole), ("_B", part_b), ("_A", part_a)):
            sums["know" + suffix] += energy(delta, ck)
            sums["task" + suffix] += energy(delta, ct)
        sums["dA2"] += float(((A - A0) ** 2).sum())
        sums["A02"] += float((A0 ** 2).sum())
    return sums


def covariances(path: str) -> dict:
    from peft_ext.corda.cache import read_cache

    return {m: g.covariance for g in read_cache(path).groups for m in g.members}


def run_row(work_dir: str, run: str, base: dict, e: dict) -> list:
    match = RUN_NAME.match(run)
    arm, lr, seed = (match["arm"], float(match["lr"]), match["seed"]) if match else (run, None, "–")
    with open(os.path.join(work_dir, "runs", run, "compare_eval.json")) as f:
        ev = json.load(f)
    ratio = lambda k, t: f"{e[k] / e[t]:.3f}" if e[t] > 0 else "–"  # noqa: E731
    share = lambda k: f"{e[k] / e['task']:.3f}" if e["task"] > 0 else "–"  # noqa: E731
    evaluated = "task_nll" in ev  # a sweep run has only its validation NLL
    return [arm, f"{lr:g}" if lr is not None else "–", seed,
            f"{base['task_nll'] - ev['task_nll']:.3f}" if evaluated else "–",
            f"{ev['knowledge_nll'] - base['knowledge_nll']:+.3f}" if evaluated else "–",
            f"{e['know']:.4g}", f"{e['task']:.4g}",
            ratio("know", "task"), ratio("know_B", "task_B"), share("task_B"), ratio("know_A", "task_A"),
            share("task_A"), f"{(e['dA2'] / e['A02']) ** 0.5:.3f}" if e["A02"] > 0 else "–"]


HEADER = ["arm", "lr", "seed", "task gain (GSM8K NLL)", "NQ gold NLL change", "E knowledge", "E task",
          "knowledge / task", "B's part: knowledge / task", "B's part: E task / whole's", "A's part: knowledge / task",
          "A's part: E task / whole's", "‖A − A₀‖ / ‖A₀‖"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work_dir", required=True, help="a compare_methods work dir (runs/ARM_lrLR_sSEED/adapter)")
    ap.add_argument("--runs", default="", help="run names, comma separated (default: every run with an adapter)")
    ap.add_argument("--knowledge_covariance", default=None, help="default: WORK_DIR/kpm_covariance.safetensors")
    ap.add_argument("--task_covariance", required=True, help="a whole-model peft_ext cache of task inputs")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "update_energy", "update_energy"))
    return ap


def main() -> None:
    args = build_parser().parse_args()
    runs_dir = os.path.join(args.work_dir, "runs")
    runs = [r for r in args.runs.split(",") if r] or sorted(
        r for r in os.listdir(runs_dir) if os.path.isdir(os.path.join(runs_dir, r, "adapter")))
    missing = [r for r in runs if not os.path.isfile(os.path.join(runs_dir, r, "compare_eval.json"))]
    if missing:
        sys.exit(f"error: --runs {', '.join(missing)}: no evaluated run of that name under {runs_dir}.")
    know = covariances(args.knowledge_covariance or os.path.join(args.work_dir, "kpm_covariance.safetensors"))
    task = covariances(args.task_covariance)
    with open(os.path.join(args.work_dir, "base_eval.json")) as f:
        base = json.load(f)
    from tqdm import tqdm

    energies = {r: update_energies(os.path.join(runs_dir, r, "adapter"), know, task) for r in tqdm(runs, total=len(runs))}
    rows = [run_row(args.work_dir, r, base, e) for r, e in energies.items()]
    text = "\n\n".join([
        "# Where the updates act: output energy on knowledge and task inputs",
        f"Command: `python -m benchmarks.update_energy --work_dir {args.work_dir} --task_covariance "
        f"{args.task_covariance}" + (f" --runs {args.runs}" if args.runs else "") + "`  \nDate: " + stamp(),
        __doc__.split("\n\n    python")[0],
        markdown_table(HEADER, rows)])
    write_report(args.out + ".md", text, {"energies": energies, "base": base})


if __name__ == "__main__":
    main()
