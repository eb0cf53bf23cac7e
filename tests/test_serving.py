"""Serving routes: `trl_recipes.sft --save_merged` writes a merged model that plain transformers loads and that
reproduces the adapter (the route for DoRA-style adapters, which vLLM does not serve)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.helpers import FAST, SMOL, run_cli


@pytest.mark.parametrize("method,recipe", [("dude", "dude/config_cpu.yaml"), ("corda", "corda/config_kpm_cpu.yaml")])
def test_save_merged_reproduces_the_adapter(method, recipe, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import peft_ext

    out = tmp_path / "run"
    proc = run_cli("--config", os.path.join(SMOL, recipe), "--model_name_or_path", tiny_model_dir, *FAST,
                   "--eval_examples", "0", "--learning_rate", "1e-2", "--save_merged", "--output_dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged_dir = out / "merged"
    assert json.load(open(out / "metrics.json"))["merged_dir"] == str(merged_dir)
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()  # plain transformers, no adapter
    assert merged.dtype == torch.float32 and not any("lora" in n for n, _ in merged.named_parameters())
    adapted = peft_ext.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out / "adapter")).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    x = AutoTokenizer.from_pretrained(merged_dir)(["What is 2 + 3?"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want, got, untouched = adapted(x).logits, merged(x).logits, base(x).logits
    assert ((got - want).abs().max() / want.abs().max()) < 1e-4
    assert ((untouched - want).abs().max() / want.abs().max()) > 1e-3  # training did change the model


def test_save_merged_needs_the_plain_export_for_peft_residual_methods(tmp_path, capsys):
    from trl_recipes.sft import cli

    assert cli(["--peft_method", "pissa", "--save_merged", "--export_plain_peft", "false",
                "--output_dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--save_merged" in err[0] and "--export_plain_peft" in err[0]
