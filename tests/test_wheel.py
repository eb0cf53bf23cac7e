"""The package as a user installs it: the wheel, installed with `pip install --no-deps --target`, runs the packaged
KPM recipe (its calibration included) and the documented evaluation from an empty directory where this repository
cannot be imported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

from .helpers import ROOT, launch_threads

COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "outputs", "build", "*.egg-info", "__pycache__", "results")


def _build_wheel(tmp_path) -> str:
    """The wheel of a copy of the repository (building in place would leave build/ and egg-info in the checkout)."""
    src, dist = tmp_path / "src", tmp_path / "dist"
    shutil.copytree(ROOT, src, ignore=COPY_IGNORE)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(dist), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = dist.glob("peft_ext-*.whl")
    return str(wheel)


def _outside_env(tmp_path, site: str) -> list[str]:
    """A python whose path holds the installed wheel, then this environment's dependencies, but not the repository:
    a new venv, its site-packages pointing at both (the editable install's .pth is not read from there)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    venv_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    with open(os.path.join(venv_site, "outside.pth"), "w") as f:
        f.write("\n".join([site, *sorted(deps)]) + "\n")
    return [str(python)]


def test_the_wheel_runs_the_packaged_kpm_recipe_and_the_evaluation(tiny_model_dir, tmp_path):
    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    for packaged in ("trl_recipes/data/nq_open_kpm_calibration.jsonl", "trl_recipes/data/efficientqa_knowledge_eval.jsonl",
                     "trl_recipes/data/test.jsonl", "trl_recipes/data/train.jsonl", "trl_recipes/data/PROVENANCE.md",
                     "trl_recipes/recipes/SmolLM2-135M-Instruct/corda/config_kpm_cpu.yaml"):
        assert packaged in names, packaged
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), wheel],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    python = _outside_env(tmp_path, str(site))
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS=launch_threads(), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")

    def run(*args):
        return subprocess.run([*python, *args], capture_output=True, text=True, cwd=empty, env=env, timeout=900)

    where = run("-c", "import importlib.util as u, peft_ext, trl_recipes, sys; "
                      "print(peft_ext.__file__, trl_recipes.__file__, u.find_spec('tests'), u.find_spec('benchmarks'))")
    assert where.returncode == 0, where.stderr[-2000:]
    peft_ext_file, recipes_file, tests_spec, benchmarks_spec = where.stdout.split()
    assert peft_ext_file.startswith(str(site)) and recipes_file.startswith(str(site))
    assert tests_spec == benchmarks_spec == "None"  # the repository's own packages are out of reach

    out = tmp_path / "out"
    sft = run("-m", "trl_recipes.sft", "--config", "trl_recipes/recipes/SmolLM2-135M-Instruct/corda/config_kpm_cpu.yaml",
              "--model_name_or_path", tiny_model_dir, "--output_dir", str(out / "run"), "--max_steps", "2",
              "--per_device_train_batch_size", "2", "--eval_examples", "2", "--eval_max_new_tokens", "6")
    assert sft.returncode == 0, sft.stderr[-4000:]
    metrics = json.load(open(out / "run" / "metrics.json"))
    assert metrics["global_steps"] == 2 and os.path.isfile(out / "run" / "adapter_plain_peft" / "adapter_config.json")
    saved = json.load(open(out / "run" / "adapter" / "adapter_config.json"))
    assert saved["corda_method"] == "kpm" and saved["corda_train_A"] is False
    from peft_ext import read_jsonl, sample_digest
    from trl_recipes.data import KPM_CALIBRATION_FILE

    assert saved["corda_calibration"]["sample_digests"] == [sample_digest(r) for r in read_jsonl(KPM_CALIBRATION_FILE)]

    evaluation = run("-m", "trl_recipes.evaluate", "--model", tiny_model_dir, "--adapter", str(out / "run" / "adapter"),
                     "--num_task", "3", "--num_knowledge", "5", "--task_max_new_tokens", "8",
                     "--output_dir", str(out / "eval"))
    assert evaluation.returncode == 0, evaluation.stderr[-4000:]
    result = json.load(open(out / "eval" / "eval.json"))
    assert result["task_data"].startswith(str(site)) and result["knowledge_data"].startswith(str(site))
    assert result["after"]["knowledge"]["n"] == 5 and result["calibration_overlap"] == {"task": 0, "knowledge": 0}
    assert os.path.isfile(out / "eval" / "eval.md") and not os.listdir(empty)
