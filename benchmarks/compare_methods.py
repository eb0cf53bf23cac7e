"""Do the methods deliver? LoRA, PiSSA, DoRA, DuDe, CorDA-KPM and CorDA-IPM on SmolLM2-135M-Instruct (issue 6).

Each method fine-tunes the packaged SmolLM2-135M-Instruct on GSM8K train at r=16 on all linear projections, with
the same number of steps, batch and sequence length, through `trl_recipes.sft`. Its learning rate is the better of a
small grid, chosen on seed 0 by the answer NLL on a validation split held out from GSM8K *train*; then two more seeds
run at that rate. Every adapter is evaluated on
  * the task: GSM8K *test* answer NLL and exact match of the final number;
  * knowledge retention: NQ-open (dev) gold-answer NLL and exact match, against the base model's;
and the runs record their loss curve, seconds per step and peak memory. CorDA-KPM is calibrated on NQ-open questions
from the EfficientQA dev file (disjoint from the evaluated NQ-open dev questions), CorDA-IPM on GSM8K train questions.

    python benchmarks/compare_methods.py        # about 2 hours on 2 CPU cores; writes benchmarks/results/compare_*

or split over two drivers that share the work directory (a lock per run), then collect (every run cached):

    OMP_NUM_THREADS=1 python benchmarks/compare_methods.py --methods LoRA,PiSSA,DoRA --out /tmp/a &
    OMP_NUM_THREADS=1 python benchmarks/compare_methods.py --methods DuDe,CorDA-KPM,CorDA-IPM --out /tmp/b
    wait; python benchmarks/compare_methods.py

The learning rate is selected on task validation loss only; nothing here looks at the knowledge metrics or at the
papers' expected orderings before the table is written.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import ROOT, machine, markdown_table, stamp  # noqa: E402

SMOL = os.path.join(ROOT, "trl_recipes", "recipes", "SmolLM2-135M-Instruct")
METHODS = {  # name -> (recipe, extra flags)
    "LoRA": ("lora/config_cpu.yaml", []),
    "PiSSA": ("pissa/config_cpu.yaml", []),
    "DoRA": ("dora/config_cpu.yaml", []),
    "DuDe": ("dude/config_cpu.yaml", []),
    "CorDA-KPM": ("corda/config_kpm_cpu.yaml", ["--calibration_dataset", "{work}/kpm_calibration.jsonl",
                                                "--calibration_text_field", "question"]),
    "CorDA-IPM": ("corda/config_ipm_cpu.yaml", ["--calibration_dataset", "{work}/ipm_calibration.jsonl",
                                                "--calibration_text_field", "question"]),
}


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, rows):
    """Written once and atomically: another driver's runs may be reading it (the content is deterministic)."""
    if os.path.isfile(path):
        return
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(path + ".tmp", path)


def prepare_data(data_dir: str, work: str, args) -> dict:
    """Disjoint splits, written once into the work directory."""
    rng = random.Random(0)
    train = read_jsonl(os.path.join(data_dir, "gsm8k", "train.jsonl"))
    rng.shuffle(train)
    val, train = train[: args.val_examples], train[args.val_examples :]
    test = read_jsonl(os.path.join(data_dir, "gsm8k", "test.jsonl"))[: args.task_examples]
    nq = read_jsonl(os.path.join(data_dir, "nq_open", "NQ-open.dev.jsonl"))[: args.knowledge_examples]
    kpm = read_jsonl(os.path.join(data_dir, "nq_open", "NQ-open.efficientqa.dev.1.1.jsonl"))
    evaluated = {r["question"].strip().lower() for r in nq}
    kpm = [r for r in kpm if r["question"].strip().lower() not in evaluated][: args.calibration_samples]
    paths = {"train": f"{work}/gsm8k_train.jsonl", "val": f"{work}/gsm8k_val.jsonl", "test": f"{work}/gsm8k_test.jsonl",
             "nq": f"{work}/nq_eval.jsonl", "kpm": f"{work}/kpm_calibration.jsonl", "ipm": f"{work}/ipm_calibration.jsonl"}
    write_jsonl(paths["train"], train)
    write_jsonl(paths["val"], val)
    write_jsonl(paths["test"], test)
    write_jsonl(paths["nq"], nq)
    write_jsonl(paths["kpm"], [{"question": r["question"]} for r in kpm])
    write_jsonl(paths["ipm"], [{"question": r["question"]} for r in train[: args.calibration_samples]])
    return paths


def train_run(method, lr, seed, work, paths, args) -> str:
    recipe, extra = METHODS[method]
    out = os.path.join(work, "runs", f"{method}_lr{lr:g}_s{seed}")
    if os.path.isfile(os.path.join(out, "metrics.json")):
        return out  # finished before (the driver can be re-run after an interruption)
    cmd = [sys.executable, "-m", "trl_recipes.sft", "--config", os.path.join(SMOL, recipe),
           "--dataset_name", paths["train"], "--output_dir", out, "--learning_rate", str(lr), "--seed", str(seed),
           "--max_steps", str(args.steps), "--per_device_train_batch_size", str(args.batch_size),
           "--max_length", str(args.max_length), "--logging_steps", "1", "--eval_examples", "0",
           "--calibration_samples", str(args.calibration_samples), "--warmup_steps", str(max(args.steps // 10, 1)),
           *[e.format(work=work) for e in extra]]
    t = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        raise RuntimeError(f"{method} lr={lr} seed={seed} failed:\n{proc.stderr[-3000:]}")
    print(f"  trained {method} lr={lr:g} seed={seed} in {time.time() - t:.0f} s", flush=True)
    return out


def evaluate_adapter(adapter_dir, records: dict, args, full: bool) -> dict:
    """After-training metrics (task validation NLL only for the sweep; everything for the final runs)."""
    import torch

    from trl_recipes.evaluate import answer_nll, evaluate, load_for_eval
    from trl_recipes.dataset import prompt_and_reference

    base, after, tokenizer = load_for_eval(None, adapter=adapter_dir)
    model = after() if adapter_dir else base
    torch.manual_seed(0)
    prompts, refs = zip(*(prompt_and_reference(r) for r in records["val"]))
    out = {"val_nll": statistics.mean(answer_nll(model, tokenizer, list(prompts), list(refs)))}
    if full:
        result = evaluate(model, tokenizer, records["test"][: args.em_examples], records["nq"],
                          task_max_new_tokens=args.task_max_new_tokens)
        # NLL over the full test subset (the exact match uses its first em_examples, generation is the slow part)
        tp, tr = zip(*(prompt_and_reference(r) for r in records["test"]))
        result["task"]["answer_nll"] = statistics.mean(answer_nll(model, tokenizer, list(tp), list(tr)))
        out.update(task_em=result["task"]["exact_match"], task_nll=result["task"]["answer_nll"],
                   knowledge_em=result["knowledge"]["exact_match"], knowledge_nll=result["knowledge"]["gold_nll"])
    return out


def mean_std(xs):
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt(ms, digits=3):
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def plots(results, base, out_prefix):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for method, runs in results.items():
        histories = [r["loss_history"] for r in runs]
        steps = [s for s, _ in histories[0]]
        mean = [statistics.mean(h[i][1] for h in histories) for i in range(len(steps))]
        ax.plot(steps, mean, label=method)
    ax.set(xlabel="step", ylabel="training loss (mean over seeds)", title="GSM8K fine-tuning, SmolLM2-135M, r=16")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_prefix + "_loss.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method, runs in results.items():
        gain = [base["task_nll"] - r["task_nll"] for r in runs]
        forget = [r["knowledge_nll"] - base["knowledge_nll"] for r in runs]
        ax.scatter(gain, forget, label=method, alpha=0.5)
        ax.errorbar(statistics.mean(gain), statistics.mean(forget), xerr=mean_std(gain)[1],
                    yerr=mean_std(forget)[1], fmt="o", capsize=3, color=ax.collections[-1].get_facecolor()[0])
    ax.axhline(0, color="gray", lw=0.8)
    ax.set(xlabel="task gain: GSM8K test answer NLL decrease", ylabel="forgetting: NQ-open gold NLL increase",
           title="knowledge change vs task gain (each dot a seed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_prefix + "_knowledge_vs_task.png", dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_dir", default=os.path.join(os.path.dirname(ROOT), "shared", "data"))
    ap.add_argument("--work_dir", default=os.path.join(ROOT, "outputs", "compare"))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--lrs", default="3e-5,1e-4,4e-4", help="learning-rate grid, swept on seed 0")
    ap.add_argument("--lr_extensions", type=int, default=1,
                    help="extend the grid past an edge that wins, this many steps at most")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--max_length", type=int, default=256)
    ap.add_argument("--calibration_samples", type=int, default=256)
    ap.add_argument("--val_examples", type=int, default=40)
    ap.add_argument("--task_examples", type=int, default=60, help="GSM8K test problems for the NLL")
    ap.add_argument("--em_examples", type=int, default=20, help="of which answered by generation for exact match")
    ap.add_argument("--task_max_new_tokens", type=int, default=160)
    ap.add_argument("--knowledge_examples", type=int, default=100)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "compare_methods"))
    args = ap.parse_args()

    os.makedirs(os.path.join(args.work_dir, "runs"), exist_ok=True)
    paths = prepare_data(args.data_dir, args.work_dir, args)
    records = {k: read_jsonl(paths[k]) for k in ("val", "test", "nq")}
    methods = args.methods.split(",")
    lrs = [float(x) for x in args.lrs.split(",")]
    t0 = time.time()
    base_file = os.path.join(args.work_dir, "base_eval.json")
    if not os.path.isfile(base_file):
        json.dump(evaluate_adapter(None, records, args, full=True), open(base_file, "w"))
    base = json.load(open(base_file))
    print(f"base model: {base}", flush=True)

    def run_and_eval(method, lr, seed, full):
        # a lock per run: two drivers (e.g. `--methods` split over two processes with OMP_NUM_THREADS=1) share the
        # work directory; one trains and evaluates a run, the other waits for it and reads the results
        lock = os.path.join(args.work_dir, "runs", f"{method}_lr{lr:g}_s{seed}.lock")
        while True:
            try:
                os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                break
            except FileExistsError:
                time.sleep(10)
        try:
            out = train_run(method, lr, seed, args.work_dir, paths, args)
            cache = os.path.join(out, "compare_eval.json")
            ev = json.load(open(cache)) if os.path.isfile(cache) else {}
            if "val_nll" not in ev or (full and "task_nll" not in ev):
                ev = evaluate_adapter(os.path.join(out, "adapter"), records, args, full=full)
                json.dump(ev, open(cache, "w"))
        finally:
            os.remove(lock)
        metrics = json.load(open(os.path.join(out, "metrics.json")))
        return {**ev, "loss_history": metrics["loss_history"], "seconds_per_step": metrics["seconds_per_step"],
                "peak_rss_mb": metrics["peak_rss_mb"], "lr": lr, "seed": seed}

    sweep, best_lr, results = {}, {}, {}
    for method in methods:  # learning-rate sweep on seed 0, selected on the GSM8K validation NLL
        sweep[method] = {lr: run_and_eval(method, lr, 0, full=False) for lr in lrs}
        # a best rate on the edge of the grid is not a best rate: extend the grid one step beyond that edge
        # (geometric, same ratio as the grid's outer step), at most --lr_extensions times
        for _ in range(args.lr_extensions):
            tried = sorted(sweep[method])
            best = min(tried, key=lambda lr: sweep[method][lr]["val_nll"])
            if best == tried[-1]:
                nxt = float(f"{best * tried[-1] / tried[-2]:.2g}")
            elif best == tried[0]:
                nxt = float(f"{best * tried[0] / tried[1]:.2g}")
            else:
                break
            sweep[method][nxt] = run_and_eval(method, nxt, 0, full=False)
        best_lr[method] = min(sweep[method], key=lambda lr: sweep[method][lr]["val_nll"])
        print(f"{method}: val NLL {[(lr, round(v['val_nll'], 4)) for lr, v in sorted(sweep[method].items())]} "
              f"-> lr {best_lr[method]:g}", flush=True)
    for method in methods:
        results[method] = [run_and_eval(method, best_lr[method], seed, full=True) for seed in range(args.seeds)]
    minutes = (time.time() - t0) / 60

    every = [json.load(open(os.path.join(args.work_dir, "runs", f"{m}_lr{lr:g}_s{seed}", "metrics.json")))
             for m in methods for lr, seed in {*((lr, 0) for lr in sweep[m]), *((best_lr[m], s) for s in range(args.seeds))}]
    n_runs, train_minutes = len(every), sum(m["train_seconds"] for m in every) / 60
    rows = []
    for method, runs in results.items():
        get = lambda k: mean_std([r[k] for r in runs])  # noqa: E731
        rows.append([
            method, f"{best_lr[method]:g}", fmt(get("task_nll")), fmt(get("task_em"), 2),
            fmt(mean_std([r["knowledge_nll"] - base["knowledge_nll"] for r in runs])),
            fmt(mean_std([r["knowledge_em"] - base["knowledge_em"] for r in runs]), 2),
            fmt(mean_std([r["loss_history"][min(9, len(r["loss_history"]) - 1)][1] for r in runs])),
            fmt(mean_std([r["loss_history"][-1][1] for r in runs])),
            f"{statistics.median(r['seconds_per_step'] for r in runs):.2f}",
            f"{statistics.mean(r['peak_rss_mb'] for r in runs):.0f}",
        ])
    all_lrs = sorted({lr for m in methods for lr in sweep[m]})
    sweep_rows = [[m, *[f"{sweep[m][lr]['val_nll']:.4f}" if lr in sweep[m] else "–" for lr in all_lrs],
                   f"{best_lr[m]:g}"] for m in methods]
    plots(results, base, args.out)
    cmd = (f"python benchmarks/compare_methods.py --lrs {args.lrs} --seeds {args.seeds} --steps {args.steps} "
           f"--batch_size {args.batch_size} --max_length {args.max_length} --calibration_samples "
           f"{args.calibration_samples} --val_examples {args.val_examples} --task_examples {args.task_examples} "
           f"--em_examples {args.em_examples} --knowledge_examples {args.knowledge_examples} "
           f"--lr_extensions {args.lr_extensions}")
    report = "\n\n".join([
        "# LoRA, PiSSA, DoRA, DuDe, CorDA-KPM, CorDA-IPM on SmolLM2-135M-Instruct (GSM8K, r=16)",
        f"Command: `{cmd}` (run here as two drivers side by side, see the script's docstring)  \nMachine: {machine()}  "
        f"\nDate: {stamp()}  \nRuns: {n_runs} training runs, {train_minutes:.0f} min of training in all (this "
        f"invocation: {minutes:.0f} min; finished runs are reused)",
        f"Setup: SmolLM2-135M-Instruct (fp32, CPU), r=16 and lora_alpha=16 on q/k/v/o/gate/up/down, {args.steps} "
        f"steps of batch {args.batch_size} (≤ {args.max_length} tokens, completion-only loss) on GSM8K train, "
        f"cosine schedule, {args.seeds} seeds. Learning rate: the best of {lrs} on seed 0 by the answer NLL of "
        f"{args.val_examples} problems held out from GSM8K train; a rate winning on the grid's edge extends the grid "
        f"one step past it (up to {args.lr_extensions} time(s)). Task: GSM8K test, answer NLL on "
        f"{args.task_examples} problems, exact match of the final number on the first {args.em_examples} (greedy, "
        f"≤ {args.task_max_new_tokens} new tokens). Knowledge: NQ-open dev, {args.knowledge_examples} questions, "
        f"gold-answer NLL and normalised exact match of a short greedy answer. CorDA-KPM calibrated on "
        f"{args.calibration_samples} EfficientQA-dev questions (none of the evaluated ones), CorDA-IPM on "
        f"{args.calibration_samples} GSM8K train questions.",
        f"Base model: GSM8K test answer NLL {base['task_nll']:.3f}, exact match {base['task_em']:.2f}; NQ-open gold "
        f"NLL {base['knowledge_nll']:.3f}, exact match {base['knowledge_em']:.2f}.",
        "## Results (mean ± std over seeds)\n\n" + markdown_table(
            ["method", "lr", "GSM8K answer NLL ↓", "GSM8K EM ↑", "NQ gold NLL change ↓ (forgetting)",
             "NQ EM change", "train loss @ step 10", "train loss @ last", "s/step (median over seeds)", "peak RSS MB"], rows),
        "## Learning-rate sweep (seed 0, GSM8K validation answer NLL)\n\n" + markdown_table(
            ["method", *[f"lr {lr:g}" for lr in all_lrs], "chosen"], sweep_rows),
        "Timing: seconds per step and peak memory come from these training runs, on a machine whose 2 cores were "
        "shared (most runs ran as two drivers side by side, `OMP_NUM_THREADS=1` each; the median over seeds is "
        "shown); they rank the methods only roughly. Clean side-by-side step times are in "
        "[dude_smollm2.md](dude_smollm2.md).",
        f"Plots: [loss curves]({os.path.basename(args.out)}_loss.png), "
        f"[knowledge change vs task gain]({os.path.basename(args.out)}_knowledge_vs_task.png).",
    ])
    with open(args.out + ".md", "w") as f:
        f.write(report + "\n")
    with open(args.out + ".json", "w") as f:
        json.dump({"base": base, "sweep": {m: {str(k): v for k, v in d.items()} for m, d in sweep.items()},
                   "results": results, "best_lr": best_lr, "args": vars(args)}, f, indent=1)
    print(report)


if __name__ == "__main__":
    main()
