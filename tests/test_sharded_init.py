"""Decompositions sharded over 2 gloo ranks (DDP-style: every rank holds the whole model) equal one process, each rank
computes a share of them, and a failure on one rank stops both and leaves the model untouched."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from peft_ext.sharding import assign_owners, decomposition_cost

from .helpers import ROOT, make_tiny

SCRIPT = os.path.join(ROOT, "tests", "distributed", "sharded_init.py")
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def torchrun(case: str, out: str):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", SCRIPT, case, out],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def test_owners_are_balanced_by_cost_and_deterministic():
    costs = [decomposition_cost(o, i) for o, i in [(64, 64)] * 4 + [(96, 64), (64, 96)] * 2]
    owners = assign_owners(costs, 2)
    assert owners == assign_owners(costs, 2)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    assert abs(loads[0] - loads[1]) <= max(costs)
    assert assign_owners(costs, 1) == [0] * len(costs)
    assert sorted(set(assign_owners([1.0] * 3, 8))) == [0, 1, 2]  # more ranks than jobs: one each


# KPM block by block runs with budgeted ranks (its uniform path is IPM's, block by block, and KPM's, whole-model)
@pytest.mark.parametrize("case", ["dude-exact", "dude-randomized", "corda-kpm", "corda-ipm", "corda-ipm-sequential",
                                  "dude-budgeted", "corda-kpm-budgeted-sequential"])
def test_sharded_init_equals_single_process(case, tmp_path):
    sys.path.insert(0, os.path.dirname(SCRIPT))
    from sharded_init import build, calibration_batches, collect, config_for  # noqa: F401

    out = str(tmp_path / "out.pt")
    proc = torchrun(case, out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = torch.load(out)
    assert result["world_size"] == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched ranks: the same BLAS reduction order
    try:
        model = make_tiny("llama", layers=3)
        if case.startswith("corda"):  # one process sees all 5 batches that the 2 ranks split 3 + 2
            from peft import get_peft_model

            from peft_ext import calibrate

            config = config_for(case)
            calibrate(model, config, calibration_batches(), covariance_dtype=torch.float64,
                      sequential=case.endswith("sequential"), verbose=False)
            single = collect(get_peft_model(model, config))
        else:
            single = collect(build(case, model))
    finally:
        torch.set_num_threads(threads)
    assert len(single) == 21
    if "budgeted" in case:  # the allocation saw the same spectra on every rank: ranks that differ from uniform r
        assert len({t["A"].shape[0] for t in single.values()}) > 1
    for ranked in result["ranks"]:  # identical on every rank, and equal to one process
        assert ranked["layers"].keys() == single.keys()
        for name, tensors in single.items():
            for key, t in tensors.items():
                assert rel(ranked["layers"][name][key], t) <= 1e-6, (case, name, key)
    calls = [r["calls"] for r in result["ranks"]]
    assert sum(calls) == len(single) and min(calls) >= 5, calls  # each rank did a share, none twice


def test_a_failure_on_one_rank_stops_both_and_leaves_the_model_untouched(tmp_path):
    out = str(tmp_path / "out.pt")
    proc = torchrun("failure", out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = torch.load(out)["ranks"]
    assert "injected failure on rank 1" in ranks[1]["error"]
    assert ranks[0]["error"].startswith("RuntimeError: peft_ext: rank 1 failed") and "injected failure" in ranks[0]["error"]
    assert all(r["untouched"] for r in ranks)
