"""DeepSpeed ZeRO-2/3 with 2 processes on CPU over gloo: identical init, calibration and complete saved adapters."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from .helpers import FAST, ROOT, SMOL, assert_adapter_and_export_agree, check_finished_run

ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")
CONFIGS = os.path.join(ROOT, "tests", "distributed")


def free_port() -> int:
    """A port no other launch holds (pytest-xdist runs two tests at a time; accelerate's default is 29500 for all)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: str, *args, timeout=900):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([ACCELERATE, "launch", "--config_file", os.path.join(CONFIGS, config),
                           "--main_process_port", str(free_port()), *args],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


# IPM block by block runs with budgeted ranks (its uniform path is KPM's, block by block, and IPM's, whole-model)
@pytest.mark.parametrize("method", ["dude", "corda-kpm", "corda-ipm", "corda-kpm-sequential",
                                    "corda-ipm-budgeted-sequential"])
def test_zero3_init_equals_single_process(method, tiny_model_dir, tmp_path):
    """A model partitioned by ZeRO-3 over 2 ranks gets the same adapter and residual as in one process (≤ 1e-6);
    for CorDA each rank calibrates half the data and the covariances are all-reduced (whole-model) or reduced
    block by block, with one block's weights gathered at a time; the decompositions are sharded over the ranks."""
    sys.path.insert(0, CONFIGS)
    from transformers import AutoModelForCausalLM

    from zero3_init import build, calibration_batches, collect

    out = tmp_path / "z3.pt"
    proc = launch("zero3_cpu.yaml", os.path.join(CONFIGS, "zero3_init.py"), method, tiny_model_dir, str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    z3 = torch.load(out)
    assert z3["world_size"] == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched ranks (OMP_NUM_THREADS=1): same BLAS reduction order
    try:
        single_model, single_cov = build(method, AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                         calibration_batches())
        single = collect(single_model)
    finally:
        torch.set_num_threads(threads)
    assert z3["layers"].keys() == single.keys() and len(single) == 14
    if "budgeted" in method:  # every rank allocated from the same spectra: the ranks differ from uniform r, as here
        assert len({t["A"].shape[0] for t in single.values()}) > 1
    for name, tensors in single.items():
        for key, t in tensors.items():
            assert rel(z3["layers"][name][key], t) <= 1e-6, (name, key, rel(z3["layers"][name][key], t))
    if method.endswith("sequential"):
        assert int(z3["covariances"]["max_blocks_gathered"]) == 1  # never more than the block that runs
        return
    for name, cov in single_cov.items():
        assert rel(z3["covariances"][name], cov) <= 1e-6, name


@pytest.mark.parametrize("stage,method,recipe,extra", [
    pytest.param("zero2", "dude", "dude/config_cpu.yaml", [], id="zero2-dude"),
    pytest.param("zero3", "dude", "dude/config_cpu.yaml", [], id="zero3-dude"),
    pytest.param("zero3", "corda", "corda/config_ipm_cpu.yaml", [], id="zero3-corda-ipm"),
    # QLoRA-style: transformers loads a 4-bit model whole on every rank (no zero.Init); the engine partitions the
    # 4-bit storage, which check_quantization sets to the compute dtype
    pytest.param("zero3", "dude", "dude/config_cpu.yaml", ["--load_in_4bit"], id="zero3-dude-4bit"),
    pytest.param("zero3", "corda", "corda/config_kpm_cpu.yaml", ["--load_in_4bit"], id="zero3-corda-kpm-4bit"),
])
def test_sft_under_deepspeed_saves_a_complete_adapter(stage, method, recipe, extra, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    proc = launch(f"{stage}_cpu.yaml", "-m", "trl_recipes.sft", "--config", os.path.join(SMOL, recipe),
                  "--model_name_or_path", tiny_model_dir, "--output_dir", str(out), *FAST,
                  "--calibration_samples", "16", *extra)
    assert proc.returncode == 0, proc.stderr[-4000:]
    check_finished_run(out, method)
    state = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
    kinds = {k.rsplit(".", 2)[-2] if k.endswith(".weight") else k.rsplit(".", 1)[-1] for k in state}
    assert {"lora_A", "lora_B", "lora_init_A", "lora_init_B"} <= kinds
    if method == "dude":
        assert "lora_magnitude_vector" in kinds
    assert all(v.numel() > 0 for v in state.values()), "empty (partitioned) tensors were saved"
    for k, v in state.items():
        if k.endswith("lora_A.weight"):
            assert v.shape[0] == 16 and v.shape[1] in (32, 64), (k, v.shape)
    assert json.load(open(os.path.join(out, "adapter", "adapter_config.json")))["peft_ext_method"] == method
    assert_adapter_and_export_agree(tiny_model_dir, out)
