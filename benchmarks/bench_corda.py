"""peft_ext CorDA vs peft's `preprocess_corda` on SmolLM2-135M-Instruct.

All linear projections, r=16, 256 calibration samples of up to 256 tokens: NQ-open question + answers for KPM,
GSM8K questions for IPM (upstream files in `--data_dir`, see benchmarks/README.md). Side by side in one run, each measurement in its own
process (clean peak RSS), methods interleaved over rounds:
  * peft: `preprocess_corda` with a run_model callback over the samples one at a time (it requires batch 1), then
    `get_peft_model(LoraConfig(init_lora_weights="corda"))`;
  * peft_ext: `calibrate(batch_size=8)`, then `get_peft_model(CorDAConfig)`;
  * a plain forward pass (with logits) over the same batches as peft_ext, the reference for calibration cost.
Reported: wall time of calibration and decomposition, extra peak memory (peak RSS minus the RSS of the loaded model
after one tiny forward pass has paged its memory-mapped weights in), and the ratios.

    python -m benchmarks.bench_corda                 # writes benchmarks/results/bench_corda/corda_smollm2.md
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

from peft_ext import read_jsonl

from benchmarks.common import (
    ROOT,
    SMOLLM2_TARGETS,
    add_calibration_arguments,
    allocators,
    data_file,
    current_rss_mb,
    machine,
    markdown_table,
    median,
    peak_rss_mb,
    run_worker,
    stamp,
    write_report,
)


def load_texts(data_dir: str, mode: str, n: int, seed: int = 0) -> list[str]:
    """KPM: NQ-open question and its answers (knowledge to preserve); IPM: GSM8K questions (the task's instructions)."""
    if mode == "kpm":
        path = data_file(data_dir, "nq_open/NQ-open.dev.jsonl")
        fmt = lambda r: f"{r['question']}\n{', '.join(r['answer'])}"  # noqa: E731
    else:
        path = data_file(data_dir, "gsm8k/train.jsonl")
        fmt = lambda r: r["question"]  # noqa: E731
    records = read_jsonl(path)
    random.Random(seed).shuffle(records)
    return [fmt(r) for r in records[:n]]


def worker(kind: str, mode: str, data_dir: str, n: int, max_length: int, batch_size: int, threads: int) -> dict:
    import warnings

    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_recipes.models import default_model_path

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    texts = load_texts(data_dir, mode, n)
    rows = [ids for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    with torch.no_grad():  # page the memory-mapped weights in, so that "extra memory" is what the method adds
        model(input_ids=torch.tensor([rows[0][:4]]), use_cache=False)
    rss_loaded = current_rss_mb()
    out = {"tokens": sum(len(r) for r in rows), "rss_loaded_mb": rss_loaded}

    if kind == "forward":
        from peft_ext.corda.calibration import batch_rows

        batches = batch_rows(rows, batch_size, tokenizer.pad_token_id)
        t = time.perf_counter()
        with torch.no_grad():
            for b in batches:
                model(**b, use_cache=False)
        out["forward_s"] = time.perf_counter() - t
    elif kind == "ours":
        from peft_ext import CorDAConfig, calibrate

        config = CorDAConfig(r=16, lora_alpha=16, target_modules=SMOLLM2_TARGETS, corda_method=mode)
        t = time.perf_counter()
        calibrate(model, config, texts, tokenizer=tokenizer, num_samples=n, max_length=max_length,
                  batch_size=batch_size, sequential=False, verbose=False)  # whole-model (bench_scaleout: both)
        out["calibration_s"] = time.perf_counter() - t
        t = time.perf_counter()
        get_peft_model(model, config)
        out["decomposition_s"] = time.perf_counter() - t
    elif kind == "peft":
        from peft import LoraConfig
        from peft.tuners.lora.config import CordaConfig
        from peft.tuners.lora.corda import preprocess_corda

        config = LoraConfig(r=16, lora_alpha=16, target_modules=SMOLLM2_TARGETS, init_lora_weights="corda",
                            corda_config=CordaConfig(corda_method=mode))
        forward_time = []

        def run_model():  # peft's hooks require batch 1
            t0 = time.perf_counter()
            for r in rows:
                model(input_ids=torch.tensor([r]), use_cache=False)
            forward_time.append(time.perf_counter() - t0)

        t = time.perf_counter()
        preprocess_corda(model, config, run_model=run_model)
        total = time.perf_counter() - t
        t = time.perf_counter()
        get_peft_model(model, config)
        out["calibration_s"] = forward_time[0]
        out["decomposition_s"] = total - forward_time[0] + (time.perf_counter() - t)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_calibration_arguments(ap)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--allocators", default="glibc")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "bench_corda", "corda_smollm2.md"))
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    common = dict(data_dir=args.data_dir, n=args.samples, max_length=args.max_length, batch_size=args.batch_size,
                  threads=args.threads)
    if args.worker:
        print(json.dumps(worker(*args.worker, **common)))
        return

    from trl_recipes.models import default_model_path

    default_model_path()
    script = "benchmarks.bench_corda"
    opts = ["--data_dir", args.data_dir, "--samples", str(args.samples), "--max_length", str(args.max_length),
            "--batch_size", str(args.batch_size), "--threads", str(args.threads)]
    sections, raw, summary = [], {}, {}
    for allocator, env in allocators(args.allocators).items():
        res = {(k, m): [] for m in ("kpm", "ipm") for k in ("peft", "ours", "forward")}
        for rnd in range(args.rounds):
            for key in res:
                res[key].append(run_worker(script, [key[0], key[1], *opts], env_extra=env))
                r = res[key][-1]
                print(f"[{allocator}] round {rnd} {key}: " + ", ".join(f"{k}={v:.1f}" for k, v in r.items()), flush=True)
        raw[allocator] = {f"{k}/{m}": v for (k, m), v in res.items()}

        def med(kind, mode, field):
            return median([r[field] for r in res[(kind, mode)]])

        rows, ratio_rows = [], []
        for mode in ("kpm", "ipm"):
            for kind, label in (("peft", "peft preprocess_corda (batch 1)"),
                                ("ours", f"peft_ext calibrate (batch {args.batch_size})")):
                cal, dec = med(kind, mode, "calibration_s"), med(kind, mode, "decomposition_s")
                extra = median([r["peak_rss_mb"] - r["rss_loaded_mb"] for r in res[(kind, mode)]])
                rows.append([mode.upper(), label, cal, dec, cal + dec, extra])
            fwd = med("forward", mode, "forward_s")
            rows.append([mode.upper(), "plain forward, same batches (reference)", fwd, "", "", ""])
            total = {k: med(k, mode, "calibration_s") + med(k, mode, "decomposition_s") for k in ("peft", "ours")}
            extra = {k: median([r["peak_rss_mb"] - r["rss_loaded_mb"] for r in res[(k, mode)]])
                     for k in ("peft", "ours")}
            ratios = [
                (f"{mode.upper()} total time, peft_ext / peft", total["ours"] / total["peft"], 0.33),
                (f"{mode.upper()} extra peak memory, peft_ext / peft", extra["ours"] / extra["peft"], 0.5),
                (f"{mode.upper()} calibration / plain forward", med("ours", mode, "calibration_s") / fwd, 1.3),
            ]
            ratio_rows += [[n, v, f"≤ {g}", "met" if v <= g else "MISSED"] for n, v, g in ratios]
            summary.setdefault(allocator, {}).update({n: v for n, v, _ in ratios})
        tokens = {m: res[("ours", m)][0]["tokens"] for m in ("kpm", "ipm")}
        sections.append("\n\n".join([
            f"## malloc: {allocator}",
            "### Ratios\n\n" + markdown_table(["ratio", "measured", "goal", ""], ratio_rows),
            f"### Times (s) and memory (MB)\n\nTokens: KPM {tokens['kpm']:,}, IPM {tokens['ipm']:,}.\n\n"
            + markdown_table(["mode", "method", "calibration s", "decomposition s", "total s",
                              "extra peak MB (over loaded model)"], rows),
        ]))
    report = "\n\n".join([
        "# CorDA on SmolLM2-135M-Instruct (r=16, all linear projections)",
        f"Command: `python -m benchmarks.bench_corda --samples {args.samples} --max_length {args.max_length} "
        f"--batch_size {args.batch_size} --rounds {args.rounds} --threads {args.threads} "
        f"--allocators {args.allocators}`  \nMachine: {machine()}  \nDate: {stamp()}  \n"
        f"Data: {args.samples} NQ-open dev question+answers (KPM) and GSM8K train questions (IPM), seeded selection, "
        f"truncated at {args.max_length} tokens. Medians over {args.rounds} interleaved rounds, one process each.",
        *sections,
    ])
    write_report(args.out, report, {"summary": summary, "raw": raw})


if __name__ == "__main__":
    main()
