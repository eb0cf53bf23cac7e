"""DPO and GRPO after SFT (`trl_recipes.dpo`, `trl_recipes.grpo`): each continues a DuDe, CorDA-KPM or LoRA adapter
of `trl_recipes.sft` on a tiny model for a few steps, and reports; the packaged pairs and the rewards are right; bad
input stops with one line."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from peft_ext import read_jsonl
from trl_recipes.data import GRPO_EVAL_FILE, PREFERENCE_EVAL_FILE, PREFERENCE_TRAIN_FILE
from trl_recipes.evaluate import final_number

from .helpers import FAST, SMOL, assert_adapter_and_export_agree

SFT_RECIPES = {"dude": "dude/config_cpu.yaml", "corda": "corda/config_kpm_cpu.yaml", "lora": "lora/config_cpu.yaml"}
STAGE = ["--max_steps", "2", "--logging_steps", "1", "--eval_examples", "2", "--eval_max_new_tokens", "6",
         "--num_knowledge", "4", "--learning_rate", "1e-2", "--warmup_steps", "0"]  # 2 steps that move the policy
HELD_OUT = 6  # held-out pairs, prompts and task problems the tests evaluate on (the packaged files' first ones)


@pytest.fixture(scope="module")
def small_eval(tmp_path_factory) -> dict[str, list[str]]:
    """Per stage, the flags pointing its evaluation at the first HELD_OUT records of the packaged held-out files."""
    from trl_recipes.data import TEST_FILE

    folder = tmp_path_factory.mktemp("held-out")

    def first(path) -> str:
        small = folder / os.path.basename(path)
        small.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(path)[:HELD_OUT]))
        return str(small)

    task = ["--task_eval_data", first(TEST_FILE)]
    return {"dpo": ["--eval_pairs", first(PREFERENCE_EVAL_FILE), *task],
            "grpo": ["--eval_prompts", first(GRPO_EVAL_FILE), *task]}


@pytest.fixture(scope="module")
def sft_runs(tiny_model_dir, tmp_path_factory):
    """One finished 2-step SFT run per method on the tiny model: method -> output directory."""
    from trl_recipes.sft import run

    out = {}
    for method, recipe in SFT_RECIPES.items():
        out[method] = str(tmp_path_factory.mktemp(f"sft-{method}"))
        run(["--config", os.path.join(SMOL, recipe), "--model_name_or_path", tiny_model_dir, "--output_dir",
             out[method], *FAST, "--calibration_samples", "16"])
    return out


def _lora_A(adapter_dir) -> dict:
    return {k: v for k, v in load_file(os.path.join(adapter_dir, "adapter_model.safetensors")).items()
            if k.endswith("lora_A.weight")}


@pytest.mark.parametrize("method", ["dude", "corda", "lora"])
def test_dpo_continues_each_sft_adapter(method, sft_runs, small_eval, tiny_model_dir, tmp_path):
    from trl_recipes.dpo import parse_args, main

    out = tmp_path / "dpo"
    metrics = main(*parse_args(["--model_name_or_path", tiny_model_dir, "--sft_adapter", sft_runs[method],
                                "--output_dir", str(out), "--per_device_train_batch_size", "2", *STAGE,
                                *small_eval["dpo"]]))
    assert metrics["method"] == method and metrics["global_steps"] == 2
    before, after = metrics["before"]["preference"], metrics["after"]["preference"]
    assert before["pairs"] == after["pairs"] == HELD_OUT and "reward_margin" not in before  # no reference before training
    assert 0 <= after["reward_accuracy"] <= 1 and after["reward_margin"] != 0.0  # the policy moved from the reference
    assert {"task", "knowledge"} <= set(metrics["before"]) and metrics["after"]["knowledge"]["n"] == 4
    assert (out / "loss_curve.png").is_file() and json.loads((out / "metrics.json").read_text())["stage"] == "dpo"
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert not (out / "adapter" / "ref").exists()  # TRL's reference copy is not saved
    if method == "corda":  # KPM's A stays frozen through the second stage
        assert saved["corda_train_A"] is False
        sft_A = _lora_A(os.path.join(sft_runs[method], "adapter"))
        assert all(torch.equal(v, sft_A[k]) for k, v in _lora_A(out / "adapter").items())
    if method != "lora":
        assert_adapter_and_export_agree(tiny_model_dir, out)


@pytest.mark.parametrize("method", ["dude", "corda"])
def test_grpo_continues_an_sft_adapter_with_a_verifiable_reward(method, sft_runs, small_eval, tiny_model_dir,
                                                                tmp_path):
    from trl_recipes.grpo import parse_args, main

    out = tmp_path / "grpo"
    metrics = main(*parse_args(["--model_name_or_path", tiny_model_dir, "--sft_adapter", sft_runs[method],
                                "--output_dir", str(out), "--max_completion_length", "8",
                                "--eval_reward_tokens", "8", *STAGE, *small_eval["grpo"]]))
    assert metrics["method"] == method and metrics["global_steps"] == 2
    for side in ("before", "after"):
        reward = metrics[side]["reward"]
        assert reward["prompts"] == HELD_OUT and 0 <= reward["mean_reward"] <= 1.2
    assert (out / "metrics.json").is_file() and not (out / "adapter" / "ref").exists()
    assert_adapter_and_export_agree(tiny_model_dir, out)


def test_bad_input_stops_with_one_line(tmp_path, capsys, sft_runs):
    from trl_recipes import dpo, grpo

    assert dpo.cli(["--output_dir", str(tmp_path)]) == 2
    assert "--sft_adapter is required" in capsys.readouterr().err
    assert grpo.cli(["--sft_adapter", str(tmp_path), "--output_dir", str(tmp_path)]) == 2
    assert "holds no adapter_config.json" in capsys.readouterr().err
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "a", "answer": "b"}) + "\n")
    assert dpo.cli(["--sft_adapter", sft_runs["lora"], "--dataset_name", str(tmp_path / "pairs.jsonl"),
                    "--output_dir", str(tmp_path / "x")]) == 2
    assert "lacks the preference columns ['chosen', 'rejected']" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    (tmp_path / "bad.yaml").write_text("learning_rate: 1e-5\nbf16: false\nwarmup_ratio_typo: 3\n")
    assert dpo.cli(["--config", str(tmp_path / "bad.yaml"), "--sft_adapter", sft_runs["lora"]]) == 2
    assert "has unknown keys" in capsys.readouterr().err


# --- the packaged second-stage data and the rewards -----------------------------------------------------------------


def _text(messages) -> str:
    return messages[-1]["content"]


def test_each_pair_prefers_the_worked_answer_to_one_with_a_slip():
    from trl_recipes.data.make_default_data import problem
    import random

    reference = {}  # question -> worked answer, from the generator's stream
    rng = random.Random(20261125)
    while len(reference) < 1500:
        q, a = problem(rng)
        reference.setdefault(q, a)
    for path in (PREFERENCE_TRAIN_FILE, PREFERENCE_EVAL_FILE):
        for pair in read_jsonl(path):
            chosen, rejected = _text(pair["chosen"]), _text(pair["rejected"])
            assert chosen == reference[_text(pair["prompt"])]
            assert final_number(rejected) != final_number(chosen)
            assert chosen.count("=") == rejected.count("=") and chosen.split()[0] == rejected.split()[0]


def test_the_rewards_check_the_final_number_and_the_format():
    from trl_recipes.rewards import correctness_reward, format_reward, total_reward

    record = read_jsonl(GRPO_EVAL_FILE)[0]
    right = [{"role": "assistant", "content": record["answer"]}]
    wrong = "It is 3.\n#### " + str(int(final_number(record["answer"])) + 1)
    unformatted = "The answer is " + final_number(record["answer"])
    answers = [record["answer"]] * 3
    assert correctness_reward([right, wrong, unformatted], answer=answers) == [1.0, 0.0, 1.0]
    assert format_reward([right, wrong, unformatted]) == [0.2, 0.2, 0.0]
    assert total_reward([right, wrong, unformatted], answers) == [1.2, 0.2, 1.0]
