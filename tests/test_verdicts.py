"""benchmarks/verdicts.py: the fixed rules on synthetic runs (paired by seed, the 2-standard-error rule)."""

from __future__ import annotations

import pytest

from benchmarks.common import paired
from benchmarks.verdicts import (curve_verdicts, early_loss, equal_gain_rows, forgetting_at_gain, gain_curve,
                                 lower_envelope, verdicts)
from tests.helpers import SYNTHETIC_BASE as BASE
from tests.helpers import synthetic_run as run
from tests.helpers import synthetic_seeds as seeds


def verdict_of(results, claim_start):
    return next(v for c, v, _ in verdicts(results, BASE) if c.startswith(claim_start))


def test_paired_differences_and_early_loss():
    assert paired([1.0, 2.0, 3.0], [0.5, 1.5, 2.5]) == (0.5, 0.0)
    m, se = paired([1.0, 2.0], [0.0, 0.0])
    assert m == 1.5 and se == pytest.approx(0.5)
    # steps 2 .. half: step 1 is the unchanged base model's loss and is left out
    assert early_loss(run(0, 0, [9.0, 1.0, 3.0, 0.0, 0.0, 0.0])) == 2.0


@pytest.mark.parametrize("kpm_gain,kpm_forget,expected", [
    (0.60, 0.00, "holds"),                          # forgets less, same gain
    (0.30, 0.00, "not at comparable task gain"),    # forgets less but learns much less (1.33x the task NLL)
    (0.60, 0.40, "does not hold"),                  # forgets more
    (0.60, 0.195, "not shown (within noise)"),      # a difference inside the seeds' noise
])
def test_kpm_verdict(kpm_gain, kpm_forget, expected):
    lora = seeds(BASE["task_nll"] - 0.6, BASE["knowledge_nll"] + 0.2)
    kpm = [run(BASE["task_nll"] - kpm_gain + j, BASE["knowledge_nll"] + kpm_forget + 3 * j, [2.0, 1.0, 1.0, 0.5])
           for j in (0.0, 0.01, -0.01)]
    assert verdict_of({"LoRA": lora, "CorDA-KPM": kpm}, "CorDA-KPM forgets less") == expected


def test_ipm_verdicts_compare_early_loss_to_each_method():
    results = {"LoRA": seeds(0.9, 4.5, early=1.2), "PiSSA": seeds(0.9, 4.5, early=0.9),
               "CorDA-IPM": seeds(0.9, 4.5, early=1.0)}
    assert verdict_of(results, "CorDA-IPM learns faster than LoRA") == "holds"
    assert verdict_of(results, "CorDA-IPM learns faster than PiSSA") == "does not hold"


def test_every_corda_arm_is_judged_and_held_against_peft():
    """Each KPM/IPM arm gets its own claims; ours is held against peft's CorDA of the same mode on every measure."""
    results = {"LoRA": seeds(0.9, 4.7), "PiSSA": seeds(0.9, 4.5, early=0.9),
               "CorDA-IPM": seeds(0.9, 4.5, early=0.9), "CorDA-IPM-unbalanced": seeds(1.0, 4.8, early=1.2),
               "peft-CorDA-IPM": seeds(0.95, 4.5, early=1.0), "CorDA-KPM": seeds(0.9, 4.5),
               "peft-CorDA-KPM": seeds(0.9, 4.5), "CorDA-KPM-frozenA": seeds(0.9, 4.4, early=1.1)}
    claims = {c: v for c, v, _ in verdicts(results, BASE, {"LoRA": 4e-3, "CorDA-KPM": 2e-3, "peft-CorDA-KPM": 1e-4})}
    assert claims["CorDA-IPM learns faster than LoRA"] == "holds"
    assert claims["CorDA-IPM-unbalanced learns faster than PiSSA"] == "does not hold"
    assert claims["peft-CorDA-KPM forgets less than LoRA at comparable task gain"] == "holds"
    # better on task and early loss, equal on forgetting: holds; worse on all three: does not hold
    assert claims["CorDA-IPM is at least as good as peft-CorDA-IPM"] == "holds"
    assert claims["CorDA-IPM-unbalanced is at least as good as peft-CorDA-IPM"] == "does not hold"
    assert claims["CorDA-KPM is at least as good as peft-CorDA-KPM"] == "holds"  # equal everywhere
    assert claims["CorDA-KPM-frozenA is at least as good as peft-CorDA-KPM"] == "does not hold"  # learns slower
    assert claims["CorDA-KPM's best learning rate is within 4× of LoRA's"] == "holds"
    assert claims["peft-CorDA-KPM's best learning rate is within 4× of LoRA's"] == "does not hold"


def test_dude_verdict_needs_a_match_and_a_smaller_spread():
    dora = seeds(0.90, 4.5, jitter=(0.0, 0.02, -0.02))
    assert verdict_of({"DoRA": dora, "DuDe": seeds(0.89, 4.5)}, "DuDe") == "holds"
    assert verdict_of({"DoRA": dora, "DuDe": seeds(0.89, 4.5, jitter=(0.0, 0.03, -0.03))}, "DuDe") == \
        "matches, spread not smaller"
    assert verdict_of({"DoRA": dora, "DuDe": seeds(1.00, 4.5)}, "DuDe") == "does not hold"
    assert [c for c, _, _ in verdicts({"DoRA": dora}, BASE)] == []  # only the claims whose methods ran


def test_recipe_forgetting_verdict_rule():
    from benchmarks.recipe_forgetting import claim

    base = {"task_nll": 1.0, "knowledge_nll": 4.0}
    lora = [{"task_nll": 0.5 + j, "knowledge_nll": 5.0 + j} for j in (0.0, 0.01, -0.01)]
    assert claim([{"task_nll": 0.5 + j, "knowledge_nll": 4.5 + j} for j in (0.0, 0.02, -0.01)], lora, base)[1] == "holds"
    assert claim([{"task_nll": 0.5 + j, "knowledge_nll": 6.0 + j} for j in (0.0, 0.02, -0.01)], lora, base)[1] == \
        "does not hold"
    assert claim([{"task_nll": 0.9 + j, "knowledge_nll": 4.5 + j} for j in (0.0, 0.02, -0.01)], lora, base)[1] == \
        "not at comparable task gain"


def test_comparable_gain_rejects_an_arm_the_share_of_gain_rule_passed():
    """The recorded task NLLs of recipe_forgetting_frozenA_rates (base 0.995): LoRA at 2e-4 kept 92% of the 5e-4
    recipe's gain, so ">= 90% of the gain" called it comparable with 2.5x the task NLL; the ratio rule rejects it and
    keeps LoRA at 4e-4 (1.15x)."""
    from benchmarks.verdicts import COMPARABLE_TASK_NLL_RATIO, comparable_gain

    base, lora = 0.995, [0.049, 0.048, 0.045]
    lora_2e4, lora_4e4 = [0.127, 0.118, 0.111], [0.058, 0.053, 0.052]
    assert (base - sum(lora_2e4) / 3) / (base - sum(lora) / 3) > 0.9  # the old rule passed it
    ok, ratio = comparable_gain(lora_2e4, lora)
    assert not ok and ratio == pytest.approx(2.5, abs=0.05) and COMPARABLE_TASK_NLL_RATIO == 1.25
    ok, ratio = comparable_gain(lora_4e4, lora)
    assert ok and ratio == pytest.approx(1.15, abs=0.01)
    rejected = [{"task_nll": t, "knowledge_nll": 4.0} for t in lora_2e4]  # forgets far less, learns far less
    from benchmarks.recipe_forgetting import claim

    verdict = claim(rejected, [{"task_nll": t, "knowledge_nll": 4.6 + t} for t in lora], {"task_nll": base,
                                                                                          "knowledge_nll": 3.9})
    assert verdict[1] == "not at comparable task gain" and "2.51× LoRA's" in verdict[2]


def test_forgetting_at_gain_interpolates_between_the_bracketing_rates():
    curve = [(0.5, 1e-3, [0.1, 0.2, 0.3]), (0.7, 2e-3, [0.5, 0.6, 0.7]), (0.8, 4e-3, [1.0, 1.0, 1.0])]
    at, where = forgetting_at_gain(curve, 0.55)
    assert at == pytest.approx([0.2, 0.3, 0.4]) and where == "between 0.001 and 0.002 (0.25 of the way)"
    at, where = forgetting_at_gain(curve, 0.75)  # the second bracket, not the first
    assert at == pytest.approx([0.75, 0.8, 0.85]) and where.startswith("between 0.002 and 0.004")
    at, where = forgetting_at_gain(curve, 0.9)  # above every gain: the largest-gain rate
    assert at == [1.0, 1.0, 1.0] and where == "at 0.004, its largest gain (0.800)"
    at, where = forgetting_at_gain(curve, 0.4)  # below every gain: not decided
    assert at is None and where.startswith("below its smallest gain")
    assert forgetting_at_gain(curve[:1], 0.5)[0] == [0.1, 0.2, 0.3]  # one rate, exactly its gain


def test_gain_curve_orders_an_arms_rates_by_task_gain():
    curve = gain_curve({2e-3: seeds(0.8, 5.0), 1e-3: seeds(1.0, 4.6), 4e-3: seeds(0.9, 5.5)}, BASE)
    assert [lr for _, lr, _ in curve] == [1e-3, 4e-3, 2e-3]  # gains 0.5, 0.6, 0.7: not the order of the rates
    assert curve[0][2] == pytest.approx([0.1, 0.11, 0.09])


def test_equal_gain_rows_hold_each_kpm_rate_against_lora_at_the_same_gain():
    """LoRA gains 0.5 (forgets 0.1) at 1e-3 and 0.7 (forgets 0.5) at 2e-3: at gain 0.6 it forgets 0.3."""
    complete = {("LoRA", 1e-3): seeds(1.0, 4.6), ("LoRA", 2e-3): seeds(0.8, 5.0),
                ("CorDA-KPM", 5e-4): seeds(1.2, 4.5),      # gain 0.3: below LoRA's range
                ("CorDA-KPM", 1e-3): seeds(0.9, 4.55),     # gain 0.6, forgets 0.05 < 0.3
                ("peft-CorDA-KPM", 2e-3): seeds(0.75, 5.4),  # gain 0.75 > LoRA's largest, forgets 0.9 > 0.5
                ("CorDA-IPM", 1e-3): seeds(0.9, 6.0)}       # not a KPM arm: no row
    rows = equal_gain_rows(complete, BASE)
    assert [r[0] for r in rows] == ["CorDA-KPM at 0.0005", "CorDA-KPM at 0.001", "peft-CorDA-KPM at 0.002"]
    assert rows[0][-1] == "outside LoRA's range" and rows[0][4] == "–"
    assert rows[1][1] == "0.600" and rows[1][3] == "LoRA between 0.001 and 0.002 (0.50 of the way)"
    assert rows[1][4] == "0.300" and rows[1][5] == "3" and rows[1][6].startswith("-0.250") and rows[1][-1] == "holds"
    assert rows[2][3] == "LoRA at 0.002, its largest gain (0.700)" and rows[2][-1] == "does not hold"
    assert curve_verdicts(rows) == {"CorDA-KPM": "holds", "peft-CorDA-KPM": "does not hold"}
    noisy = {**complete, ("CorDA-KPM", 1e-3): seeds(0.9, 4.8, jitter=(0.0, 0.3, -0.3))}  # 0.3 ± noise
    assert equal_gain_rows(noisy, BASE)[1][-1] == "not shown (within noise)"
    assert curve_verdicts(equal_gain_rows(noisy, BASE))["CorDA-KPM"] == "not shown"
    assert equal_gain_rows({k: v for k, v in complete.items() if k[0] != "LoRA"}, BASE) == []  # no LoRA: no rows


def test_a_kpm_curve_forgetting_less_at_one_rate_and_more_at_another_is_not_shown():
    rows = [["A at 0.001", "", "", "", "", "", "", "holds"], ["A at 0.002", "", "", "", "", "", "", "does not hold"],
            ["B at 0.001", "", "", "", "", "", "", "outside LoRA's range"]]
    assert curve_verdicts(rows) == {"A": "not shown", "B": "not shown"}


def test_equal_gain_pairs_the_seeds_both_arms_ran():
    """KPM on 5 seeds against LoRA on 3: the first 3 (seeds 0-2) are paired; KPM's gain is the mean of its 5."""
    five = seeds(0.9, 4.55, jitter=(0.0, 0.01, -0.01, 0.02, -0.02))
    complete = {("LoRA", 1e-3): seeds(1.0, 4.6), ("LoRA", 2e-3): seeds(0.8, 5.0), ("CorDA-KPM", 1e-3): five}
    (row,) = equal_gain_rows(complete, BASE)
    assert row[1] == "0.600" and row[5] == "3" and row[6].startswith("-0.250") and row[-1] == "holds"


def test_a_lora_rate_another_dominates_is_not_read():
    """LoRA at 4e-3 gains less (0.5) and forgets more (0.4) than at 2e-3 (0.6, 0.1): KPM is read against 2e-3 only."""
    curve = gain_curve({2e-3: seeds(0.9, 4.6), 4e-3: seeds(1.0, 4.9), 1e-3: seeds(1.1, 4.4)}, BASE)
    assert [lr for _, lr, _ in lower_envelope(curve)] == [1e-3, 2e-3]
    complete = {("LoRA", 2e-3): seeds(0.9, 4.6), ("LoRA", 4e-3): seeds(1.0, 4.9), ("CorDA-KPM", 1e-3): seeds(1.0, 4.6)}
    (row,) = equal_gain_rows(complete, BASE)  # gain 0.5: below the one best LoRA rate's gain, 0.6
    assert row[-1] == "outside LoRA's range" and "0.600 at 0.002" in row[3]


def test_recipe_arms_rates_come_from_the_flag_or_the_recipe():
    from benchmarks.recipe_forgetting import arm_rate

    assert arm_rate("lora/config_cpu.yaml", []) == 5e-4  # the recipe's own
    assert arm_rate("corda/config_kpm_cpu.yaml", []) == 1.6e-3
    assert arm_rate("lora/config_cpu.yaml", ["--max_steps", "2", "--learning_rate", "3e-4"]) == 3e-4
    assert arm_rate("lora/config_cpu.yaml", ["--learning_rate=1e-4"]) == 1e-4
    with pytest.raises(SystemExit, match="'fast' is not a number"):
        arm_rate("lora/config_cpu.yaml", ["--learning_rate", "fast"])


def test_recipe_lora_arms_are_one_curve_and_every_arm_is_read_along_it(tmp_path):
    """LoRA arms (any name starting with LoRA) are the rates of one curve; KPM at 2e-4 and DuDe are read between two
    of them (recipe_forgetting reads every arm, compare_methods' default only KPM arms)."""
    from benchmarks.recipe_forgetting import along_rates, equal_gain_text, tradeoff_figure

    arms = {"LoRA": ("lora/config_cpu.yaml", []), "LoRA-2e-4": ("lora/config_cpu.yaml", ["--learning_rate", "2e-4"]),
            "CorDA-KPM": ("corda/config_kpm_cpu.yaml", ["--learning_rate", "2e-4"]),
            "DuDe": ("dude/config_cpu.yaml", [])}
    results = {"LoRA": seeds(0.8, 5.0), "LoRA-2e-4": seeds(1.0, 4.6), "CorDA-KPM": seeds(0.9, 4.55),
               "DuDe": seeds(0.9, 5.2)}
    complete = along_rates(arms, results)
    assert set(complete) == {("LoRA", 5e-4), ("LoRA", 2e-4), ("CorDA-KPM", 2e-4), ("DuDe", 2e-4)}
    assert [r[0] for r in equal_gain_rows(complete, BASE)] == ["CorDA-KPM at 0.0002"]
    rows = equal_gain_rows(complete, BASE, arms=lambda m: True)
    assert rows[0][3] == "LoRA between 0.0002 and 0.0005 (0.50 of the way)" and rows[0][-1] == "holds"
    assert rows[1][0] == "DuDe at 0.0002" and rows[1][-1] == "does not hold"
    text = equal_gain_text(rows, 2)
    assert "| CorDA-KPM at 0.0002 | 0.600 |" in text and "CorDA-KPM lies **below LoRA's curve**" in text
    assert "DuDe lies **above LoRA's curve**" in text
    assert equal_gain_text(rows, 1) == ""  # one LoRA arm: no curve to read
    tradeoff_figure(complete, BASE, str(tmp_path / "plots" / "r_tradeoff.png"))
    assert (tmp_path / "plots" / "r_tradeoff.png").stat().st_size > 10_000
    with pytest.raises(SystemExit, match="'LoRA' and 'LoRA-again' are both LoRA at learning rate 0.0005"):
        along_rates({**arms, "LoRA-again": ("lora/config_cpu.yaml", ["--max_steps", "9"])}, dict.fromkeys(
            [*arms, "LoRA-again"], []))


def test_recipe_forgetting_refuses_two_lora_arms_at_one_rate_before_writing(tmp_path, monkeypatch):
    from benchmarks import recipe_forgetting

    work = tmp_path / "work"
    monkeypatch.setattr("sys.argv", ["recipe_forgetting", "--work_dir", str(work), "--out", str(tmp_path / "r"),
                                     "--arms", "LoRA=lora/config_cpu.yaml;LoRA-b=lora/config_cpu.yaml --seed 1"])
    with pytest.raises(SystemExit, match="both LoRA at learning rate 0.0005"):
        recipe_forgetting.main()
    assert not work.exists() and not list(tmp_path.iterdir())
