"""Do the methods deliver? LoRA, PiSSA, DoRA, DuDe, CorDA-KPM and CorDA-IPM on SmolLM2-135M-Instruct (issue 6).

Each method fine-tunes the packaged SmolLM2-135M-Instruct on GSM8K train at r=16 (lora_alpha 16) on all linear
projections, with the same number of steps, batch and sequence length, through `trl_recipes.sft`. Its learning rate is
the best of a small grid, chosen on seed 0 by the answer NLL of problems held out from GSM8K *train*; two more seeds
then run at that rate (a seed fixes the order of the training batches, the same for every method, and LoRA's random
init). Every adapter is evaluated on
  * the task: GSM8K *test* answer NLL and exact match of the final number (greedy);
  * knowledge retention: NQ-open (dev) gold-answer NLL and exact match, against the base model's;
and the runs record their loss curve, seconds per step and peak memory. CorDA-KPM is calibrated on NQ-open questions
of the EfficientQA dev file that are not among the evaluated NQ-open dev questions, CorDA-IPM on GSM8K train questions.

    python benchmarks/compare_methods.py              # ~1 hour on 2 CPU cores; writes benchmarks/results/compare_methods*

Runs go to two worker processes of one thread each (`--workers`; two 1-thread processes get ~1.25x the throughput of
one 2-thread process on this model). Finished runs and evaluations are cached in `--work_dir`, so an interrupted run
resumes where it stopped. The learning rate is selected on task validation loss only; the report's verdicts on the
papers' orderings are computed from the final runs by the fixed rules in `verdicts()`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import threading
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
                                                "--calibration_text_field", "question",
                                                "--calibration_cache", "{work}/kpm_covariance.safetensors"]),
    "CorDA-IPM": ("corda/config_ipm_cpu.yaml", ["--calibration_dataset", "{work}/ipm_calibration.jsonl",
                                                "--calibration_text_field", "question",
                                                "--calibration_cache", "{work}/ipm_covariance.safetensors"]),
}


# --- data ---------------------------------------------------------------------------------------------------------


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, rows):
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(path + ".tmp", path)


def prepare_data(data_dir: str, work: str, args) -> dict:
    """Disjoint splits written into the work directory (deterministic: the same on every invocation)."""
    for sub, name in (("gsm8k", "train.jsonl"), ("gsm8k", "test.jsonl"), ("nq_open", "NQ-open.dev.jsonl"),
                      ("nq_open", "NQ-open.efficientqa.dev.1.1.jsonl")):
        if not os.path.isfile(os.path.join(data_dir, sub, name)):
            sys.exit(f"error: {os.path.join(data_dir, sub, name)} not found. Fix: --data_dir with gsm8k/ and nq_open/ "
                     f"(GSM8K and NQ-open JSONL, as in ../shared/data).")
    rng = random.Random(0)
    train = read_jsonl(os.path.join(data_dir, "gsm8k", "train.jsonl"))
    rng.shuffle(train)
    val, train = train[: args.val_examples], train[args.val_examples :]
    test = read_jsonl(os.path.join(data_dir, "gsm8k", "test.jsonl"))[: args.task_examples]
    nq = read_jsonl(os.path.join(data_dir, "nq_open", "NQ-open.dev.jsonl"))[: args.knowledge_examples]
    kpm = read_jsonl(os.path.join(data_dir, "nq_open", "NQ-open.efficientqa.dev.1.1.jsonl"))
    evaluated = {r["question"].strip().lower() for r in nq}
    kpm = [r for r in kpm if r["question"].strip().lower() not in evaluated][: args.calibration_samples]
    paths = {k: os.path.join(work, f"{k}.jsonl") for k in ("train", "val", "test", "nq")}
    paths.update(kpm=os.path.join(work, "kpm_calibration.jsonl"), ipm=os.path.join(work, "ipm_calibration.jsonl"))
    # the training pool: far more examples than a run sees (steps × batch), each seed draws its own order from it;
    # a pool instead of all 7.4k problems spares every run TRL's tokenization of the whole set
    write_jsonl(paths["train"], train[: args.train_pool])
    write_jsonl(paths["val"], val)
    write_jsonl(paths["test"], test)
    write_jsonl(paths["nq"], nq)
    write_jsonl(paths["kpm"], [{"question": r["question"]} for r in kpm])
    write_jsonl(paths["ipm"], [{"question": r["question"]} for r in train[: args.calibration_samples]])
    return paths


# --- evaluation worker (a subprocess of the driver) -----------------------------------------------------------------


def evaluate_worker(args) -> None:
    """`--evaluate ADAPTER|base`: validation NLL, and with --full the task and knowledge metrics; JSON to --eval_out."""
    import torch

    from trl_recipes.dataset import prompt_and_reference
    from trl_recipes.evaluate import answer_nll, evaluate, load_for_eval

    paths = {k: os.path.join(args.work_dir, f"{k}.jsonl") for k in ("val", "test", "nq")}
    records = {k: read_jsonl(p) for k, p in paths.items()}
    adapter = None if args.evaluate == "base" else args.evaluate
    base, after, tokenizer = load_for_eval(args.model, adapter=adapter)
    model = after() if adapter else base
    torch.manual_seed(0)
    out = json.load(open(args.eval_out)) if os.path.isfile(args.eval_out) else {}  # the sweep's validation NLL
    if "val_nll" not in out:
        prompts, refs = zip(*(prompt_and_reference(r) for r in records["val"]))
        out["val_nll"] = statistics.mean(answer_nll(model, tokenizer, list(prompts), list(refs)))
    if args.full:
        result = evaluate(model, tokenizer, records["test"][: args.em_examples], records["nq"],
                          task_max_new_tokens=args.task_max_new_tokens, generation_batch_size=32)
        # the NLL over the whole test subset (exact match uses its first em_examples: generation is the slow part)
        tp, tr = zip(*(prompt_and_reference(r) for r in records["test"]))
        out.update(task_em=result["task"]["exact_match"],
                   task_nll=statistics.mean(answer_nll(model, tokenizer, list(tp), list(tr))),
                   knowledge_em=result["knowledge"]["exact_match"], knowledge_nll=result["knowledge"]["gold_nll"],
                   task_examples=result["task"]["examples"][:2], knowledge_examples=result["knowledge"]["examples"][:3])
    with open(args.eval_out + ".tmp", "w") as f:
        json.dump(out, f)
    os.replace(args.eval_out + ".tmp", args.eval_out)


# --- statistics and the verdicts -------------------------------------------------------------------------------------


def mean_std(xs):
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def paired(xs, ys):
    """Mean and standard error of the per-seed differences x − y (a seed gives every method the same batches)."""
    d = [x - y for x, y in zip(xs, ys)]
    return statistics.mean(d), (statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("inf"))


def early_loss(run, fraction=0.5):
    """Mean training loss over steps 2 .. half of the steps: how fast a method learns. Step 1's loss is computed
    before any update, on the unchanged base model (every init leaves the outputs unchanged), so it is left out."""
    hist = run["loss_history"]
    n = max(2, int(len(hist) * fraction))
    return statistics.mean(loss for _, loss in (hist[1:n] or hist[:1]))


def derived(results: dict, base: dict) -> dict:
    """Per method, per seed: task gain (GSM8K test NLL decrease), forgetting (NQ gold NLL increase), early loss."""
    return {m: {"gain": [base["task_nll"] - r["task_nll"] for r in runs],
                "forget": [r["knowledge_nll"] - base["knowledge_nll"] for r in runs],
                "early": [early_loss(r) for r in runs],
                "task_nll": [r["task_nll"] for r in runs]}
            for m, runs in results.items()}


def _diff(d, unit=""):
    return f"{d[0]:+.3f} ± {d[1]:.3f}{unit}"


def verdicts(results: dict, base: dict) -> list[tuple[str, str, str]]:
    """The papers' orderings, decided by fixed rules on the final runs: (claim, verdict, evidence).

    A difference counts when it exceeds twice its standard error over the paired seeds; "comparable task gain"
    means the GSM8K answer-NLL gain is at least 90% of the other method's."""
    d = derived(results, base)
    out = []
    if {"CorDA-KPM", "LoRA"} <= d.keys():
        kpm, lora = d["CorDA-KPM"], d["LoRA"]
        df, dg = paired(kpm["forget"], lora["forget"]), paired(kpm["gain"], lora["gain"])
        comparable = statistics.mean(kpm["gain"]) >= 0.9 * statistics.mean(lora["gain"])
        less = df[0] + 2 * df[1] < 0
        more = df[0] - 2 * df[1] > 0
        verdict = ("holds" if less and comparable else "does not hold" if more else
                   "not at comparable task gain" if less else "not shown (within noise)")
        out.append(("CorDA-KPM forgets less than LoRA at comparable task gain", verdict,
                    f"NQ gold NLL increase KPM {fmt(mean_std(kpm['forget']))} vs LoRA {fmt(mean_std(lora['forget']))} "
                    f"(paired difference {_diff(df)}); GSM8K NLL gain KPM {fmt(mean_std(kpm['gain']))} vs LoRA "
                    f"{fmt(mean_std(lora['gain']))} (difference {_diff(dg)}; comparable: {'yes' if comparable else 'no'})"))
    for other in ("PiSSA", "LoRA"):
        if {"CorDA-IPM", other} <= d.keys():
            ipm, o = d["CorDA-IPM"], d[other]
            de, dt = paired(ipm["early"], o["early"]), paired(ipm["task_nll"], o["task_nll"])
            verdict = ("holds" if de[0] + 2 * de[1] < 0 else "does not hold" if de[0] - 2 * de[1] > 0
                       else "not shown (within noise)")
            out.append((f"CorDA-IPM learns faster than {other}", verdict,
                        f"mean training loss over the first half of the steps IPM {fmt(mean_std(ipm['early']))} vs "
                        f"{other} {fmt(mean_std(o['early']))} (paired difference {_diff(de)}); final GSM8K test answer "
                        f"NLL difference IPM − {other} {_diff(dt)}"))
    if {"DuDe", "DoRA"} <= d.keys():
        dude, dora = d["DuDe"], d["DoRA"]
        dt = paired(dude["task_nll"], dora["task_nll"])
        matches = dt[0] - 2 * dt[1] <= 0  # not worse beyond noise
        s_dude, s_dora = mean_std(dude["task_nll"])[1], mean_std(dora["task_nll"])[1]
        f_dude, f_dora = mean_std(dude["forget"])[1], mean_std(dora["forget"])[1]
        smaller = s_dude < s_dora
        verdict = ("holds" if matches and smaller else "does not hold" if not matches else
                   "matches, spread not smaller")
        out.append(("DuDe at least matches DoRA, with a smaller spread over seeds", verdict,
                    f"GSM8K test answer NLL DuDe {fmt(mean_std(dude['task_nll']))} vs DoRA "
                    f"{fmt(mean_std(dora['task_nll']))} (paired difference {_diff(dt)}); std over seeds of the task NLL "
                    f"DuDe {s_dude:.4f} vs DoRA {s_dora:.4f}, of the NQ change DuDe {f_dude:.4f} vs DoRA {f_dora:.4f}; "
                    f"with {len(dude['task_nll'])} seeds each a std ratio is only a rough indication"
                    + (" (a two-sided F-test at 5% needs a variance ratio above 39 for 3 vs 3 seeds)"
                       if len(dude["task_nll"]) == 3 and len(dora["task_nll"]) == 3 else "")))
    return out


def fmt(ms, digits=3):
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


# --- plots ----------------------------------------------------------------------------------------------------------


def plots(results, base, out_prefix):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for method, runs in results.items():
        histories = [r["loss_history"] for r in runs]
        n = min(len(h) for h in histories)
        steps = [s for s, _ in histories[0][:n]]
        ms = [mean_std([h[i][1] for h in histories]) for i in range(n)]
        line, = ax.plot(steps, [m for m, _ in ms], label=method)
        ax.fill_between(steps, [m - s for m, s in ms], [m + s for m, s in ms], color=line.get_color(), alpha=0.12)
    ax.set(xlabel="step", ylabel="training loss (mean ± std over seeds)",
           title="GSM8K fine-tuning, SmolLM2-135M, r=16, each method at its best learning rate")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_prefix + "_loss.png", dpi=120)
    plt.close(fig)

    d = derived(results, base)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for method in results:
        gain, forget = d[method]["gain"], d[method]["forget"]
        dots = ax.scatter(gain, forget, alpha=0.35)
        ax.errorbar(statistics.mean(gain), statistics.mean(forget), xerr=mean_std(gain)[1],
                    yerr=mean_std(forget)[1], fmt="o", capsize=3, color=dots.get_facecolor()[0], label=method)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set(xlabel="task gain: GSM8K test answer NLL decrease →", ylabel="forgetting: NQ-open gold NLL increase ↓",
           title="knowledge change vs task gain (dots: seeds; bars: mean ± std)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_prefix + "_knowledge_vs_task.png", dpi=120)
    plt.close(fig)


# --- driver ---------------------------------------------------------------------------------------------------------


class Driver:
    """Runs training and evaluation subprocesses, at most `workers` at a time, each with its share of the cores."""

    def __init__(self, args, paths):
        self.args, self.paths = args, paths
        self.slots = threading.Semaphore(args.workers)
        self.threads = str(max(1, (os.cpu_count() or 2) // args.workers))
        self.lock = threading.Lock()
        from tqdm import tqdm

        self.bar = tqdm(total=0, desc="runs (train + evaluate)", unit="run", dynamic_ncols=True)

    def plan(self, n):
        with self.lock:
            self.bar.total += n
            self.bar.refresh()

    def _subprocess(self, cmd, what):
        env = {**os.environ, "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": self.threads}
        with self.slots:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{what} failed:\n{proc.stderr[-3000:]}")

    def train(self, method, lr, seed) -> str:
        a = self.args
        recipe, extra = METHODS[method]
        out = os.path.join(a.work_dir, "runs", f"{method}_lr{lr:g}_s{seed}")
        if os.path.isfile(os.path.join(out, "metrics.json")):
            return out  # finished before: the driver resumes
        cmd = [sys.executable, "-m", "trl_recipes.sft", "--config", os.path.join(SMOL, recipe),
               "--dataset_name", self.paths["train"], "--output_dir", out, "--learning_rate", str(lr),
               "--seed", str(seed), "--max_steps", str(a.steps), "--per_device_train_batch_size", str(a.batch_size),
               "--max_length", str(a.max_length), "--logging_steps", "1", "--eval_examples", "0",
               "--calibration_samples", str(a.calibration_samples), "--warmup_steps", str(max(a.steps // 10, 1)),
               *(["--model_name_or_path", a.model] if a.model else []),
               *[e.format(work=a.work_dir) for e in extra]]
        self._subprocess(cmd, f"training {method} lr={lr:g} seed={seed}")
        return out

    def evaluate(self, adapter, out_file, full) -> dict:
        if os.path.isfile(out_file):
            ev = json.load(open(out_file))
            if not full or "task_nll" in ev:
                return ev
        a = self.args
        cmd = [sys.executable, os.path.abspath(__file__), "--evaluate", adapter or "base", "--eval_out", out_file,
               "--work_dir", a.work_dir, "--em_examples", str(a.em_examples),
               "--task_max_new_tokens", str(a.task_max_new_tokens), *(["--full"] if full else []),
               *(["--model", a.model] if a.model else [])]
        self._subprocess(cmd, f"evaluation of {adapter or 'the base model'}")
        return json.load(open(out_file))

    def run(self, method, lr, seed, full) -> dict:
        t = time.time()
        out = self.train(method, lr, seed)
        ev = self.evaluate(os.path.join(out, "adapter"), os.path.join(out, "compare_eval.json"), full)
        metrics = json.load(open(os.path.join(out, "metrics.json")))
        with self.lock:
            self.bar.update(1)
            self.bar.write(f"  {method:9s} lr={lr:<7g} seed={seed}: validation NLL {ev['val_nll']:.4f}"
                           + (f", test NLL {ev['task_nll']:.4f}, NQ NLL {ev['knowledge_nll']:.4f}" if full else "")
                           + f" ({time.time() - t:.0f} s)")
        return {**ev, "loss_history": metrics["loss_history"], "seconds_per_step": metrics["seconds_per_step"],
                "train_seconds": metrics["train_seconds"], "peak_rss_mb": metrics["peak_rss_mb"], "lr": lr,
                "seed": seed}

    def method(self, method, lrs) -> tuple[dict, float, list]:
        """Sweep on seed 0 (selected on the validation NLL), extend past a winning edge, then the other seeds."""
        a = self.args
        sweep = {lr: self.run(method, lr, 0, full=False) for lr in lrs}
        # a best rate on the edge of the grid is not a best rate: extend the grid one step beyond that edge
        # (geometric, same ratio as the grid's outer step), at most --lr_extensions times
        for _ in range(a.lr_extensions):
            tried = sorted(sweep)
            best = min(tried, key=lambda lr: sweep[lr]["val_nll"])
            if len(tried) > 1 and best == tried[-1]:
                nxt = float(f"{best * tried[-1] / tried[-2]:.2g}")
            elif len(tried) > 1 and best == tried[0]:
                nxt = float(f"{best * tried[0] / tried[1]:.2g}")
            else:
                break
            self.plan(1)
            sweep[nxt] = self.run(method, nxt, 0, full=False)
        best = min(sweep, key=lambda lr: sweep[lr]["val_nll"])
        runs = [self.run(method, best, seed, full=True) for seed in range(a.seeds)]
        return sweep, best, runs


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_dir", default=os.path.join(os.path.dirname(ROOT), "shared", "data"),
                    help="folder with gsm8k/{train,test}.jsonl and nq_open/ (NQ-open dev and EfficientQA dev)")
    ap.add_argument("--work_dir", default=os.path.join(ROOT, "outputs", "compare"))
    ap.add_argument("--model", default=None, help="base model (default: the packaged SmolLM2-135M-Instruct)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--lrs", default="1e-4,4e-4,1.6e-3", help="learning-rate grid, swept on seed 0")
    ap.add_argument("--lr_extensions", type=int, default=1,
                    help="extend the grid past an edge that wins, this many steps at most")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--max_length", type=int, default=256)
    ap.add_argument("--train_pool", type=int, default=2000, help="GSM8K train problems the runs draw from")
    ap.add_argument("--calibration_samples", type=int, default=256)
    ap.add_argument("--val_examples", type=int, default=40)
    ap.add_argument("--task_examples", type=int, default=60, help="GSM8K test problems for the NLL")
    ap.add_argument("--em_examples", type=int, default=20, help="of which answered by generation for exact match")
    ap.add_argument("--task_max_new_tokens", type=int, default=160)
    ap.add_argument("--knowledge_examples", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2, help="parallel runs (the cores are split between them)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "compare_methods"))
    # internal: one evaluation in a worker process
    ap.add_argument("--evaluate", help=argparse.SUPPRESS)
    ap.add_argument("--eval_out", help=argparse.SUPPRESS)
    ap.add_argument("--full", action="store_true", help=argparse.SUPPRESS)
    return ap


def main() -> None:
    args = build_parser().parse_args()
    if args.evaluate:
        return evaluate_worker(args)

    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        sys.exit(f"error: --methods {','.join(unknown)}: unknown. Fix: a comma list of {', '.join(METHODS)}.")
    os.makedirs(os.path.join(args.work_dir, "runs"), exist_ok=True)
    paths = prepare_data(args.data_dir, args.work_dir, args)
    methods = args.methods.split(",")
    lrs = [float(x) for x in args.lrs.split(",")]
    t0 = time.time()
    driver = Driver(args, paths)
    driver.plan(len(methods) * (len(lrs) + args.seeds))  # seed 0 at the chosen rate: its full evaluation

    base_box, outcome, errors = {}, {}, []

    def guarded(key, fn, *a):
        try:
            outcome[key] = fn(*a)
        except Exception as exc:  # noqa: BLE001 - reported after the other methods finish
            errors.append(f"{key}: {exc}")

    threads = [threading.Thread(target=guarded, args=("base", lambda: base_box.setdefault("base", driver.evaluate(
        None, os.path.join(args.work_dir, "base_eval.json"), full=True))))]
    threads += [threading.Thread(target=guarded, args=(m, driver.method, m, lrs)) for m in methods]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    driver.bar.close()
    if errors:
        sys.exit("error: " + "\n".join(errors))
    minutes = (time.time() - t0) / 60
    base = base_box["base"]
    sweep = {m: outcome[m][0] for m in methods}
    best_lr = {m: outcome[m][1] for m in methods}
    results = {m: outcome[m][2] for m in methods}
    write_report(args, base, sweep, best_lr, results, lrs, minutes)


def write_report(args, base, sweep, best_lr, results, lrs, minutes) -> None:
    methods = list(results)
    every = {(m, lr, 0): r for m in methods for lr, r in sweep[m].items()}
    every.update({(m, r["lr"], r["seed"]): r for m in methods for r in results[m]})
    n_runs, train_minutes = len(every), sum(r["train_seconds"] for r in every.values()) / 60
    rows = []
    for method, runs in results.items():
        get = lambda k: mean_std([r[k] for r in runs])  # noqa: E731
        step = min(args.steps // 2, len(runs[0]["loss_history"])) - 1
        rows.append([
            method, f"{best_lr[method]:g}", fmt(get("task_nll")), fmt(get("task_em"), 2),
            fmt(mean_std([r["knowledge_nll"] - base["knowledge_nll"] for r in runs])),
            fmt(mean_std([r["knowledge_em"] - base["knowledge_em"] for r in runs]), 2),
            fmt(mean_std([r["loss_history"][step][1] for r in runs])),
            fmt(mean_std([r["loss_history"][-1][1] for r in runs])),
            f"{statistics.median(r['seconds_per_step'] for r in runs):.2f}",
            f"{statistics.mean(r['peak_rss_mb'] for r in runs):.0f}",
        ])
    all_lrs = sorted({lr for m in methods for lr in sweep[m]})
    sweep_rows = [[m, *[f"{sweep[m][lr]['val_nll']:.4f}" if lr in sweep[m] else "–" for lr in all_lrs],
                   f"{best_lr[m]:g}"] for m in methods]
    verdict_rows = [[claim, f"**{verdict}**", evidence] for claim, verdict, evidence in verdicts(results, base)]
    plots(results, base, args.out)
    cmd = (f"python benchmarks/compare_methods.py --lrs {args.lrs} --seeds {args.seeds} --steps {args.steps} "
           f"--batch_size {args.batch_size} --max_length {args.max_length} --train_pool {args.train_pool} "
           f"--calibration_samples {args.calibration_samples} --val_examples {args.val_examples} "
           f"--task_examples {args.task_examples} --em_examples {args.em_examples} "
           f"--knowledge_examples {args.knowledge_examples} --lr_extensions {args.lr_extensions} "
           f"--workers {args.workers}" + (f" --model {args.model}" if args.model else ""))
    name = os.path.basename(args.out)
    model = os.path.basename(args.model.rstrip("/")) if args.model else "SmolLM2-135M-Instruct"
    defaults = vars(build_parser().parse_args([]))
    same = all(getattr(args, k) == defaults[k] for k in defaults if k not in ("work_dir", "out", "data_dir"))
    report = "\n\n".join([
        f"# {', '.join(methods)} on {model} (GSM8K, r=16)",
        f"Command: `{cmd}`" + (" (the defaults: `python benchmarks/compare_methods.py`)" if same else "")
        + "  \n"
        f"Machine: {machine()}; {args.workers} runs at a time, {max(1, (os.cpu_count() or 2) // args.workers)} "
        f"thread(s) each  \nDate: {stamp()}  \nRuns: {n_runs} training runs, {train_minutes:.0f} min of training "
        f"summed over runs; wall time of this invocation {minutes:.0f} min (finished runs in the work directory are "
        f"reused)",
        f"Setup: {model} (fp32, CPU), r=16 and lora_alpha=16 on q/k/v/o/gate/up/down, **{args.steps} "
        f"steps of batch {args.batch_size}** (sequences ≤ {args.max_length} tokens, completion-only loss, "
        f"{args.steps * args.batch_size} examples per run drawn from a pool of {args.train_pool} GSM8K train "
        f"problems), AdamW, cosine schedule with {max(args.steps // 10, 1)} warmup step(s), {args.seeds} seeds "
        f"(a seed fixes the batches, the same for every method, and LoRA's random init). Learning rate: the best of "
        f"{lrs} on seed 0 by the answer NLL of {args.val_examples} problems held out from GSM8K train; a rate winning "
        f"on the grid's edge extends the grid one step past it (up to {args.lr_extensions} time(s)). Task: GSM8K "
        f"test, answer NLL on {args.task_examples} problems, exact match of the final number on the first "
        f"{args.em_examples} (greedy, ≤ {args.task_max_new_tokens} new tokens). Knowledge: NQ-open dev, "
        f"{args.knowledge_examples} questions, gold-answer NLL and normalised exact match of a short greedy answer. "
        f"CorDA-KPM calibrated on {args.calibration_samples} EfficientQA-dev questions (none of the evaluated ones), "
        f"CorDA-IPM on {args.calibration_samples} GSM8K train questions.",
        f"Base model: GSM8K test answer NLL {base['task_nll']:.3f}, exact match {base['task_em']:.2f}; NQ-open gold "
        f"NLL {base['knowledge_nll']:.3f}, exact match {base['knowledge_em']:.2f}; GSM8K validation NLL "
        f"{base['val_nll']:.3f}.",
        "## Results (mean ± std over seeds)\n\n" + markdown_table(
            ["method", "lr", "GSM8K answer NLL ↓", "GSM8K EM ↑", "NQ gold NLL change ↓ (forgetting)",
             "NQ EM change", f"train loss @ step {args.steps // 2}", "train loss @ last",
             "s/step (median)", "peak RSS MB"], rows),
        "## The papers' orderings at this scale\n\nDecided by fixed rules (`verdicts()` in the script): a difference "
        "counts when it exceeds twice its standard error over the seeds, paired by seed (the same batches); "
        "\"comparable task gain\" means at least 90% of the other method's GSM8K answer-NLL gain; \"learns faster\" "
        "compares the mean training loss over the first half of the steps.\n\n"
        + markdown_table(["claim", "verdict", "evidence (mean ± std over seeds; paired differences ± standard error)"],
                         verdict_rows),
        "## Learning-rate sweep (seed 0, GSM8K validation answer NLL)\n\n" + markdown_table(
            ["method", *[f"lr {lr:g}" for lr in all_lrs], "chosen"], sweep_rows),
        f"Timing: seconds per step and peak memory come from these training runs, {args.workers} at a time on a "
        f"shared machine (median over seeds); they rank the methods only roughly. Clean side-by-side step times are "
        f"in [dude_smollm2.md](dude_smollm2.md) and [corda_smollm2.md](corda_smollm2.md).",
        f"Plots: [loss curves]({name}_loss.png), [knowledge change vs task gain]({name}_knowledge_vs_task.png).",
    ])
    with open(args.out + ".md", "w") as f:
        f.write(report + "\n")
    with open(args.out + ".json", "w") as f:
        json.dump({"base": base, "sweep": {m: {str(k): v for k, v in d.items()} for m, d in sweep.items()},
                   "results": results, "best_lr": best_lr, "verdicts": verdicts(results, base),
                   "args": {k: v for k, v in vars(args).items() if k not in ("evaluate", "eval_out", "full")}},
                  f, indent=1)
    print(report)


if __name__ == "__main__":
    main()
