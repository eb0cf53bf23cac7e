"""benchmarks/compare_methods.py: rate selection and report tables on synthetic runs, the whole driver on a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks.compare_methods import coarse_choice, extension_rate, refinement_rates
from tests.helpers import SYNTHETIC_BASE as BASE
from tests.helpers import synthetic_seeds as seeds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def test_matched_rate_rows_hold_each_pair_side_by_side_at_every_shared_rate():
    from benchmarks.compare_methods import matched_rows

    matched = {"CorDA-IPM vs peft-CorDA-IPM": {
        4e-4: {"CorDA-IPM": seeds(0.9, 4.5, early=0.9), "peft-CorDA-IPM": seeds(1.0, 4.9, early=1.0)},
        1e-4: {"CorDA-IPM": seeds(1.1, 4.5), "peft-CorDA-IPM": seeds(1.0, 4.5)}}}
    rows = matched_rows(matched, BASE)
    assert [r[1] for r in rows] == ["0.0001", "0.0004"]  # by rate
    assert rows[0][5] == "**does not hold**" and "worse: GSM8K test NLL" in rows[0][6]
    assert rows[1][5] == "**holds**" and rows[1][2].startswith("0.900")


def test_tradeoff_rows_list_every_arm_and_rate_complete_over_the_seeds():
    from benchmarks.compare_methods import complete_runs, tradeoff_rows

    every = {}
    for m, lr, task, know in (("A", 1e-4, 1.1, 4.4), ("A", 4e-4, 1.0, 4.6), ("B", 1e-4, 1.05, 4.3)):
        for seed, r in enumerate(seeds(task, know)):
            every[(m, lr, seed)] = r
    every[("B", 4e-4, 0)] = seeds(0.9, 4.0)[0]  # one seed only: not a row
    every[("A", 1.6e-3, 0)] = {"val_nll": 1.0}  # a sweep run without the full evaluation: not a row
    rows = tradeoff_rows(complete_runs(every, 3), BASE)
    assert [r[:2] for r in rows] == [["A", "0.0001"], ["A", "0.0004"], ["B", "0.0001"]]
    assert rows[1][2].startswith("1.000") and rows[1][3].startswith(f"{4.6 - BASE['knowledge_nll']:.3f}")


def test_against_chosen_rows_hold_each_rate_of_ours_against_peft_at_its_own_rate():
    from benchmarks.compare_methods import against_chosen_rows, complete_runs

    every = {}
    for m, lr, task, know in (("CorDA-IPM", 1e-4, 1.10, 4.0), ("CorDA-IPM", 2e-4, 0.99, 4.0),
                              ("peft-CorDA-IPM", 1e-4, 1.01, 4.0), ("peft-CorDA-IPM", 2e-4, 0.90, 3.0)):
        for seed, r in enumerate(seeds(task, know)):
            every[(m, lr, seed)] = r
    rows = against_chosen_rows(complete_runs(every, 3), {"CorDA-IPM": 4e-4, "peft-CorDA-IPM": 1e-4}, BASE)
    assert [r[:3] for r in rows] == [["CorDA-IPM at 0.0001", "peft-CorDA-IPM at 0.0001", "**does not hold**"],
                                     ["CorDA-IPM at 0.0002", "peft-CorDA-IPM at 0.0001", "**holds**"]]
    assert "GSM8K test NLL" in rows[0][3] and "worse: GSM8K test NLL" in rows[0][3]
    assert against_chosen_rows(complete_runs(every, 3), {"CorDA-IPM": 4e-4}, BASE) == []  # peft's arm did not run


def test_tradeoff_text_has_the_peft_section_only_where_peft_ran():
    from benchmarks.compare_methods import complete_runs, tradeoff_text

    every = {}
    for m, lr in (("LoRA", 1e-3), ("CorDA-KPM", 1e-3), ("peft-CorDA-KPM", 1e-3)):
        for seed, r in enumerate(seeds(1.0, 4.6)):
            every[(m, lr, seed)] = r
    best = {"LoRA": 1e-3, "CorDA-KPM": 1e-3, "peft-CorDA-KPM": 1e-3}
    with_peft = tradeoff_text(complete_runs(every, 3), best, BASE, 3, 6)
    assert "against peft's arm" in with_peft and "| CorDA-KPM at 0.001 | peft-CorDA-KPM at 0.001 |" in with_peft
    without = {k: v for k, v in every.items() if k[0] != "peft-CorDA-KPM"}
    text = tradeoff_text(complete_runs(without, 3), best, BASE, 3, 6)
    assert "| LoRA | 0.001 |" in text and "peft" not in text  # no empty table of our arms against peft's


def test_shared_rates_pair_our_arm_and_peft_wherever_both_ran_every_seed():
    from benchmarks.compare_methods import complete_runs, shared_rates

    every = {}
    for m, lr in (("CorDA-IPM", 1e-4), ("CorDA-IPM", 2e-4), ("peft-CorDA-IPM", 2e-4), ("peft-CorDA-IPM", 4e-4)):
        for seed, r in enumerate(seeds(1.0, 4.0)):
            every[(m, lr, seed)] = r
    every[("CorDA-IPM", 4e-4, 0)] = seeds(1.0, 4.0)[0]  # one seed only
    shared = shared_rates(complete_runs(every, 3))
    assert list(shared) == ["CorDA-IPM vs peft-CorDA-IPM"]
    assert list(shared["CorDA-IPM vs peft-CorDA-IPM"]) == [2e-4]
    assert list(shared["CorDA-IPM vs peft-CorDA-IPM"][2e-4]) == ["CorDA-IPM", "peft-CorDA-IPM"]


def sweep_of(val_by_lr: dict) -> dict:
    return {lr: {"val_nll": v} for lr, v in val_by_lr.items()}


def test_grid_extends_past_a_winning_edge_only():
    assert extension_rate(sweep_of({1e-4: 1.0, 4e-4: 0.9, 1.6e-3: 0.8})) == 6.4e-3
    assert extension_rate(sweep_of({1e-4: 0.7, 4e-4: 0.9, 1.6e-3: 0.8})) == 2.5e-5
    assert extension_rate(sweep_of({1e-4: 1.0, 4e-4: 0.7, 1.6e-3: 0.8})) is None
    assert extension_rate(sweep_of({1e-4: 1.0})) is None


def test_refinement_halves_the_step_around_the_winner_and_skips_swept_rates():
    # an inner winner: the geometric midpoints on both sides (2 significant digits)
    assert refinement_rates(sweep_of({1e-4: 1.0, 4e-4: 0.7, 1.6e-3: 0.8})) == [2e-4, 8e-4]
    assert refinement_rates(sweep_of({1.6e-3: 0.9, 6.4e-3: 0.7, 2.6e-2: 5.0})) == [3.2e-3, 1.3e-2]
    # a winner on the edge (extensions spent): its one neighbour; each side halves its own step
    assert refinement_rates(sweep_of({1e-4: 0.6, 4e-4: 0.7})) == [2e-4]
    assert refinement_rates(sweep_of({1e-4: 1.0, 2e-4: 0.8, 4e-4: 0.7, 1.6e-3: 0.8})) == [2.8e-4, 8e-4]
    # a midpoint that rounds onto a swept rate is not run again
    assert refinement_rates(sweep_of({1e-4: 0.7, 1.01e-4: 0.8})) == []
    # a second round after a midpoint won: the step halves again (in log space)
    assert refinement_rates(sweep_of({1e-4: 1.0, 2e-4: 0.6, 4e-4: 0.7})) == [1.4e-4, 2.8e-4]
    assert refinement_rates(sweep_of({1e-4: 1.0})) == []


def test_the_grid_s_own_choice_is_replayed_from_a_refined_sweep():
    grid = [1e-4, 4e-4, 1.6e-3]
    refined = sweep_of({1e-4: 0.93, 4e-4: 0.94, 1.6e-3: 1.5, 2.5e-5: 1.1, 5e-5: 0.95, 2e-4: 0.90})
    assert coarse_choice(refined, grid, extensions=2) == 1e-4  # 2.5e-5 was an extension; 5e-5, 2e-4 refinements
    edge = sweep_of({1e-4: 1.0, 4e-4: 0.9, 1.6e-3: 0.8, 6.4e-3: 0.7, 2.6e-2: 0.75, 1.3e-2: 0.6})
    assert coarse_choice(edge, grid, extensions=2) == 6.4e-3
    assert coarse_choice(edge, grid, extensions=0) == 1.6e-3


@pytest.mark.slow  # 390 s: run with `pytest -m slow` when benchmarks/compare_methods.py changes
def test_driver_end_to_end_on_a_tiny_model(tiny_model_dir, benchmark_data_dir, tmp_path):
    """Sweep with an edge extension and a refinement, seeds, evaluations, resume from the cache, report, JSON and
    plots."""
    work, out = tmp_path / "work", tmp_path / "results" / "cmp"
    cmd = [sys.executable, "-m", "benchmarks.compare_methods", "--model", tiny_model_dir,
           "--methods", "LoRA,CorDA-KPM,peft-CorDA-KPM", "--lrs", "1e-3,2e-3", "--lr_extensions", "1",
           "--lr_refine", "1", "--seeds", "2", "--lrs_for", "peft-CorDA-KPM=1e-3", "--extra_rates", "LoRA=3e-3",
           "--extra_seeds", "3",
           "--steps", "2", "--batch_size", "2", "--train_pool", "20", "--calibration_samples", "8",
           "--val_examples", "3", "--task_examples", "3", "--em_examples", "2", "--task_max_new_tokens", "4",
           "--knowledge_examples", "3", "--data_dir", benchmark_data_dir, "--work_dir", str(work), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.load(open(f"{out}.json"))
    assert list(data["sweep"]["peft-CorDA-KPM"]) == ["0.001"]  # its own grid: one point, nothing to extend
    for method in ("LoRA", "CorDA-KPM"):
        sweep = data["sweep"][method]
        # the grid, plus one step past its winning edge, then the midpoints around the winner of those three
        coarse = {float(lr): v for lr, v in list(sweep.items())[:3]}
        assert list(sweep)[3:] == [str(lr) for lr in refinement_rates(coarse)] and len(sweep) in (4, 5)
        assert data["coarse_lr"][method] == min(coarse, key=lambda lr: coarse[lr]["val_nll"])
        assert data["best_lr"][method] == float(min(sweep, key=lambda lr: sweep[lr]["val_nll"]))
        runs = data["results"][method]
        assert [r["seed"] for r in runs] == [0, 1] and all(r["lr"] == data["best_lr"][method] for r in runs)
        assert all(len(r["loss_history"]) == 2 and r["task_nll"] > 0 and r["knowledge_nll"] > 0 for r in runs)
    # calibrated once (block by block: one file per block), read by the other KPM runs
    cached = sorted(os.listdir(work / "kpm_covariance.safetensors"))
    assert cached and all(f.startswith("block-") and f.endswith(".safetensors") for f in cached)
    report = open(f"{out}.md").read()
    assert "CorDA-KPM forgets less than LoRA" in report and "--model" in report and "--lr_refine 1" in report
    assert "grid's choice before refining" in report
    assert "CorDA-KPM is at least as good as peft-CorDA-KPM" in report and "Factor norms at init" in report
    assert all(data["results"][m][0]["init_factor_norms"]["q_proj"]["A"] > 0 for m in data["results"])
    # --matched_rates: our balanced arm and peft's, each at both chosen rates, every seed
    matched = data["matched"]["CorDA-KPM vs peft-CorDA-KPM"]
    assert set(matched) == {str(data["best_lr"][m]) for m in ("CorDA-KPM", "peft-CorDA-KPM")}
    for lr, arms in matched.items():
        assert set(arms) == {"CorDA-KPM", "peft-CorDA-KPM"}
        assert all([r["seed"] for r in runs] == [0, 1] and all(r["lr"] == float(lr) for r in runs)
                   for runs in arms.values())
    assert "Our CorDA beside peft's at the same learning rates" in report
    # --extra_rates: LoRA at 3e-3 too (never in its sweep), on the 3 --extra_seeds, fully evaluated, in the
    # trade-off table and its plot (LoRA now has two rates on all seeds), and each KPM arm read at LoRA's equal gain
    extra = data["extra_rates"]
    assert sorted((r["method"], r["lr"], r["seed"]) for r in extra) == [("LoRA", 3e-3, s) for s in range(3)]
    assert all(r["task_nll"] > 0 and r["knowledge_nll"] > 0 for r in extra)
    assert "Every arm at every rate run on all seeds" in report and "--extra_seeds 3" in report
    lora_row = next(line for line in report.splitlines() if line.startswith("| LoRA | 0.003 |"))
    assert lora_row.endswith("| 3 |")  # its seeds
    assert "KPM against LoRA at equal task gain" in report
    assert {row[0].rsplit(" at ", 1)[0] for row in data["equal_gain"]} == {"CorDA-KPM", "peft-CorDA-KPM"}
    assert "_tradeoff.png" in report and os.path.getsize(f"{out}_tradeoff.png") > 0
    assert os.path.getsize(f"{out}_loss.png") > 0 and os.path.getsize(f"{out}_knowledge_vs_task.png") > 0
    # a second invocation reuses every finished run and evaluation: nothing trains again
    mtimes = {p: os.path.getmtime(p) for p in work.glob("runs/*/metrics.json")}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert mtimes and all(os.path.getmtime(p) == t for p, t in mtimes.items())
    assert json.load(open(f"{out}.json"))["results"] == data["results"]


@pytest.mark.slow  # 175 s: run with `pytest -m slow` when benchmarks/recipe_forgetting.py changes
def test_recipe_forgetting_end_to_end_on_a_tiny_model(tiny_model_dir, tmp_path):
    """The shipped recipes with 2 steps on a tiny model, 2 seeds: runs, evaluations, report, verdict, reuse."""
    fast = "--max_steps 2 --per_device_train_batch_size 2 --eval_examples 2 --eval_max_new_tokens 4"
    arms = f"LoRA=lora/config_cpu.yaml {fast};CorDA-KPM=corda/config_kpm_cpu.yaml {fast} --calibration_samples 8"
    work, out = tmp_path / "work", tmp_path / "results" / "forget"
    cmd = [sys.executable, "-m", "benchmarks.recipe_forgetting", "--model", tiny_model_dir,
           "--arms", arms, "--seeds", "2", "--knowledge_examples", "4", "--work_dir", str(work), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.load(open(f"{out}.json"))
    assert set(data["results"]) == {"LoRA", "CorDA-KPM"}
    for runs in data["results"].values():
        assert len(runs) == 2 and all(r["task_nll"] > 0 and r["knowledge_nll"] > 0 for r in runs)
    from peft_ext import read_jsonl, sample_key
    from trl_recipes.data import KNOWLEDGE_EVAL_FILE, KPM_CALIBRATION_FILE

    for run in [data["base"], *data["results"]["LoRA"]]:  # both splits, different questions
        assert run["validation"]["task_nll"] > 0 and run["validation"]["knowledge_nll"] != run["knowledge_nll"]
    knowledge = read_jsonl(work / "knowledge.jsonl")
    calibration = {sample_key(r) for r in read_jsonl(KPM_CALIBRATION_FILE)}
    assert knowledge == read_jsonl(KNOWLEDGE_EVAL_FILE)[:4] and not {sample_key(r) for r in knowledge} & calibration
    assert "CorDA-KPM forgets less than LoRA" in open(f"{out}.md").read()
    mtimes = {p: os.path.getmtime(p) for p in work.glob("runs/*/metrics.json")}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0 and all(os.path.getmtime(p) == t for p, t in mtimes.items())
    again = [*cmd[:cmd.index("--work_dir")], "--work_dir", str(tmp_path / "fresh"), "--out", str(tmp_path / "again"),
             "--reuse", f"{out}.json"]  # a new work folder: every run comes from the report, none trains
    proc = subprocess.run(again, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list((tmp_path / "fresh").glob("runs/*")) and "4 runs" in open(tmp_path / "again.md").read()
    assert json.load(open(tmp_path / "again.json"))["results"] == data["results"]


def test_reused_results_match_arms_by_recipe_and_flags_not_name():
    from types import SimpleNamespace

    from benchmarks.recipe_forgetting import recipe_digest, reused_results

    KPM = "corda/config_kpm_cpu.yaml"
    base = {"task_nll": 1.0, "validation": {"task_nll": 1.1}}
    old = {"base": base, "args": {"knowledge_examples": 200, "model": None},
           "arms": {"LoRA": ["lora/config_cpu.yaml", []], "K": [KPM, ["--learning_rate", "1e-4"]]},
           "results": {"LoRA": [{"s": 0}, {"s": 1}], "K": [{"k": 0}, {"k": 1}]}}
    args = SimpleNamespace(reuse="old.json", knowledge_examples=200, model=None, seeds=3)
    arms = {"LoRA-5e-4": ("lora/config_cpu.yaml", []), "KPM-1e-4": (KPM, ["--learning_rate", "1e-4"]), "KPM": (KPM, [])}
    assert reused_results(old, arms, args) == {"base": base}  # no recipe contents recorded: runs again
    old["recipes"] = {"LoRA": recipe_digest("lora/config_cpu.yaml"), "K": recipe_digest(KPM)}
    assert reused_results(old, arms, args) == {
        "base": base, "LoRA-5e-4,42": {"s": 0}, "LoRA-5e-4,43": {"s": 1},
        "KPM-1e-4,42": {"k": 0}, "KPM-1e-4,43": {"k": 1}}  # KPM's flags differ: it runs; seed 44 runs
    old["recipes"] = {"LoRA": "0" * 16, "K": recipe_digest(KPM)}  # LoRA's recipe changed since that report
    assert set(reused_results(old, arms, args)) == {"base", "KPM-1e-4,42", "KPM-1e-4,43"}
    with pytest.raises(SystemExit, match="old.json: its runs used .*knowledge_examples=100"):
        reused_results(old, arms, SimpleNamespace(reuse="old.json", knowledge_examples=100, model=None, seeds=3))
    old["base"] = {"task_nll": 1.0}  # a report from before the two splits: its numbers are on one split only
    with pytest.raises(SystemExit, match="old.json: its runs were evaluated on one split only"):
        reused_results(old, arms, args)


def _runs(task, forget, base):
    """Three seeds of runs whose validation numbers are (task, forgetting) and final numbers something else."""
    return [{"task_nll": 9.0, "knowledge_nll": 9.0,
             "validation": {"task_nll": task + j, "knowledge_nll": base["knowledge_nll"] + forget + j}}
            for j in (0.0, 0.002, -0.002)]


def test_rate_choices_adopt_a_rate_only_at_comparable_gain_with_less_forgetting_on_validation():
    from benchmarks.recipe_forgetting import on_split, rate_choices

    base = {"task_nll": 1.0, "knowledge_nll": 4.0, "validation": {"task_nll": 1.0, "knowledge_nll": 4.0}}
    D = "dude/config_cpu.yaml"
    arms = {"LoRA": ("lora/config_cpu.yaml", []), "DuDe": (D, ["--max_steps", "2"]),
            "DuDe-1e-4": (D, ["--max_steps", "2", "--learning_rate", "1e-4"]),
            "DuDe-5e-5": (D, ["--max_steps", "2", "--learning_rate", "5e-5"]),
            "DuDe-other": (D, ["--learning_rate", "1e-4"])}  # other flags changed too: not a rate choice
    results = {"LoRA": _runs(0.05, 1.0, base), "DuDe": _runs(0.04, 1.8, base), "DuDe-1e-4": _runs(0.048, 1.2, base),
               "DuDe-5e-5": _runs(0.08, 0.5, base), "DuDe-other": _runs(0.04, 0.1, base)}
    rows = rate_choices(arms, on_split(results, "validation"), on_split(base, "validation"))
    assert [r[0] for r in rows] == ["DuDe-1e-4", "DuDe-5e-5"] and all(r[1] == "DuDe" for r in rows)
    assert rows[0][2:4] == ["1.20×", "yes"] and rows[0][-1] == "**adopt 1e-4**"
    assert rows[1][2:4] == ["2.00×", "no"] and rows[1][-1] == "keep DuDe's rate"  # forgets less, learns less
    results["DuDe-1e-4"] = _runs(0.048, 1.8, base)  # comparable, but no less forgetting
    assert rate_choices(arms, on_split(results, "validation"), on_split(base, "validation"))[0][-1] == \
        "keep DuDe's rate"


def test_budget_rows_follow_the_plan_of_part_3():
    """Budgeted DuDe against uniform DuDe and each EVA arm (lower task NLL, 2 s.e.); budgeted KPM against uniform KPM
    (no more forgetting at comparable gain); arms without a uniform twin are not read."""
    from benchmarks.recipe_forgetting import budget_rows

    base = {"task_nll": 1.0, "knowledge_nll": 4.0}

    def runs(task, forget):
        return [{"task_nll": task + j, "knowledge_nll": 4.0 + forget + j} for j in (0.0, 0.001, -0.001)]

    B, K, L = ["--rank_allocation", "budgeted"], "corda/config_kpm_cpu.yaml", "lora/config_cpu.yaml"
    arms = {"DuDe": ("dude/config_cpu.yaml", []), "DuDe-budgeted": ("dude/config_cpu.yaml", B),
            "KPM": (K, []), "KPM-budgeted": (K, B), "KPM-budgeted-fast": (K, [*B, "--learning_rate", "1e-2"]),
            "EVA-rho2": (L, ["--peft_method", "eva", "--eva_rho", "2"])}
    results = {"DuDe": runs(0.05, 1.0), "DuDe-budgeted": runs(0.04, 1.0), "KPM": runs(0.05, 0.1),
               "KPM-budgeted": runs(0.055, 0.1), "KPM-budgeted-fast": runs(0.01, 2.0), "EVA-rho2": runs(0.03, 1.0)}
    rows = {c: v for c, v, _ in budget_rows(arms, results, base)}
    assert rows == {"DuDe-budgeted reaches a lower task NLL than DuDe": "**holds**",
                    "DuDe-budgeted reaches a lower task NLL than EVA-rho2": "**does not hold**",
                    "KPM-budgeted forgets no more than KPM at comparable gain": "**holds**"}
    results["KPM-budgeted"] = runs(0.08, 0.0)  # forgets less, learns much less
    assert budget_rows(arms, results, base)[-1][1] == "**not at comparable task gain**"


def test_setup_text_lists_only_the_grids_that_differ_from_lrs():
    from benchmarks.compare_methods import build_parser, method_grids, setup_text

    args = build_parser().parse_args(["--methods", "LoRA,CorDA-KPM", "--lrs", "1e-4,4e-4",
                                      "--lrs_for", "LoRA=1.6e-3,6.4e-3"])
    grids = method_grids(args.lrs_for, args.methods.split(","), [1e-4, 4e-4])
    text = setup_text(args, "tiny", grids)
    assert "(other grids: LoRA 0.0016,0.0064)" in text and "CorDA-KPM" not in text.split("other grids")[1]
    same = setup_text(args, "tiny", {"CorDA-KPM": [1e-4, 4e-4]})
    assert "(other grids: none)" in same


def test_rate_curves_keep_single_rate_arms_as_points_only_beside_a_curve():
    from benchmarks.compare_methods import complete_runs, rate_curves

    every = {(m, lr, seed): r for m, lr in (("LoRA", 1e-3), ("LoRA", 2e-3), ("CorDA-KPM", 1e-3))
             for seed, r in enumerate(seeds(1.0, 4.6))}
    curves = rate_curves(complete_runs(every, 3))
    assert {m: sorted(c) for m, c in curves.items()} == {"LoRA": [1e-3, 2e-3], "CorDA-KPM": [1e-3]}
    single = {k: v for k, v in every.items() if k[1] == 1e-3}
    assert rate_curves(complete_runs(single, 3)) == {}  # no arm along rates: no plot


def test_equal_gain_section_appears_only_where_lora_ran_two_rates():
    from benchmarks.compare_methods import equal_gain_text
    from benchmarks.verdicts import equal_gain_rows

    complete = {("LoRA", 1e-3): seeds(1.0, 4.6), ("LoRA", 2e-3): seeds(0.8, 5.0), ("CorDA-KPM", 1e-3): seeds(0.9, 4.55)}
    text = equal_gain_text(complete, equal_gain_rows(complete, BASE), 3)
    assert text.startswith("## KPM against LoRA at equal task gain")
    assert "| CorDA-KPM at 0.001 | 0.600 |" in text and "CorDA-KPM's curve lies below LoRA's: **holds**." in text
    one_rate = {k: v for k, v in complete.items() if k != ("LoRA", 2e-3)}
    assert equal_gain_text(one_rate, equal_gain_rows(one_rate, BASE), 3) == ""


@pytest.mark.parametrize("flag,value,message", [
    ("--lrs", "1e-4,x", "--lrs '1e-4,x': not a comma list of numbers"),
    ("--lrs_for", "LoRA=1e-3,y", "--lrs_for entry 'LoRA=1e-3,y'"),
    ("--extra_rates", "NoSuchArm=1e-3", "--extra_rates entry 'NoSuchArm=1e-3'"),
])
def test_bad_rates_exit_with_the_fix_before_anything_is_written(flag, value, message, tmp_path, monkeypatch, capsys):
    from benchmarks import compare_methods

    work = tmp_path / "work"
    monkeypatch.setattr(sys, "argv", ["compare_methods", "--methods", "LoRA", flag, value, "--work_dir", str(work)])
    with pytest.raises(SystemExit) as exc:
        compare_methods.main()
    assert message in str(exc.value) and "Fix:" in str(exc.value)
    assert not work.exists()


def test_complete_runs_keep_an_arm_run_on_more_seeds_and_drop_gaps():
    from benchmarks.compare_methods import complete_runs

    every = {}
    for key, seed_list in ((("A", 1e-3), range(5)), (("B", 1e-3), range(3)), (("C", 1e-3), (0, 1, 3)),
                           (("D", 1e-3), range(2))):
        for seed in seed_list:
            every[(*key, seed)] = {"task_nll": 1.0 + seed, "knowledge_nll": 4.5}
    complete = complete_runs(every, 3)
    assert {k: len(v) for k, v in complete.items()} == {("A", 1e-3): 5, ("B", 1e-3): 3}  # C has a gap, D too few
    assert [r["task_nll"] for r in complete[("A", 1e-3)]] == [1.0, 2.0, 3.0, 4.0, 5.0]  # ordered by seed


@pytest.mark.slow  # about 5 min: run with `pytest -m slow` when benchmarks/second_stage.py changes
def test_second_stage_end_to_end_on_a_tiny_model(tiny_model_dir, tmp_path):
    """SFT runs trained (none to reuse), DPO and GRPO from each at each seed, the base evaluated, the report with
    the plan's verdicts; a second invocation trains nothing."""
    work, out = tmp_path / "work", tmp_path / "results" / "second_stage"
    cmd = [sys.executable, "-m", "benchmarks.second_stage", "--model", tiny_model_dir, "--arms", "LoRA,CorDA-KPM",
           "--seeds", "2", "--workers", "1", "--work_dir", str(work), "--sft_runs", str(tmp_path / "none"),
           "--out", str(out), "--knowledge_examples", "4",
           "--sft_flags", "--max_steps 2 --per_device_train_batch_size 2 --eval_examples 0 --calibration_samples 16",
           "--stage_flags", "--max_steps 1 --per_device_train_batch_size 2 --eval_examples 2 --eval_max_new_tokens 4",
           "--grpo_flags", "--num_generations 2 --max_completion_length 8 --eval_reward_tokens 8",
           "--base_flags", "--task_max_new_tokens 4"]
    env = {**os.environ, "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.load(open(f"{out}.json"))
    assert set(data["results"]) == {"dpo", "grpo"}
    for stage, by_arm in data["results"].items():
        assert set(by_arm) == {"LoRA", "CorDA-KPM"}
        assert all([r["seed"] for r in runs] == [42, 43] and all(r["stage"] == stage for r in runs)
                   for runs in by_arm.values())
    kpm = data["results"]["dpo"]["CorDA-KPM"][0]
    assert kpm["learning_rate"] == pytest.approx(1.6e-4) and kpm["after"]["knowledge"]["n"] == 4
    report = open(f"{out}.md").read()
    assert "CorDA-KPM's knowledge change after dpo is lower than LoRA's" in report and "## GRPO" in report
    mtimes = {p: os.path.getmtime(p) for p in work.glob("*/*/metrics.json")}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0 and mtimes and all(os.path.getmtime(p) == t for p, t in mtimes.items())
