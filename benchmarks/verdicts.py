"""The fixed rules that decide the papers' orderings from finished runs (compare_methods, recipe_forgetting).

A run is a dict with `task_nll` (GSM8K answer NLL), `knowledge_nll` (NQ gold-answer NLL) and `loss_history`; runs of
one arm are ordered by seed, and the same seed gives every arm the same batches, so differences are paired by seed. A
difference counts when it exceeds twice its standard error over the seeds.
"""

from __future__ import annotations

import statistics

from benchmarks.common import fmt, markdown_table, mean_std, paired

# "comparable task gain": an arm's mean task answer NLL is at most this multiple of the reference's. The gain (base NLL
# minus the arm's) is saturated near the base NLL, so a share of the gain (the earlier rule: >= 90% of it) passed every
# arm, LoRA at 2e-4 included with 2.5x LoRA's task NLL; a ratio of what is left to learn can fail (plan of 2026-12-07).
COMPARABLE_TASK_NLL_RATIO = 1.25


def comparable_gain(arm_task_nll: list[float], reference_task_nll: list[float]) -> tuple[bool, float]:
    """(comparable, ratio): the arm's mean task NLL over the reference's, and whether it is within the tolerance."""
    ratio = statistics.mean(arm_task_nll) / statistics.mean(reference_task_nll)
    return ratio <= COMPARABLE_TASK_NLL_RATIO, ratio

# arms of our CorDA and the peft arm each is held against, side by side
PEFT_COUNTERPART = {"CorDA-KPM": "peft-CorDA-KPM", "CorDA-IPM": "peft-CorDA-IPM",
                    "CorDA-KPM-unbalanced": "peft-CorDA-KPM", "CorDA-IPM-unbalanced": "peft-CorDA-IPM",
                    "CorDA-IPM-maxnorm": "peft-CorDA-IPM", "CorDA-KPM-frozenA": "peft-CorDA-KPM"}


def early_loss(run, fraction=0.5):
    """Mean training loss over steps 2 .. half of the steps: how fast a method learns. Step 1's loss is computed
    before any update, on the unchanged base model (every init leaves the outputs unchanged), so it is left out."""
    hist = run["loss_history"]
    n = max(2, int(len(hist) * fraction))
    return statistics.mean(loss for _, loss in (hist[1:n] or hist[:1]))


def gain_and_forgetting(runs: list[dict], base: dict) -> dict:
    """Per seed: task gain (task answer-NLL decrease), forgetting (gold-answer NLL increase), the task NLL."""
    return {"gain": [base["task_nll"] - r["task_nll"] for r in runs],
            "forget": [r["knowledge_nll"] - base["knowledge_nll"] for r in runs],
            "task_nll": [r["task_nll"] for r in runs]}


def derived(results: dict, base: dict) -> dict:
    """Per method, per seed: `gain_and_forgetting` and the early training loss."""
    return {m: {**gain_and_forgetting(runs, base), "early": [early_loss(r) for r in runs]}
            for m, runs in results.items()}


def sign_verdict(d) -> str:
    """(mean, standard error) of a paired difference, lower is better: the 2-standard-error rule."""
    return "holds" if d[0] + 2 * d[1] < 0 else "does not hold" if d[0] - 2 * d[1] > 0 else "not shown (within noise)"


def _diff(d, unit=""):
    return f"{d[0]:+.3f} ± {d[1]:.3f}{unit}"


def kpm_claim(name, kpm, lora, lora_name="LoRA", task="GSM8K NLL", knowledge="NQ gold NLL"):
    """KPM (`gain_and_forgetting` of its runs) forgets less than LoRA, at comparable task gain (`comparable_gain`)."""
    df, dg = paired(kpm["forget"], lora["forget"]), paired(kpm["gain"], lora["gain"])
    comparable, ratio = comparable_gain(kpm["task_nll"], lora["task_nll"])
    less, more = df[0] + 2 * df[1] < 0, df[0] - 2 * df[1] > 0
    verdict = ("holds" if less and comparable else "does not hold" if more else
               "not at comparable task gain" if less else "not shown (within noise)")
    return (f"{name} forgets less than {lora_name} at comparable task gain", verdict,
            f"{knowledge} increase {name} {fmt(mean_std(kpm['forget']))} vs {lora_name} "
            f"{fmt(mean_std(lora['forget']))} (paired difference {_diff(df)}); {task} gain {name} "
            f"{fmt(mean_std(kpm['gain']))} vs {lora_name} {fmt(mean_std(lora['gain']))} (difference {_diff(dg)}; "
            f"task NLL {ratio:.2f}× {lora_name}'s, comparable (≤ {COMPARABLE_TASK_NLL_RATIO:g}×): "
            f"{'yes' if comparable else 'no'})")


def _ipm_claim(name, ipm, other_name, other, half):
    de, dt = paired(ipm["early"], other["early"]), paired(ipm["task_nll"], other["task_nll"])
    return (f"{name} learns faster than {other_name}", sign_verdict(de),
            f"mean training loss over steps 2–{half} {name} {fmt(mean_std(ipm['early']))} vs {other_name} "
            f"{fmt(mean_std(other['early']))} (paired difference {_diff(de)}); final GSM8K test answer NLL "
            f"difference {name} − {other_name} {_diff(dt)}")


def at_least_as_good_claim(ours_name, ours, theirs_name, theirs):
    """Not worse beyond noise on any measure: test NLL, forgetting, early training loss (lower is better)."""
    measures = {"GSM8K test NLL": "task_nll", "NQ forgetting": "forget", "training loss over the first half": "early"}
    diffs = {label: paired(ours[key], theirs[key]) for label, key in measures.items()}
    worse = [label for label, d in diffs.items() if d[0] - 2 * d[1] > 0]
    better = [label for label, d in diffs.items() if d[0] + 2 * d[1] < 0]
    verdict = "holds" if not worse else "does not hold"
    return (f"{ours_name} is at least as good as {theirs_name}", verdict,
            "; ".join(f"{label} {ours_name} − {theirs_name} {_diff(d)}" for label, d in diffs.items())
            + f" (better beyond noise: {', '.join(better) or 'none'}; worse: {', '.join(worse) or 'none'})")


def _rate_claim(name, best_lr):
    ratio = best_lr["LoRA"] / best_lr[name]
    verdict = "holds" if 0.25 <= ratio <= 4 else "does not hold"
    return (f"{name}'s best learning rate is within 4× of LoRA's", verdict,
            f"{name} {best_lr[name]:g} vs LoRA {best_lr['LoRA']:g} (LoRA's is {ratio:.3g}× {name}'s)")


def verdicts(results: dict, base: dict, best_lr: dict | None = None) -> list[tuple[str, str, str]]:
    """The papers' orderings, decided by fixed rules on the final runs: (claim, verdict, evidence).

    A difference counts when it exceeds twice its standard error over the paired seeds; "comparable task gain"
    means a GSM8K answer NLL at most 1.25× the other method's (`comparable_gain`). Every KPM arm is held against LoRA, every
    IPM arm against PiSSA and LoRA, each of our CorDA arms against peft's CorDA of the same mode."""
    d = derived(results, base)
    out = []
    for name in (m for m in d if "KPM" in m and "LoRA" in d):
        out.append(kpm_claim(name, d[name], d["LoRA"]))
        if best_lr and {"LoRA", name} <= best_lr.keys():
            out.append(_rate_claim(name, best_lr))
    for name in (m for m in d if "IPM" in m):
        half = max(2, int(len(results[name][0]["loss_history"]) * 0.5))
        out += [_ipm_claim(name, d[name], other, d[other], half) for other in ("PiSSA", "LoRA") if other in d]
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
    out += [at_least_as_good_claim(ours, d[ours], theirs, d[theirs])
            for ours, theirs in PEFT_COUNTERPART.items() if {ours, theirs} <= d.keys()]
    return out


# --- forgetting at equal task gain, along the rates (the plan of ac63a54) ---------------------------------------------


def gain_curve(by_lr: dict, base: dict) -> list[tuple[float, float, list[float]]]:
    """One arm at each of its rates: (mean task gain, rate, per-seed forgetting), ordered by mean gain."""
    points = []
    for lr, runs in by_lr.items():
        d = gain_and_forgetting(runs, base)
        points.append((statistics.mean(d["gain"]), lr, d["forget"]))
    return sorted(points)


def lower_envelope(curve: list) -> list:
    """The points of a `gain_curve` that no other point dominates (as much gain or more with less forgetting, in the
    means): an arm's best trade-offs. A dominated rate would make another arm look better than this arm can be."""
    mean = statistics.mean
    return [p for p in curve if not any(q is not p and q[0] >= p[0] and mean(q[2]) < mean(p[2]) for q in curve)]


def forgetting_at_gain(curve: list, gain: float) -> tuple[list[float] | None, str]:
    """An arm's per-seed forgetting at mean task gain `gain`, linear in gain between the two rates of `curve` whose
    gains bracket it (per seed, the same weights); above every gain of the curve, that of its largest-gain rate; below
    every gain, None. Also says where it was read."""
    top_gain, top_lr, top_forget = curve[-1]
    if gain > top_gain:
        return top_forget, f"at {top_lr:g}, its largest gain ({top_gain:.3f})"
    if gain < curve[0][0]:
        return None, f"below its smallest gain ({curve[0][0]:.3f} at {curve[0][1]:g})"
    for (ga, la, fa), (gb, lb, fb) in zip(curve, curve[1:]):
        if ga <= gain <= gb:
            w = 0.5 if gb == ga else (gain - ga) / (gb - ga)
            return [(1 - w) * a + w * b for a, b in zip(fa, fb)], f"between {la:g} and {lb:g} ({w:.2f} of the way)"
    return top_forget, f"at {top_lr:g}"  # a one-rate curve, at exactly its gain


def equal_gain_rows(complete: dict, base: dict, arms=lambda m: "KPM" in m) -> list[list]:
    """Every KPM arm (every arm `arms` accepts) at every rate run on all seeds (`complete`: {(arm, lr): runs}) against LoRA's forgetting at the
    same mean task gain, read off LoRA's best rates (`lower_envelope`) by `forgetting_at_gain`: [arm and rate, its
    gain, its forgetting, where LoRA was read, LoRA's forgetting there, the seeds paired, the paired difference, the
    verdict]. Runs are ordered by seed from 0, so pairing the first n of two lists pairs the seeds they share."""
    lora = lower_envelope(gain_curve({lr: runs for (m, lr), runs in complete.items() if m == "LoRA"}, base))
    if not lora:
        return []
    rows = []
    for (m, lr), runs in complete.items():
        if m == "LoRA" or not arms(m):
            continue
        d = gain_and_forgetting(runs, base)
        gain = statistics.mean(d["gain"])
        ref, where = forgetting_at_gain(lora, gain)
        row = [f"{m} at {lr:g}", f"{gain:.3f}", fmt(mean_std(d["forget"])), f"LoRA {where}"]
        if ref is None:
            rows.append([*row, "–", "–", "–", "outside LoRA's range"])
        else:
            diff, n = paired(d["forget"], ref), min(len(ref), len(runs))
            rows.append([*row, f"{statistics.mean(ref[:n]):.3f}", str(n), _diff(diff), sign_verdict(diff)])
    return rows


def lora_rates(complete: dict) -> int:
    """How many LoRA rates `complete` ({(arm, rate): runs}) holds: an equal-gain reading needs two."""
    return sum(m == "LoRA" for m, _ in complete)


def equal_gain_table(rows: list[list], knowledge: str, arm: str = "KPM") -> str:
    """The `equal_gain_rows` as a markdown table (`knowledge`: the forgetting column's label)."""
    return markdown_table([f"{arm} arm", "task gain", knowledge, "LoRA read", "LoRA's change there", "seeds paired",
                           "paired difference ± s.e.", f"{arm} forgets less"], rows)


def curve_verdicts(rows: list[list]) -> dict[str, str]:
    """Per KPM arm, from its `equal_gain_rows`: its curve lies below LoRA's ("holds") when KPM forgets less at one rate
    at least and more at none; "does not hold" when it forgets more at some rate and less at none; else "not shown"."""
    by_arm: dict[str, list[str]] = {}
    for row in rows:
        by_arm.setdefault(row[0].rsplit(" at ", 1)[0], []).append(row[-1])
    out = {}
    for arm, verdicts_ in by_arm.items():
        less, more = "holds" in verdicts_, "does not hold" in verdicts_
        out[arm] = "holds" if less and not more else "does not hold" if more and not less else "not shown"
    return out
