"""Do the methods deliver? LoRA, PiSSA, DoRA, DuDe and CorDA (ours balanced and unbalanced, and peft's) on SmolLM2.

Each method fine-tunes the packaged SmolLM2-135M-Instruct on GSM8K train at r=16 (lora_alpha 16) on all linear
projections, with the same number of steps, batch and sequence length, through `trl_recipes.sft`. Its learning rate is
the best of a small grid, chosen on seed 0 by the answer NLL of problems held out from GSM8K *train*; two more seeds
then run at that rate (a seed fixes the order of the training batches, the same for every method, and LoRA's random
init). Every adapter is evaluated on
  * the task: GSM8K *test* answer NLL (and, with --em_examples, exact match of the final number, greedy);
  * knowledge retention: NQ-open (dev) gold-answer NLL and exact match, against the base model's;
and the runs record their loss curve, seconds per step, peak memory and the norms of the adapter factors at init.
The CorDA arms: ours with balanced factors (CorDA-KPM/IPM, the default), ours unbalanced (-unbalanced), ours balanced
with peft's per-sample max normalisation of the calibration activations (CorDA-IPM-maxnorm), and peft's own
`preprocess_corda` (peft-CorDA-KPM/IPM); every KPM arm calibrates on the same NQ-open questions of the EfficientQA
dev file (none of the evaluated NQ-open dev questions) with their answers, every IPM arm on the same GSM8K train
problems with their solutions; both as chat conversations, as the recipes calibrate.

    python -m benchmarks.compare_methods              # all eleven arms and the matched rates, ~2 hours on 2 CPU cores
    python -m benchmarks.compare_methods --methods LoRA,PiSSA,CorDA-IPM --out benchmarks/results/compare_methods/x   # a subset

Each run (its training, then its evaluation) is one subprocess; two run at a time with one thread each (`--workers`:
two 1-thread processes get ~1.25x the throughput of one 2-thread process on this model), the grid's extensions ahead
of the rest. Finished runs and evaluations are cached in `--work_dir`, so an interrupted run resumes where it stopped;
the report states the wall time of every invocation that worked on that directory. The learning rate is selected on
task validation loss only; the report's verdicts on the papers' orderings are computed from the final runs by the
fixed rules of benchmarks/verdicts.py.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time

from peft_ext import read_jsonl

from benchmarks.common import (DATA_FILES, ROOT, SMOL, Slots, add_data_dir_argument, data_file, fmt, machine, markdown_table,
                               mean_std, parallel, stamp, write_jsonl, write_report)
from benchmarks.plots import rate_curves, save_gain_forget, tradeoff_plot
from benchmarks.verdicts import (at_least_as_good_claim, curve_verdicts, derived, early_loss, equal_gain_rows,
                                 equal_gain_table, lora_rates, verdicts)

# the calibration files hold the records in the recipes' formats, so that every arm calibrates as its recipe does
_KPM = ["--calibration_dataset", "{work}/kpm_calibration.jsonl"]  # question + answers, as NQ-open
_IPM = ["--calibration_dataset", "{work}/ipm_calibration.jsonl"]  # question + answer: whole training conversations
_UNBALANCED, _PEFT = ["--corda_balance_factors", "false"], ["--corda_implementation", "peft"]
_MAXNORM = ["--calibration_sample_normalization", "max"]
_TRAIN_A = ["--train_lora_A", "true"]
METHODS = {  # name -> (recipe, extra flags); every CorDA arm of one mode calibrates on the same texts
    "LoRA": ("lora/config_cpu.yaml", []),
    "PiSSA": ("pissa/config_cpu.yaml", []),
    "DoRA": ("dora/config_cpu.yaml", []),
    "DuDe": ("dude/config_cpu.yaml", []),
    # the .safetensors names predate block-by-block calibration: an old work dir holds whole-model cache files there
    # (read as they are); a new one gets a folder of per-block files under the same name
    # KPM with A trained, as every KPM arm ran before corda_train_A existed (KPM's default is now A frozen)
    "CorDA-KPM": ("corda/config_kpm_cpu.yaml", [*_KPM, *_TRAIN_A, "--calibration_cache",
                                                "{work}/kpm_covariance.safetensors"]),
    "CorDA-IPM": ("corda/config_ipm_cpu.yaml", [*_IPM, "--calibration_cache", "{work}/ipm_covariance.safetensors"]),
    "CorDA-KPM-unbalanced": ("corda/config_kpm_cpu.yaml", [*_KPM, *_UNBALANCED, *_TRAIN_A, "--calibration_cache",
                                                           "{work}/kpm_covariance.safetensors"]),
    "CorDA-IPM-unbalanced": ("corda/config_ipm_cpu.yaml", [*_IPM, *_UNBALANCED, "--calibration_cache",
                                                           "{work}/ipm_covariance.safetensors"]),
    # peft's per-sample max normalisation of the calibration activations, on our balanced factors
    "CorDA-IPM-maxnorm": ("corda/config_ipm_cpu.yaml", [*_IPM, *_MAXNORM, "--calibration_cache",
                                                        "{work}/ipm_maxnorm_covariance"]),
    # KPM with its A factors kept at init (only B trains): the update reads only the directions KPM chose
    "CorDA-KPM-frozenA": ("corda/config_kpm_cpu.yaml", [*_KPM, "--train_lora_A", "false", "--calibration_cache",
                                                        "{work}/kpm_covariance.safetensors"]),
    "peft-CorDA-KPM": ("corda/config_kpm_cpu.yaml", [*_KPM, *_PEFT, "--calibration_cache",
                                                     "{work}/peft_kpm_covariance.pt"]),
    "peft-CorDA-IPM": ("corda/config_ipm_cpu.yaml", [*_IPM, *_PEFT, "--calibration_cache",
                                                     "{work}/peft_ipm_covariance.pt"]),
}
DEFAULT_LRS_FOR = "LoRA=1.6e-3,6.4e-3,2.6e-2;DoRA=1.6e-3,6.4e-3,2.6e-2"
# the default arms of our CorDA (balanced) that --matched_rates also runs at their peft counterpart's rate and back
MATCHED_PAIRS = (("CorDA-KPM", "peft-CorDA-KPM"), ("CorDA-IPM", "peft-CorDA-IPM"),
                 ("CorDA-IPM-maxnorm", "peft-CorDA-IPM"))


# --- data ---------------------------------------------------------------------------------------------------------


def prepare_data(data_dir: str, work: str, args) -> dict:
    """Disjoint splits written into the work directory (deterministic: the same on every invocation)."""
    rng = random.Random(0)
    train = read_jsonl(data_file(data_dir, "gsm8k/train.jsonl"))
    rng.shuffle(train)
    val, train = train[: args.val_examples], train[args.val_examples :]
    test = read_jsonl(data_file(data_dir, "gsm8k/test.jsonl"))[: args.task_examples]
    nq = read_jsonl(data_file(data_dir, "nq_open/NQ-open.dev.jsonl"))[: args.knowledge_examples]
    kpm = read_jsonl(data_file(data_dir, "nq_open/NQ-open.efficientqa.dev.1.1.jsonl"))
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
    write_jsonl(paths["kpm"], [{"question": r["question"], "answer": r["answer"]} for r in kpm])
    write_jsonl(paths["ipm"], [{"question": r["question"], "answer": r["answer"]}
                               for r in train[: args.calibration_samples]])
    return paths


# --- one run: a subprocess of the driver -----------------------------------------------------------------------------


def run_dir(work: str, method: str, lr: float, seed: int) -> str:
    return os.path.join(work, "runs", f"{method}_lr{lr:g}_s{seed}")


def parse_job(job: str) -> tuple[str, float, int]:
    """`METHOD,LR,SEED` (the `--job` of one run) -> (method, lr, seed)."""
    method, lr, seed = job.split(",")
    return method, float(lr), int(seed)


def job_dir(work: str, job: str) -> str | None:
    """The run directory of a `--job`; None for `base` (the base model: nothing to train)."""
    return None if job == "base" else run_dir(work, *parse_job(job))


def eval_path(work: str, out: str | None) -> str:
    return os.path.join(work, "base_eval.json") if out is None else os.path.join(out, "compare_eval.json")


def pending(work: str, out: str | None, full: bool, need_val: bool) -> tuple[bool, bool, dict]:
    """What a run still needs, from its directory: (train it, evaluate it, its evaluation so far). Training is done
    once metrics.json exists; the evaluation needs the validation NLL when `need_val`, the task and knowledge metrics
    when `full`. `out` None is the base model."""
    path = eval_path(work, out)
    done = json.load(open(path)) if os.path.isfile(path) else {}
    to_train = out is not None and not os.path.isfile(os.path.join(out, "metrics.json"))
    to_evaluate = (need_val and "val_nll" not in done) or (full and "task_nll" not in done)
    return to_train, to_evaluate, done


def train_argv(args, method: str, lr: float, seed: int) -> list[str]:
    """`trl_recipes.sft` arguments of one run."""
    recipe, extra = METHODS[method]
    return ["--config", os.path.join(SMOL, recipe), "--dataset_name", os.path.join(args.work_dir, "train.jsonl"),
            "--output_dir", run_dir(args.work_dir, method, lr, seed), "--learning_rate", str(lr),
            "--seed", str(seed), "--max_steps", str(args.steps), "--per_device_train_batch_size", str(args.batch_size),
            "--max_length", str(args.max_length), "--logging_steps", "1", "--eval_examples", "0",
            "--calibration_samples", str(args.calibration_samples), "--warmup_steps", str(max(args.steps // 10, 1)),
            *(["--model_name_or_path", args.model] if args.model else []),
            *[e.format(work=args.work_dir) for e in extra]]


def job_worker(args) -> None:
    """`--job base|METHOD,LR,SEED`: train the run unless it finished before, then evaluate it, in one process (one
    start-up and one model load less per run than a training process and an evaluation process).

    The evaluation: the validation NLL (what the sweep selects on; `--need_val`), and with `--full` the task and
    knowledge metrics. The adapter is loaded from its saved directory (PiSSA through its plain export, see
    trl_recipes.evaluate) and merged into the weights: the same function, and a plain forward is faster than an
    adapter's (DoRA-style ones most). Training's peak memory is recorded in metrics.json before the evaluation."""
    import gc

    import torch

    from trl_recipes.dataset import prompt_and_reference
    from trl_recipes.evaluate import answer_nll, evaluate, load_for_eval

    out = job_dir(args.work_dir, args.job)
    to_train, to_evaluate, result = pending(args.work_dir, out, args.full, args.need_val)
    if to_train:
        from trl_recipes.sft import run

        run(train_argv(args, *parse_job(args.job)))
        gc.collect()
    if not to_evaluate:
        return
    need_val = args.need_val and "val_nll" not in result
    adapter = None if out is None else os.path.join(out, "adapter")
    records = {k: read_jsonl(os.path.join(args.work_dir, f"{k}.jsonl")) for k in ("val", "test", "nq")}
    models = load_for_eval(args.model, adapter=adapter)
    model, tokenizer = (models.after if models.after is not None else models.before), models.tokenizer
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.eval()
    torch.manual_seed(0)
    if need_val:
        prompts, refs = zip(*(prompt_and_reference(r) for r in records["val"]))
        result["val_nll"] = statistics.mean(answer_nll(model, tokenizer, list(prompts), list(refs)))
    if args.full and "task_nll" not in result:
        # the NLL over the whole test subset, exact match on its first em_examples (generation is the slow part)
        ev = evaluate(model, tokenizer, records["test"], records["nq"], task_max_new_tokens=args.task_max_new_tokens,
                      generation_batch_size=64, task_generation_examples=args.em_examples)
        result.update(task_em=ev["task"]["exact_match"], task_nll=ev["task"]["answer_nll"],
                      knowledge_em=ev["knowledge"]["exact_match"], knowledge_nll=ev["knowledge"]["gold_nll"],
                      task_examples=ev["task"]["examples"][:2], knowledge_examples=ev["knowledge"]["examples"][:3])
    eval_out = eval_path(args.work_dir, out)
    with open(eval_out + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(eval_out + ".tmp", eval_out)


# --- plots ----------------------------------------------------------------------------------------------------------


def plots(results, base, out_prefix, curves=None):
    """Loss curves and knowledge change vs task gain at each arm's chosen rate; with `curves` ({arm: {lr: runs}},
    arms with several rates), the arms along their rates too."""
    from trl_recipes.plots import pyplot

    plt = pyplot()

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
                    yerr=mean_std(forget)[1], fmt="o", capsize=3, color=dots.get_facecolor()[0][:3], label=method)
    save_gain_forget(plt, fig, ax, "knowledge change vs task gain (dots: seeds; bars: mean ± std)",
                     out_prefix + "_knowledge_vs_task.png")
    if curves:
        tradeoff_plot(plt, curves, base, out_prefix + "_tradeoff.png")


# --- driver ---------------------------------------------------------------------------------------------------------


# priorities: grid extensions first (the seeds wait for them), then the grid, then the seeds and the base model
EXTENSION, GRID, SEEDS = 0, 1, 2


class Driver:
    """Runs one subprocess per run (training, then its evaluation), at most `workers` at a time, each with its share
    of the cores."""

    def __init__(self, args):
        self.args = args
        self.slots = Slots(args.workers)
        self.threads = str(max(1, (os.cpu_count() or 2) // args.workers))
        self.lock = threading.Lock()
        self.trained = self.evaluated = 0  # work done by this invocation (the rest came from the work directory)
        from tqdm import tqdm

        self.bar = tqdm(total=0, desc="runs (train + evaluate)", unit="run", dynamic_ncols=True)

    def plan(self, n):
        with self.lock:
            self.bar.total += n
            self.bar.refresh()

    def job(self, name: str, full: bool, need_val: bool, priority: int) -> dict:
        """One `--job` (`base` or `METHOD,LR,SEED`) in a subprocess, unless its directory has all it needs."""
        a = self.args
        out = job_dir(a.work_dir, name)
        to_train, to_evaluate, _ = pending(a.work_dir, out, full, need_val)
        if to_train or to_evaluate:
            cmd = [sys.executable, "-m", "benchmarks.compare_methods", "--job", name, "--work_dir", a.work_dir,
                   "--steps", str(a.steps), "--batch_size", str(a.batch_size), "--max_length", str(a.max_length),
                   "--calibration_samples", str(a.calibration_samples), "--em_examples", str(a.em_examples),
                   "--task_max_new_tokens", str(a.task_max_new_tokens), *(["--full"] if full else []),
                   *(["--need_val"] if need_val else []), *(["--model", a.model] if a.model else [])]
            env = {**os.environ, "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false",
                   "OMP_NUM_THREADS": self.threads}
            with self.slots(priority):
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"run {name} failed:\n{proc.stderr[-3000:]}")
            with self.lock:
                self.trained += int(to_train)
                self.evaluated += int(to_evaluate)
        return json.load(open(eval_path(a.work_dir, out)))

    def run(self, method, lr, seed, full, priority) -> dict:
        t = time.time()
        out = run_dir(self.args.work_dir, method, lr, seed)
        ev = self.job(f"{method},{lr!r},{seed}", full, need_val=seed == 0, priority=priority)
        metrics = json.load(open(os.path.join(out, "metrics.json")))
        with self.lock:
            self.bar.update(1)
            self.bar.write(f"  {method:9s} lr={lr:<7g} seed={seed}: "
                           + (f"validation NLL {ev['val_nll']:.4f}" if "val_nll" in ev else "")
                           + (f", test NLL {ev['task_nll']:.4f}, NQ NLL {ev['knowledge_nll']:.4f}" if full else "")
                           + f" ({time.time() - t:.0f} s)")
        return {**ev, "loss_history": metrics["loss_history"], "seconds_per_step": metrics["seconds_per_step"],
                "train_seconds": metrics["train_seconds"], "peak_rss_mb": metrics["peak_rss_mb"], "lr": lr,
                "seed": seed, "method": method, "init_factor_norms": metrics.get("init_factor_norms")}

    def method(self, method, lrs) -> tuple[dict, float, list]:
        """Sweep on seed 0 (selected on the validation NLL), extend past a winning edge, refine around the winner,
        then the other seeds."""
        a = self.args
        sweep = dict(zip(lrs, parallel(lambda lr: self.run(method, lr, 0, False, GRID), lrs)))
        # a best rate on the edge of the grid is not a best rate: extend the grid one step beyond that edge
        # (geometric, same ratio as the grid's outer step), at most --lr_extensions times
        for _ in range(a.lr_extensions):
            nxt = extension_rate(sweep)
            if nxt is None:
                break
            self.plan(1)
            sweep[nxt] = self.run(method, nxt, 0, False, EXTENSION)
        # --lr_refine: halve the grid's step on both sides of the winner (the same rule for every arm)
        for _ in range(a.lr_refine):
            mids = refinement_rates(sweep)
            self.plan(len(mids))
            sweep.update(zip(mids, parallel(lambda lr: self.run(method, lr, 0, False, EXTENSION), mids)))
        best = best_rate(sweep)
        runs = parallel(lambda seed: self.run(method, best, seed, True, SEEDS), list(range(a.seeds)))
        return sweep, best, runs


def best_rate(sweep: dict) -> float:
    """The rate of the lowest validation NLL among the swept ones."""
    return min(sweep, key=lambda lr: sweep[lr]["val_nll"])


def extension_rate(sweep: dict) -> float | None:
    """One step past the grid's edge when the best rate sits on it (the ratio of that edge's step), else None."""
    tried, best = sorted(sweep), best_rate(sweep)
    if len(tried) > 1 and best == tried[-1]:
        return float(f"{best * tried[-1] / tried[-2]:.2g}")
    if len(tried) > 1 and best == tried[0]:
        return float(f"{best * tried[0] / tried[1]:.2g}")
    return None


def coarse_choice(sweep: dict, grid: list[float], extensions: int) -> float:
    """The rate the grid and its edge extensions alone pick (what `--lr_refine` started from), replayed from the
    sweep's validation NLLs."""
    coarse = {lr: sweep[lr] for lr in grid}
    for _ in range(extensions):
        nxt = extension_rate(coarse)
        if nxt is None or nxt not in sweep:
            break
        coarse[nxt] = sweep[nxt]
    return best_rate(coarse)


def refinement_rates(sweep: dict) -> list[float]:
    """The geometric midpoints (2 significant digits) between the best rate and its nearest swept neighbour below
    and above: the rates that halve the grid's step (in log space) around the winner, not yet swept."""
    tried, best = sorted(sweep), best_rate(sweep)
    i = tried.index(best)
    neighbours = tried[max(i - 1, 0):i] + tried[i + 1:i + 2]
    mids = [float(f"{(best * n) ** 0.5:.2g}") for n in neighbours]
    return [lr for lr in dict.fromkeys(mids) if lr not in sweep]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_dir_argument(ap)
    ap.add_argument("--work_dir", default=os.path.join(ROOT, "outputs", "compare"))
    ap.add_argument("--model", default=None, help="base model (default: the packaged SmolLM2-135M-Instruct)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--lrs", default="1e-4,4e-4,1.6e-3", help="learning-rate grid, swept on seed 0")
    ap.add_argument("--lrs_for", default=DEFAULT_LRS_FOR,
                    help="per-method grids instead of --lrs ('METHOD=lr,lr,...;...'); the default centres LoRA's and "
                         "DoRA's grid on the rate their sweep from --lrs picked (6.4e-3, two extensions up), so the "
                         "two extension runs each are not spent again")
    ap.add_argument("--lr_extensions", type=int, default=2,
                    help="extend the grid past an edge that wins, this many steps at most")
    ap.add_argument("--lr_refine", type=int, default=0,
                    help="after the grid and its extensions, this many times: also sweep the geometric midpoints "
                         "between the winning rate and its swept neighbours (a 4x grid becomes 2x around the winner)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--max_length", type=int, default=256)
    ap.add_argument("--train_pool", type=int, default=2000, help="GSM8K train problems the runs draw from")
    ap.add_argument("--calibration_samples", type=int, default=256)
    ap.add_argument("--val_examples", type=int, default=40)
    ap.add_argument("--task_examples", type=int, default=60, help="GSM8K test problems for the NLL")
    ap.add_argument("--em_examples", type=int, default=0,
                    help="of which answered by generation for exact match (0: none; a 135M model after 48 examples "
                         "scored 0-0.03 on GSM8K for every method, and generation was most of the evaluation time)")
    ap.add_argument("--task_max_new_tokens", type=int, default=160)
    ap.add_argument("--knowledge_examples", type=int, default=100)
    ap.add_argument("--matched_rates", action=argparse.BooleanOptionalAction, default=True,
                    help="also run our balanced CorDA arms and peft's at each other's chosen rate, every seed, and "
                         "hold them side by side at the same rate (each arm's own best rate can differ by noise)")
    ap.add_argument("--extra_rates", default="",
                    help="'METHOD=lr,lr;...': also run these arms at these rates, every seed, fully evaluated, for the "
                         "trade-off table (e.g. one arm at a rate where its task gain meets another's)")
    ap.add_argument("--extra_seeds", type=int, default=0,
                    help="run the --extra_rates runs on this many seeds (default, 0: --seeds), where reading arms at "
                         "equal task gain needs more seeds than the selection does; seeds 0 .. N-1")
    ap.add_argument("--workers", type=int, default=2, help="parallel runs (the cores are split between them)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "compare_methods", "compare_methods"))
    # internal: one run (training and evaluation) in a worker process
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--full", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--need_val", action="store_true", help=argparse.SUPPRESS)
    return ap


def rate_list(text: str) -> list[float]:
    """'a,b,c' as floats; [] when one of them is not a number."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        return []


def method_grids(spec: str, methods: list[str], default: list[float],
                 flag: str = "--lrs_for") -> dict[str, list[float]]:
    """`--lrs_for` (or `--extra_rates`) 'M=a,b,c;N=...' over the default grid; an unknown method or a bad number
    exits with the fix."""
    grids = {m: default for m in methods}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        name, _, values = part.partition("=")
        grid = rate_list(values)
        if name not in METHODS or not grid:
            sys.exit(f"error: {flag} entry {part!r}. Fix: METHOD=lr,lr,... with METHOD one of {', '.join(METHODS)}.")
        if name in grids:
            grids[name] = grid
    return grids


def main() -> None:
    args = build_parser().parse_args()
    if args.job:
        return job_worker(args)

    # every argument is checked before anything is written to --work_dir
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        sys.exit(f"error: --methods {','.join(unknown)}: unknown. Fix: a comma list of {', '.join(METHODS)}.")
    methods, lrs = args.methods.split(","), rate_list(args.lrs)
    if not lrs:
        sys.exit(f"error: --lrs {args.lrs!r}: not a comma list of numbers. Fix: e.g. --lrs 1e-4,4e-4,1.6e-3.")
    grids = method_grids(args.lrs_for, methods, lrs)
    extra = method_grids(args.extra_rates, methods, [], flag="--extra_rates")
    for name in DATA_FILES:
        data_file(args.data_dir, name)
    os.makedirs(os.path.join(args.work_dir, "runs"), exist_ok=True)
    prepare_data(args.data_dir, args.work_dir, args)
    t0 = time.time()
    driver = Driver(args)
    try:
        base, sweep, best_lr, results, matched_rate_runs = run_all(driver, methods, grids)
        extra_runs = extra_rate_runs(driver, extra, best_lr)
    except RuntimeError as exc:
        sys.exit(f"error: {exc}")
    finally:
        driver.bar.close()
    # the wall time of every invocation that did some work on this work directory (an interrupted one included, when
    # it was recorded by hand), so that the report states the whole cost and not just the last, resumed invocation
    log_file = os.path.join(args.work_dir, "invocations.json")
    invocations = json.load(open(log_file)) if os.path.isfile(log_file) else []
    if driver.trained or driver.evaluated:
        invocations.append({"start": stamp(t0), "end": stamp(), "minutes": round((time.time() - t0) / 60, 1),
                            "trained": driver.trained, "evaluated": driver.evaluated})
        with open(log_file, "w") as f:
            json.dump(invocations, f, indent=1)
    report(args, base, sweep, best_lr, results, grids, invocations, matched_rate_runs, extra_runs)


def run_all(driver: Driver, methods: list[str], grids: dict) -> tuple[dict, dict, dict, dict, list]:
    """The base model's evaluation beside every method's sweep and seeds, then the matched-rate runs:
    (base, sweep, best_lr, results, matched-rate runs)."""
    driver.plan(sum(len(grids[m]) + driver.args.seeds for m in methods))  # seed 0 at the chosen rate: its full eval

    def work(key):
        if key == "base":
            return driver.job("base", full=True, need_val=True, priority=SEEDS)
        return driver.method(key, grids[key])

    base, *outcome = parallel(work, ["base", *methods])
    sweep = {m: o[0] for m, o in zip(methods, outcome)}
    best_lr = {m: o[1] for m, o in zip(methods, outcome)}
    results = {m: o[2] for m, o in zip(methods, outcome)}
    return base, sweep, best_lr, results, matched_runs(driver, best_lr) if driver.args.matched_rates else []


def matched_runs(driver: Driver, best_lr: dict) -> list[dict]:
    """`--matched_rates`: each pair of MATCHED_PAIRS (both arms run) at both of its chosen rates, every seed: the runs
    beside each arm's final runs at its own rate (`shared_rates` pairs them up for the report)."""
    seeds = list(range(driver.args.seeds))
    todo = list(dict.fromkeys((arm, best_lr[other]) for pair in MATCHED_PAIRS if set(pair) <= best_lr.keys()
                              for arm, other in (pair, pair[::-1]) if best_lr[other] != best_lr[arm]))
    driver.plan(len(todo) * len(seeds))
    runs = parallel(lambda job: parallel(lambda seed: driver.run(*job, seed, True, SEEDS), seeds), todo)
    return [r for job_runs in runs for r in job_runs]


def extra_rate_runs(driver: Driver, extra: dict[str, list[float]], best_lr: dict) -> list[dict]:
    """`--extra_rates`: each listed arm (among those run) at each listed rate, on every seed (`--extra_seeds` of them,
    if more than `--seeds`), fully evaluated; runs that already exist in the work directory are read, not repeated."""
    jobs = [(m, lr) for m, lrs in extra.items() if m in best_lr for lr in lrs]
    n = max(driver.args.seeds, driver.args.extra_seeds)
    driver.plan(sum(n - driver.args.seeds if lr == best_lr[m] else n for m, lr in jobs))  # finals: planned already
    seeds = list(range(n))
    runs = parallel(lambda job: parallel(lambda seed: driver.run(*job, seed, True, SEEDS), seeds), jobs)
    return [r for arm_runs in runs for r in arm_runs]


def complete_runs(every: dict, seeds: int) -> dict[tuple[str, float], list]:
    """{(arm, rate): runs ordered by seed} for every (arm, rate) fully evaluated on seeds 0 .. n-1, n ≥ `seeds`
    (`--extra_seeds` gives some more); a comparison of two of them pairs the seeds they share."""
    by: dict[tuple[str, float], dict[int, dict]] = {}
    for (m, lr, seed), r in sorted(every.items()):
        if "task_nll" in r:
            by.setdefault((m, lr), {})[seed] = r
    return {key: [runs[s] for s in range(len(runs))] for key, runs in by.items()
            if len(runs) >= seeds and set(runs) == set(range(len(runs)))}


def tradeoff_rows(complete: dict, base: dict) -> list[list]:
    """Every (arm, rate) of `complete_runs` (the final, matched-rate and extra-rate runs): task NLL, NQ change and
    early loss side by side, so that arms can be read at equal task gain."""
    return [[m, f"{lr:g}", fmt(mean_std([r["task_nll"] for r in runs])),
             fmt(mean_std([r["knowledge_nll"] - base["knowledge_nll"] for r in runs])),
             fmt(mean_std([early_loss(r) for r in runs])), str(len(runs))]
            for (m, lr), runs in complete.items()]


def shared_rates(complete: dict) -> dict[str, dict[float, dict[str, list]]]:
    """Each pair of MATCHED_PAIRS at every rate both of its arms ran on all seeds (of `complete_runs`: the
    matched-rate runs, and any `--extra_rates` given to both): {"OURS vs THEIRS": {lr: {arm: runs}}}."""
    out = {}
    for ours, theirs in MATCHED_PAIRS:
        for (m, lr), runs in complete.items():
            if m == ours and (theirs, lr) in complete:
                out.setdefault(f"{ours} vs {theirs}", {})[lr] = {ours: runs, theirs: complete[(theirs, lr)]}
    return out


def against_chosen_rows(complete: dict, best_lr: dict, base: dict) -> list[list]:
    """Each of our arms of MATCHED_PAIRS at every rate it ran on all seeds, against peft's arm at peft's own chosen
    rate, by the "at least as good" rule: is there a rate at which ours is no worse on any measure?"""
    rows = []
    for ours, theirs in MATCHED_PAIRS:
        ref = complete.get((theirs, best_lr.get(theirs)))
        for (m, lr), runs in complete.items():
            if m == ours and ref:
                a, b = f"{ours} at {lr:g}", f"{theirs} at {best_lr[theirs]:g}"
                d = derived({a: runs, b: ref}, base)
                _, verdict, evidence = at_least_as_good_claim(a, d[a], b, d[b])
                rows.append([a, b, f"**{verdict}**", evidence])
    return rows


def matched_rows(matched: dict, base: dict) -> list[list]:
    """One row per pair and shared rate: the two arms' means and the "at least as good" rule at that rate."""
    rows = []
    for pair, by_lr in matched.items():
        for lr, arms in sorted(by_lr.items()):
            (ours, theirs), d = list(arms), derived(arms, base)
            claim, verdict, evidence = at_least_as_good_claim(ours, d[ours], theirs, d[theirs])
            rows.append([pair, f"{lr:g}", *[f"{fmt(mean_std(d[ours][k]))} / {fmt(mean_std(d[theirs][k]))}"
                                            for k in ("task_nll", "forget", "early")], f"**{verdict}**", evidence])
    return rows


def wall_time(invocations: list[dict]) -> str:
    if not invocations:
        return "wall time not recorded (every run came from the work directory)"
    total = sum(i["minutes"] for i in invocations)
    parts = [f"{i['start']} – {i['end'][-9:]}: {i['minutes']:.0f} min, {i['trained']} runs trained, {i['evaluated']} "
             f"evaluations" + (f" ({i['note']})" if i.get("note") else "") for i in invocations]
    return f"wall time {total:.0f} min in all, over {len(invocations)} invocation(s): " + "; ".join(parts)


def _em(ms):
    return "–" if ms is None else fmt(ms, 2)


def result_rows(args, base, best_lr, results) -> list[list]:
    rows = []
    for method, runs in results.items():
        get = lambda k: mean_std([r[k] for r in runs])  # noqa: E731
        em = None if runs[0].get("task_em") is None else get("task_em")
        rows.append([
            method, f"{best_lr[method]:g}", fmt(get("task_nll")), _em(em),
            fmt(mean_std([r["knowledge_nll"] - base["knowledge_nll"] for r in runs])),
            fmt(mean_std([r["knowledge_em"] - base["knowledge_em"] for r in runs]), 2),
            fmt(mean_std([early_loss(r) for r in runs])),
            fmt(mean_std([r["loss_history"][-1][1] for r in runs])),
            f"{statistics.median(r['seconds_per_step'] for r in runs):.2f}",
            f"{statistics.mean(r['peak_rss_mb'] for r in runs):.0f}",
        ])
    return rows


def norm_rows(results) -> tuple[list[str], list[list]]:
    """‖B‖_F / ‖A‖_F at init per layer type (mean over the layers), from each method's seed-0 run."""
    kinds = []
    for runs in results.values():
        for kind in runs[0].get("init_factor_norms") or {}:
            if kind not in kinds:
                kinds.append(kind)
    rows = []
    for method, runs in results.items():
        norms = runs[0].get("init_factor_norms") or {}
        rows.append([method, *[f"{norms[k]['B']:.3g} / {norms[k]['A']:.3g}" if k in norms else "–" for k in kinds]])
    return kinds, rows


def command_line(args) -> str:
    return (f"python -m benchmarks.compare_methods --methods {args.methods} --lrs {args.lrs}"
            + (f" --lrs_for '{args.lrs_for}'" if args.lrs_for else "")
            + f" --seeds {args.seeds} --steps {args.steps} --batch_size {args.batch_size} --max_length "
            f"{args.max_length} --train_pool {args.train_pool} --calibration_samples {args.calibration_samples} "
            f"--val_examples {args.val_examples} --task_examples {args.task_examples} --em_examples {args.em_examples} "
            f"--knowledge_examples {args.knowledge_examples} --lr_extensions {args.lr_extensions} "
            + (f"--lr_refine {args.lr_refine} " if args.lr_refine else "") + f"--workers {args.workers}"
            + ("" if args.matched_rates else " --no-matched_rates")
            + (f" --extra_rates '{args.extra_rates}'" if args.extra_rates else "")
            + (f" --extra_seeds {args.extra_seeds}" if args.extra_seeds > args.seeds else "")
            + (f" --model {args.model}" if args.model else ""))


def setup_text(args, model, grids) -> str:
    default = rate_list(args.lrs)  # the arms --lrs_for gave another grid than --lrs are listed
    grid_text = "; ".join(f"{m} {','.join(f'{lr:g}' for lr in g)}" for m, g in grids.items() if g != default) or "none"
    return (
        f"Setup: {model} (fp32, CPU), r=16 and lora_alpha=16 on q/k/v/o/gate/up/down, **{args.steps} "
        f"steps of batch {args.batch_size}** (sequences ≤ {args.max_length} tokens, completion-only loss, "
        f"{args.steps * args.batch_size} examples per run drawn from a pool of {args.train_pool} GSM8K train "
        f"problems), AdamW, cosine schedule with {max(args.steps // 10, 1)} warmup step(s), {args.seeds} seeds"
        + (f" ({args.extra_seeds} for the `--extra_rates` runs)" if args.extra_seeds > args.seeds else "") + " "
        f"(a seed fixes the batches, the same for every method, and LoRA's random init). Learning rate: the best of "
        f"the grid {args.lrs} (other grids: {grid_text}) on seed 0 by the answer NLL of {args.val_examples} problems "
        f"held out from GSM8K train; a rate winning on the grid's edge extends the grid one step past it (up to "
        f"{args.lr_extensions} time(s))"
        + (f"; then, {args.lr_refine} time(s), the geometric midpoints between the winner and its swept neighbours "
           f"are swept too (`--lr_refine`: a 4× grid becomes 2× around the winner)" if args.lr_refine else "")
        + f". Task: GSM8K test, answer NLL on {args.task_examples} problems"
        + (f", exact match of the final number on the first {args.em_examples} (greedy, ≤ {args.task_max_new_tokens} "
           f"new tokens)" if args.em_examples else "")
        + f". Knowledge: NQ-open dev, {args.knowledge_examples} questions, gold-answer NLL and normalised exact match "
        f"of a short greedy answer. Every KPM arm (ours balanced and unbalanced, peft's) calibrates on the same "
        f"{args.calibration_samples} EfficientQA-dev questions (none of the evaluated ones) with their answers, every "
        f"IPM arm on the same {args.calibration_samples} GSM8K train problems with their solutions, both as chat "
        f"conversations; peft's arms run `preprocess_corda` one sample at a time, as it requires.")


def matched_text(matched, base, seeds) -> str:
    return ("## Our CorDA beside peft's at the same learning rates\n\nEach arm's own best rate is picked on seed 0 "
            "alone, so two arms can be held against each other at rates that differ by selection noise. Here our "
            f"arms and peft's arm of the same mode also run at each other's chosen rate, and at any rate "
            f"`--extra_rates` gave both ({seeds} seeds, the same batches), and the \"at least as good\" rule is "
            "applied at each shared rate. Cells: ours / peft's, "
            "mean ± std over seeds.\n\n"
            + markdown_table(["pair", "lr", "GSM8K answer NLL ↓", "NQ gold NLL change ↓", "train loss, steps 2 to half",
                              "at least as good", "evidence (paired differences ± standard error)"],
                             matched_rows(matched, base)))


def all_runs(sweep, results, matched_rate_runs, extra_runs) -> dict:
    """{(arm, lr, seed): run} over the sweep, the final, the matched-rate and the extra-rate runs."""
    every = {(m, lr, 0): r for m in results for lr, r in sweep[m].items()}
    every.update({(m, r["lr"], r["seed"]): r for m in results for r in results[m]})
    every.update({(r["method"], r["lr"], r["seed"]): r for r in [*matched_rate_runs, *extra_runs]})
    return every


def tradeoff_text(complete, best_lr, base, seeds: int, half: int) -> str:
    """Every arm at every rate run on all seeds; then, where peft's arms ran, ours at each rate against theirs."""
    against = against_chosen_rows(complete, best_lr, base)
    return ("## Every arm at every rate run on all seeds\n\nThe final, matched-rate and `--extra_rates` runs side by "
            f"side (mean ± std over the seeds, {seeds} or the `--extra_seeds`), so that two arms can be read at equal "
            "task gain.\n\n"
            + markdown_table(["arm", "lr", "GSM8K answer NLL ↓", "NQ gold NLL change ↓", f"train loss, steps 2–{half}",
                              "seeds"], tradeoff_rows(complete, base))
            + ("\n\nOur arms at every such rate against peft's arm at its own chosen rate (the \"at least as good\" "
               "rule, paired by seed):\n\n"
               + markdown_table(["ours", "peft's", "at least as good", "evidence (paired differences ± standard error)"],
                                against) if against else ""))


def equal_gain_text(complete, rows: list[list], seeds: int) -> str:
    """The `equal_gain_rows` of `complete`: each KPM arm at every rate run on all seeds against LoRA's forgetting at
    the same task gain, where LoRA ran two rates at least on all seeds (the reading fixed by the plan of ac63a54);
    else empty."""
    if not rows or lora_rates(complete) < 2:
        return ""
    curves = curve_verdicts(rows)
    return ("## KPM against LoRA at equal task gain, along the rates\n\nThe verdicts above hold each arm at its own "
            "chosen rate, and a change of rate can move forgetting far more than the task gain. Here each KPM arm at "
            f"every rate it ran on all {seeds} seeds (or more) is held against LoRA's forgetting at the same mean GSM8K "
            "answer-NLL gain, on the seeds both ran: linear in gain between the two LoRA rates whose mean gains "
            "bracket it (per seed, with the same weights), among LoRA's best rates (a LoRA rate that another one "
            "dominates, with as much gain and less forgetting, is left out); "
            "above every LoRA gain, LoRA's largest-gain rate (KPM then gains more); below every one, not decided. The "
            "paired difference, KPM − LoRA there, decides by the 2-standard-error rule. An arm's curve lies below "
            "LoRA's when it forgets less at one rate at least and more at none. The rule was fixed in commit ac63a54, "
            "before the 60-step runs it was planned for (compare_kpm_lora_60.md); in another report it may be applied "
            "to runs made before it.\n\n"
            + equal_gain_table(rows, "NQ gold NLL change")
            + "\n\n" + "; ".join(f"{arm}'s curve lies below LoRA's: **{v}**" for arm, v in curves.items()) + ".")


def report(args, base, sweep, best_lr, results, grids, invocations, matched_rate_runs, extra_runs=()) -> None:
    methods = list(results)
    every = all_runs(sweep, results, matched_rate_runs, extra_runs)
    complete = complete_runs(every, args.seeds)  # every (arm, rate) fully evaluated on all seeds
    # each pair at every rate both arms ran on all seeds: their chosen rates, and any --extra_rates given to both
    matched = shared_rates(complete) if args.matched_rates else {}
    curves = rate_curves(complete)
    equal_gain = equal_gain_rows(complete, base)  # each KPM arm's rates against LoRA at equal task gain
    n_runs, train_minutes = len(every), sum(r["train_seconds"] for r in every.values()) / 60
    all_lrs = sorted({lr for m in methods for lr in sweep[m]})
    coarse = {m: coarse_choice(sweep[m], grids[m], args.lr_extensions) for m in methods} if args.lr_refine else {}
    sweep_rows = [[m, *[f"{sweep[m][lr]['val_nll']:.4f}" if lr in sweep[m] else "–" for lr in all_lrs],
                   *([f"{coarse[m]:g}"] if coarse else []), f"{best_lr[m]:g}"] for m in methods]
    claims = verdicts(results, base, best_lr)
    verdict_rows = [[c, f"**{v}**", e] for c, v, e in claims]
    kinds, norms = norm_rows(results)
    name = os.path.basename(args.out)
    model = os.path.basename(args.model.rstrip("/")) if args.model else "SmolLM2-135M-Instruct"
    half = max(2, int(args.steps * 0.5))
    text = "\n\n".join([
        f"# {', '.join(methods)} on {model} (GSM8K, r=16)",
        f"Command: `{command_line(args)}`  \nMachine: {machine()}; {args.workers} runs at a time, "
        f"{max(1, (os.cpu_count() or 2) // args.workers)} thread(s) each  \nDate: {stamp()}  \nRuns: {n_runs} "
        f"training runs, {train_minutes:.0f} min of training summed over runs; {wall_time(invocations)}",
        setup_text(args, model, grids),
        f"Base model: GSM8K test answer NLL {base['task_nll']:.3f}"
        + (f", exact match {base['task_em']:.2f}" if base.get("task_em") is not None else "")
        + f"; NQ-open gold NLL {base['knowledge_nll']:.3f}, exact match {base['knowledge_em']:.2f}; GSM8K validation "
        f"NLL {base['val_nll']:.3f}.",
        "## Results (mean ± std over seeds)\n\n" + markdown_table(
            ["method", "lr", "GSM8K answer NLL ↓", "GSM8K EM ↑", "NQ gold NLL change ↓ (forgetting)",
             "NQ EM change", f"train loss, mean of steps 2–{half}", "train loss @ last",
             "s/step (median)", "peak RSS MB"], result_rows(args, base, best_lr, results)),
        "## The papers' orderings at this scale\n\nDecided by fixed rules (`verdicts()` in benchmarks/verdicts.py): a "
        "difference counts when it exceeds twice its standard error over the seeds, paired by seed (the same batches); "
        "\"comparable task gain\" means at least 90% of the other method's GSM8K answer-NLL gain; \"learns faster\" "
        "compares the mean training loss over steps 2 to half of the steps (step 1's loss is the unchanged base model's, "
        "the same for every method); \"at least as good\" means worse beyond noise on none of GSM8K NLL, NQ "
        "forgetting and that early training loss.\n\n"
        + markdown_table(["claim", "verdict", "evidence (mean ± std over seeds; paired differences ± standard error)"],
                         verdict_rows),
        *([matched_text(matched, base, args.seeds)] if matched else []),
        tradeoff_text(complete, best_lr, base, args.seeds, half),
        *filter(None, [equal_gain_text(complete, equal_gain, args.seeds)]),
        "## Factor norms at init (‖B‖_F / ‖A‖_F, mean over the layers of each type, seed 0)\n\n"
        + markdown_table(["method", *kinds], norms),
        "## Learning-rate sweep (seed 0, GSM8K validation answer NLL)\n\n" + markdown_table(
            ["method", *[f"lr {lr:g}" for lr in all_lrs], *(["grid's choice before refining"] if coarse else []),
             "chosen"], sweep_rows),
        f"Timing: seconds per step and peak memory come from these training runs, {args.workers} at a time on a "
        f"shared machine (median over seeds); they rank the methods only roughly. Clean side-by-side step times are "
        f"in [dude_smollm2.md](../bench_dude/dude_smollm2.md) and [corda_smollm2.md](../bench_corda/corda_smollm2.md).",
        f"Plots: [loss curves]({name}_loss.png), [knowledge change vs task gain]({name}_knowledge_vs_task.png)"
        + (f", [each arm along its rates]({name}_tradeoff.png)" if curves else "") + ".",
    ])
    write_report(args.out + ".md", text, {
        "base": base, "sweep": {m: {str(k): v for k, v in d.items()} for m, d in sweep.items()}, "results": results,
        "best_lr": best_lr, "coarse_lr": coarse, "verdicts": claims, "equal_gain": equal_gain,
        "invocations": invocations,
        "matched": {pair: {str(lr): arms for lr, arms in by_lr.items()} for pair, by_lr in matched.items()},
        "extra_rates": list(extra_runs),
        "args": {k: v for k, v in vars(args).items() if k not in ("job", "full", "need_val")}})
    plots(results, base, args.out, curves)  # beside the report (write_report made the folder)


if __name__ == "__main__":
    main()
