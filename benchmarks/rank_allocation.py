"""What budgeted ranks do on SmolLM2-135M-Instruct at init: the parameters spent against uniform r's budget, the energy
share the trained components hold (DuDe and IPM: more is the aim; KPM: less), and the ranks each projection gets.

    python -m benchmarks.rank_allocation            # r=16, rank_cap 2, DuDe / CorDA-IPM / CorDA-KPM: ~10 min, 1 core

An init-only measurement (no training): it says what the allocation chooses, not whether training improves. Each
method is initialised twice from the same calibration (KPM: the packaged NQ-open slice, IPM: the packaged training
conversations, both 128 samples of 256 tokens), uniform and budgeted; the energy share of a layer's trained
components is the sum of their σ² over all σ² of the decomposed matrix (W for DuDe, W·C for CorDA), the quantity the
allocation ranks by.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from benchmarks.common import ROOT, machine, markdown_table, stamp, write_report

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def adapted(method: str, allocation: str, args, tokenizer, data) -> tuple[dict, dict, int]:
    """(ranks per layer, summary, factor parameters) of one init."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from peft_ext import CorDAConfig, DuDeConfig, calibrate
    from trl_recipes.models import resolve_model_path

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(None), dtype=torch.float32)
    common = dict(r=args.r, lora_alpha=args.r, target_modules=PROJECTIONS, rank_allocation=allocation,
                  rank_cap=args.rank_cap)
    if method == "dude":
        config = DuDeConfig(**common)
    else:
        config = CorDAConfig(**common, corda_method=method)
        calibrate(model, config, data[method], tokenizer=tokenizer, num_samples=args.samples, max_length=256,
                  verbose=False)
    model = get_peft_model(model, config)
    ranks = {n: m.r["default"] for n, m in model.named_modules() if hasattr(m, "lora_init_A") and "default" in m.r}
    params = sum(m.lora_A["default"].weight.numel() + m.lora_B["default"].weight.numel()
                 for n, m in model.named_modules() if n in ranks)
    return ranks, config.rank_allocation_summary or {}, params


def per_projection(ranks: dict) -> str:
    """Median [min–max] rank of each projection type over the blocks."""
    out = []
    for p in PROJECTIONS:
        vals = sorted(v for n, v in ranks.items() if n.endswith(p))
        out.append(f"{p} {statistics.median(vals):g} [{vals[0]}–{vals[-1]}]")
    return "; ".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--rank_cap", type=float, default=2.0)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--methods", default="dude,ipm,kpm")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "rank_allocation", "smollm2_r16"))
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from peft_ext import read_jsonl
    from trl_recipes.data import KPM_CALIBRATION_FILE, TRAIN_FILE
    from trl_recipes.dataset import pair_to_messages, qa_to_messages
    from trl_recipes.models import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(None))
    data = {"kpm": [qa_to_messages(r) for r in read_jsonl(KPM_CALIBRATION_FILE)],
            "ipm": [pair_to_messages(r) for r in read_jsonl(TRAIN_FILE)]}
    rows, summaries = [], {}
    for method in args.methods.split(","):
        _, _, uniform_params = adapted(method, "uniform", args, tokenizer, data)
        ranks, summary, params = adapted(method, "budgeted", args, tokenizer, data)
        rows.append([{"dude": "DuDe", "ipm": "CorDA-IPM", "kpm": "CorDA-KPM"}[method], summary["objective"],
                     f"{summary['uniform_energy_share_mean']:.3g}", f"{summary['energy_share_mean']:.3g}",
                     f"{summary['energy_share_mean'] / summary['uniform_energy_share_mean']:.2f}×",
                     f"{uniform_params:,}", f"{params:,} ({params / uniform_params - 1:+.3%})",
                     "yes" if summary["fell_back_to_uniform"] else "no", per_projection(ranks)])
        summaries[method] = summary
        print(rows[-1], flush=True)
    text = "\n\n".join([
        "# Budgeted ranks at init on SmolLM2-135M-Instruct",
        f"Command: `python -m benchmarks.rank_allocation --r {args.r} --rank_cap {args.rank_cap:g} --samples "
        f"{args.samples} --methods {args.methods}`  \nMachine: {machine()}  \nDate: {stamp()}",
        __doc__.split("\n\n")[2].replace("\n", " "),
        markdown_table(["method", "objective", "energy share held, uniform (mean over layers)", "budgeted",
                        "budgeted / uniform", "factor parameters, uniform", "budgeted", "fell back to uniform",
                        "budgeted rank per projection: median [min–max] over 30 blocks"], rows),
        "Whether this trains better is issue 28's part 3 (plan 4a7e371): not measured here.",
    ])
    write_report(args.out + ".md", text, {"rows": rows, "summaries": summaries, "args": vars(args)})


if __name__ == "__main__":
    main()
