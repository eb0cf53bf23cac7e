"""The data that travels with the package: provenance, disjointness, recipe-relative paths, Hub ids, and nothing that
reaches outside the repository."""

from __future__ import annotations

import glob
import hashlib
import os
import re

import pytest

from peft_ext import read_jsonl, sample_key
from trl_recipes.data import (CALIBRATION_FILES, DATA_DIR, KNOWLEDGE_EVAL_FILE, KNOWLEDGE_EVAL_FILES,
                              KNOWLEDGE_FINAL_FILE, KPM_CALIBRATION_FILE, SECOND_STAGE_FILES, TASK_EVAL_FILES,
                              TEST_FILE, TRAIN_FILE, FINAL_TEST_FILE)

from .helpers import ROOT, SMOL

PROVENANCE = open(os.path.join(DATA_DIR, "PROVENANCE.md")).read()


def _keys(path: str) -> set[str]:
    return {sample_key(r) for r in read_jsonl(path)}


def test_every_packaged_file_has_provenance_with_its_sha256():
    files = sorted(glob.glob(os.path.join(DATA_DIR, "*.jsonl")))
    assert {os.path.basename(f) for f in files} >= {os.path.basename(f) for f in (TRAIN_FILE, TEST_FILE,
                                                                                 KPM_CALIBRATION_FILE,
                                                                                 KNOWLEDGE_EVAL_FILE, FINAL_TEST_FILE,
                                                                                 KNOWLEDGE_FINAL_FILE)}
    for path in files:
        name = os.path.basename(path)
        row = next((line for line in PROVENANCE.splitlines() if line.startswith(f"| `{name}` |")), None)
        assert row is not None, f"{name} has no row in PROVENANCE.md"
        digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
        assert f"`{digest}`" in row, f"{name}: sha256 {digest} is not the one PROVENANCE.md records"
        records = int(row.split("|")[3])
        assert len(read_jsonl(path)) == records, name
        assert re.search(r"Apache-2\.0|CC BY-SA 3\.0", row) and "/" in row.split("|")[-2], f"{name}: licence, Hub id"


def test_no_calibration_slice_shares_a_question_with_a_knowledge_evaluation_slice():
    for calibration in CALIBRATION_FILES:
        for knowledge in KNOWLEDGE_EVAL_FILES:
            shared = _keys(calibration) & _keys(knowledge)
            assert len(shared) == 0, (os.path.basename(calibration), os.path.basename(knowledge), sorted(shared)[:3])
    for task in TASK_EVAL_FILES:  # the task evaluation sets are held out from the training data
        assert not _keys(TRAIN_FILE) & _keys(task), os.path.basename(task)
    # the validation slices (where benchmarks choose) share nothing with the final test slices (where they report)
    assert not _keys(FINAL_TEST_FILE) & _keys(TEST_FILE)
    assert not _keys(KNOWLEDGE_FINAL_FILE) & _keys(KNOWLEDGE_EVAL_FILE)
    # the second stage's problems: none from SFT's training or evaluation, none shared between its own files
    for i, stage in enumerate(SECOND_STAGE_FILES):
        for other in (TRAIN_FILE, *TASK_EVAL_FILES, *SECOND_STAGE_FILES[i + 1:]):
            assert not _keys(stage) & _keys(other), (os.path.basename(stage), os.path.basename(other))


def test_the_overlap_check_sees_a_shared_question():
    """The check above can fail: a knowledge record written differently from a calibration one still matches it."""
    calibration = read_jsonl(KPM_CALIBRATION_FILE)[0]
    same = {"question": "  " + calibration["question"].upper() + " ?", "answer": ["x"]}
    assert sample_key(same) == sample_key(calibration)
    as_chat = {"messages": [{"role": "user", "content": calibration["question"]}, {"role": "assistant", "content": "a"}]}
    assert sample_key(as_chat) == sample_key(calibration)


def test_the_kpm_recipe_calibrates_on_the_packaged_slice_from_any_directory(tmp_path, monkeypatch):
    from trl_recipes.sft import parse_args

    monkeypatch.chdir(tmp_path)  # nothing of the repository is relative to here
    recipe = "trl_recipes/recipes/SmolLM2-135M-Instruct/corda/config_kpm_cpu.yaml"
    _, _, _, method_args = parse_args(["--config", recipe, "--output_dir", "x"])
    assert method_args.calibration_dataset == KPM_CALIBRATION_FILE
    given = str(tmp_path / "mine.jsonl")  # a path on the command line is the user's, relative to where they are
    _, _, _, method_args = parse_args(["--config", recipe, "--calibration_dataset", given, "--output_dir", "x"])
    assert method_args.calibration_dataset == given


def test_recipe_headers_name_the_full_data_sets_by_hub_id():
    for path in glob.glob(os.path.join(SMOL, "*", "*.yaml")):
        header = "".join(line for line in open(path) if line.startswith("#"))
        assert "--dataset_name openai/gsm8k --dataset_config main" in header, path
        if os.sep + "dpo" + os.sep in path:  # and a preference set in TRL's format
            assert "--dataset_name trl-lib/ultrafeedback_binarized" in header, path
        if "kpm" in path:
            assert "--calibration_dataset google-research-datasets/nq_open" in header, path


def test_the_cli_takes_the_hub_ids_the_recipes_name(monkeypatch):
    """--dataset_name/--dataset_config and --calibration_dataset/--calibration_split reach `datasets.load_dataset`
    as Hub ids (no local file is looked for), and evaluate's --knowledge_data too."""
    import datasets

    from trl_recipes.dataset import load_datasets
    from trl_recipes.evaluate import read_records
    from trl_recipes.sft import parse_args

    calls = []

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        if "gsm8k" in path:
            return datasets.Dataset.from_list([{"question": "1+1?", "answer": "2\n#### 2"}] * 4)
        return datasets.Dataset.from_list([{"question": "who?", "answer": ["me"]}] * 4)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    script, training, _, method = parse_args([
        "--config", os.path.join(SMOL, "corda", "config_kpm_cpu.yaml"), "--output_dir", "x",
        "--dataset_name", "openai/gsm8k", "--dataset_config", "main",
        "--calibration_dataset", "google-research-datasets/nq_open", "--calibration_split", "train"])
    train, held_out, calibration = load_datasets(script, training, method)
    assert ("openai/gsm8k", "main", "train") in calls and ("google-research-datasets/nq_open", None, "train") in calls
    assert set(train.column_names) == {"prompt", "completion"} and held_out
    assert calibration[0]["messages"][0]["content"] == "who?"
    assert read_records("google-research-datasets/nq_open", 2, "validation")[0]["answer"] == ["me"]
    assert calls[-1] == ("google-research-datasets/nq_open", None, "validation")


SHARED = "../" + "shared"  # spelled in two parts, so that this file does not contain it


@pytest.mark.parametrize("place", ["peft_ext", "trl_recipes", "tests", "docs", "README.md"])
def test_nothing_reaches_outside_the_repository(place):
    root = os.path.join(ROOT, place)
    paths = [root] if os.path.isfile(root) else [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                                                 if f.endswith((".py", ".md", ".yaml", ".json", ".toml"))]
    assert paths
    found = [os.path.relpath(p, ROOT) for p in paths if SHARED in open(p, encoding="utf-8").read()]
    assert not found, f"{SHARED} in {found}"
    if place == "tests":  # no test stands down because a file or folder is missing
        skips = [p for p in paths if re.search(r"skipif\(\s*not os\.path", open(p).read())]
        assert not skips, skips
