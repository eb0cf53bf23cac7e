"""Helpers shared by the benchmark scripts: isolated worker processes, peak memory, machine description, tables."""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time

import torch


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOL = os.path.join(ROOT, "trl_recipes", "recipes", "SmolLM2-135M-Instruct")  # the shipped recipes
SMOLLM2_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


DATA_ENV = "PEFT_EXT_DATA_DIR"
DATA_FILES = {  # the larger public sets some benchmarks read, as their upstream repositories ship them
    "gsm8k/train.jsonl": "GSM8K train: github.com/openai/grade-school-math, grade_school_math/data/train.jsonl "
                         "(Hub: openai/gsm8k, config main, split train)",
    "gsm8k/test.jsonl": "GSM8K test: github.com/openai/grade-school-math, grade_school_math/data/test.jsonl "
                        "(Hub: openai/gsm8k, config main, split test)",
    "nq_open/NQ-open.dev.jsonl": "NQ-open dev: github.com/google-research-datasets/natural-questions, "
                                "nq_open/NQ-open.dev.jsonl (Hub: google-research-datasets/nq_open, split validation)",
    "nq_open/NQ-open.efficientqa.dev.1.1.jsonl": "EfficientQA dev: github.com/google-research-datasets/"
                                                "natural-questions, nq_open/NQ-open.efficientqa.dev.1.1.jsonl",
}


def add_data_dir_argument(ap) -> None:
    ap.add_argument("--data_dir", default=os.environ.get(DATA_ENV),
                    help=f"folder with the public data sets as upstream ships them: {', '.join(DATA_FILES)} "
                         f"(default: ${DATA_ENV})")


def data_file(data_dir, name: str) -> str:
    """The path of `name` (a key of DATA_FILES) under `data_dir`; exits naming where to get it when it is missing."""
    path = os.path.join(data_dir, name) if data_dir else None
    if path is None or not os.path.isfile(path):
        where = f"{path} does not exist" if path else f"no --data_dir (nor ${DATA_ENV}) given"
        sys.exit(f"error: this benchmark reads {name}, and {where}. Fix: --data_dir DIR with {name} in it, the "
                 f"{DATA_FILES[name]}.")
    return path


def add_calibration_arguments(ap) -> None:
    """The calibration options the CorDA benchmarks share (data folder, samples, tokens per sample, batch size)."""
    add_data_dir_argument(ap)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--max_length", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=8)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> None:
    """Make the peak resident set size (VmHWM) start again from the current one (Linux: clear_refs 5), so that a
    later `peak_rss_since_reset_mb` measures one step, not the loading before it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_since_reset_mb() -> float:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib / 1024


JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"


def allocators(requested: str) -> dict[str, dict[str, str]]:
    """Environment overrides per malloc implementation. glibc's heap fragmentation depends on the allocation history
    of the process (e.g. how many weights an init replaced), which moves peak RSS by ~2 GB between methods that need
    the same memory; jemalloc (Debian: apt install libjemalloc2) does not, so benchmarks can report both."""
    out = {}
    for name in requested.split(","):
        if name == "glibc":
            out[name] = {}
        elif name == "jemalloc" and os.path.exists(JEMALLOC):
            out[name] = {"LD_PRELOAD": JEMALLOC}
        elif name == "jemalloc":
            print(f"[benchmarks] {JEMALLOC} not found (apt install libjemalloc2): skipping the jemalloc runs")
    return out


def run_worker(module: str, args: list[str], timeout: int = 3600, env_extra: dict | None = None) -> dict:
    """Run `python -m module --worker ...` in a fresh process (clean peak-memory reading) and parse its last JSON
    line."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-m", module, "--worker", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}")


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def markdown_table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def stamp(t: float | None = None) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))


def write_report(out_md: str, report: str, data: dict | None = None) -> None:
    """Print the markdown report and write it to `out_md`, the raw numbers beside it as JSON."""
    print("\n" + report)
    os.makedirs(os.path.dirname(os.path.abspath(out_md)), exist_ok=True)
    with open(out_md, "w") as f:
        f.write(report + "\n")
    if data is not None:
        with open(os.path.splitext(out_md)[0] + ".json", "w") as f:
            json.dump(data, f, indent=1)
    print(f"\nwritten: {out_md}")


# --- JSONL writing (reading: peft_ext.jsonl.read_jsonl), statistics over seeds, parallel runs -----------------------------------------------------------------


def write_jsonl(path, rows):
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(path + ".tmp", path)


def mean_std(xs):
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def paired(xs, ys):
    """Mean and standard error of the per-seed differences x − y (a seed gives every method the same batches)."""
    d = [x - y for x, y in zip(xs, ys)]
    return statistics.mean(d), (statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("inf"))


def fmt(ms, digits=3):
    """(mean, std) as 'mean ± std'."""
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


class Slots:
    """At most n holders at a time; waiting holders go in order of priority, then of arrival."""

    def __init__(self, n: int):
        self.free, self.waiting, self.count = n, [], itertools.count()
        self.cond = threading.Condition()

    @contextlib.contextmanager
    def __call__(self, priority: int):
        ticket = (priority, next(self.count))
        with self.cond:
            heapq.heappush(self.waiting, ticket)
            while self.free == 0 or self.waiting[0] != ticket:
                self.cond.wait()
            heapq.heappop(self.waiting)
            self.free -= 1
            self.cond.notify_all()
        try:
            yield
        finally:
            with self.cond:
                self.free += 1
                self.cond.notify_all()


def run_in_slot(module_args: list[str], slots: Slots, workers: int, what: str) -> None:
    """`python -m MODULE ARGS` in a fresh process once a slot is free, with this machine's cores shared among the
    `workers` slots (one thread each on 2 cores); a RuntimeError with the end of its stderr if it fails."""
    env = {**os.environ, "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // workers))}
    t = time.time()
    with slots(0):
        proc = subprocess.run([sys.executable, "-m", *module_args], capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"run {what} failed:\n{proc.stderr[-3000:]}")
    print(f"  {what}: done in {time.time() - t:.0f} s", flush=True)


def parallel(fn, items) -> list:
    """fn over items in threads (each run still waits for a slot); errors are raised together after all finished."""
    results, errors = [None] * len(items), []

    def call(i, item):
        try:
            results[i] = fn(item)
        except Exception as exc:  # noqa: BLE001 - reported after the other items finish
            errors.append(f"{item}: {exc}")

    threads = [threading.Thread(target=call, args=(i, item)) for i, item in enumerate(items)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError("\n".join(errors))
    return results
