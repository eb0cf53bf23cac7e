"""`python -m peft_ext.plan`: the shapes and distinct inputs it derives from a config alone match a real calibration,
its covariance sizes are the bytes a calibration holds, and the CLI reads config files and model folders."""

from __future__ import annotations

import json

import pytest
import torch

from peft_ext import calibrate
from peft_ext.plan import main, model_shape, plan

from .helpers import ARCHS, corda, make_tiny, token_batches


@pytest.mark.parametrize("arch", ARCHS)
def test_distinct_inputs_and_bytes_match_a_real_calibration(arch):
    model, config = make_tiny(arch, layers=3), corda()
    shape = model_shape(model.config, config)
    calib = calibrate(model, config, token_batches(), covariance_dtype=torch.float64, sequential=False, verbose=False)
    planned = {}
    for layer in shape.layers:
        planned.setdefault(layer.group, []).append(layer.name)
    assert sorted(planned.values()) == sorted(g.members for g in calib.groups)
    numbers = plan(shape, method="corda", samples=12, max_length=20, world=1, act_bytes=4, cov_bytes=8)
    held = [g.covariance.numel() * g.covariance.element_size() for g in calib.groups]
    assert numbers["covariance_bytes_whole_model"] == sum(held)
    per_block = {}
    for g, nbytes in zip(calib.groups, held):
        block = int(g.members[0].split(".")[2])  # model.layers.K... and transformer.h.K...
        per_block[block] = per_block.get(block, 0) + nbytes
    assert numbers["covariance_bytes_one_block"] == max(per_block.values())


def test_sharding_divides_the_decomposition_work():
    shape = model_shape(make_tiny("llama", layers=4).config, corda())
    one = plan(shape, method="dude", samples=1, max_length=1, world=1, act_bytes=2)
    four = plan(shape, method="dude", samples=1, max_length=1, world=4, act_bytes=2)
    assert one["decomposition_flops_one_rank"] == four["decomposition_flops_one_rank"]
    assert one["decomposition_flops_one_rank"] / 4 <= four["decomposition_flops_per_rank"] < \
        one["decomposition_flops_one_rank"] / 3


def test_cli_reads_a_config_file_and_a_model_folder(tmp_path, capsys):
    model = make_tiny("qwen2")
    model.config.save_pretrained(tmp_path / "model")
    with open(tmp_path / "model" / "config.json") as f:
        (tmp_path / "config.json").write_text(json.dumps(json.load(f)))
    for path in (tmp_path / "model", tmp_path / "config.json"):
        numbers = main(["--model_config", str(path), "--method", "corda", "--samples", "4", "--max_length", "16",
                        "--world", "2"])
        assert numbers["peak_sequential"] < numbers["peak_whole_model"] < numbers["peak_peft_preprocess_corda"]
    out = capsys.readouterr().out
    assert "calibration extra peak, block by block" in out and "world 2" in out


def test_cli_refuses_bad_input(tmp_path, capsys):
    """In-process (a subprocess per case cost half a minute of imports): a missing config names the path and the
    fix; a world of 0 is an argparse error, exit status 2, before any model is built."""
    with pytest.raises(FileNotFoundError, match="neither a config.json file nor a model directory.*Fix"):
        main(["--method", "dude", "--model_config", str(tmp_path / "nope")])
    with pytest.raises(SystemExit) as exc:
        main(["--method", "dude", "--model_config", str(tmp_path), "--world", "0"])
    assert exc.value.code == 2 and "--world must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_budgeted_ranks_are_accounted_for(arch, monkeypatch, capsys, tmp_path):
    """The planner's adapter budget is the one a budgeted get_peft_model spends (within 1%), and the init factors it
    says are held are the provisional factors the injection really decomposed before it shrank them."""
    from peft import get_peft_model

    from peft_ext import DuDeConfig
    from peft_ext.layer import ResidualInitMixin

    held = []
    keep = ResidualInitMixin.keep_components

    def recording(self, adapter_name, r, **kwargs):
        state = self.residual_init_states()[adapter_name]
        held.append(state.lora_A.numel() + state.lora_B.numel())
        return keep(self, adapter_name, r, **kwargs)

    monkeypatch.setattr(ResidualInitMixin, "keep_components", recording)
    model = make_tiny(arch)
    config = DuDeConfig(r=8, target_modules="all-linear", rank_allocation="budgeted", rank_cap=3)
    shape = model_shape(model.config, config)
    numbers = plan(shape, method="dude", samples=1, max_length=1, world=1, act_bytes=2, r=8, rank_cap=3)
    uniform = plan(shape, method="dude", samples=1, max_length=1, world=1, act_bytes=2, r=8)
    get_peft_model(model, config)
    summary = config.rank_allocation_summary
    assert numbers["adapter_parameters"] == summary["budget_parameters"] == uniform["adapter_parameters"]
    assert abs(summary["parameters"] - numbers["adapter_parameters"]) <= 0.01 * numbers["adapter_parameters"]
    assert numbers["init_factor_bytes"] == 4 * sum(held) > uniform["init_factor_bytes"]
    model.config.save_pretrained(tmp_path)
    main(["--model_config", str(tmp_path), "--method", "dude", "--r", "8",
          "--rank_allocation", "budgeted", "--rank_cap", "3"])
    assert "budget of the allocation, within 1%" in capsys.readouterr().out
