"""Launched by tests/test_sharded_init.py under `torchrun --nproc_per_node 2` (gloo, CPU): DuDe and CorDA inits with
the decompositions sharded over the ranks (DDP-style: every rank holds the whole model), and CorDA calibrated block
by block. Saves, from rank 0, every layer's factors and residual, how many decompositions each rank computed, and
what a failure on one rank does to both.

usage: sharded_init.py CASE OUT_PT
  CASE: dude-exact | dude-randomized | corda-kpm | corda-ipm | corda-kpm-sequential | corda-ipm-sequential | failure,
        or a case with "-budgeted" after the method (rank_allocation="budgeted"), e.g. corda-kpm-budgeted-sequential
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

CALLS = {"n": 0}


def counting(fn):
    def wrapper(*args, **kwargs):
        CALLS["n"] += 1
        return fn(*args, **kwargs)
    return wrapper


def count_decompositions() -> None:
    import peft_ext.corda.config as corda_config
    import peft_ext.corda.sequential as sequential
    import peft_ext.dude.config as dude_config

    dude_config.top_r_svd = counting(dude_config.top_r_svd)
    corda_config.decompose_member = counting(corda_config.decompose_member)
    sequential.decompose_member = counting(sequential.decompose_member)


def config_for(case: str):
    from peft_ext import CorDAConfig, DuDeConfig

    allocation = "budgeted" if "budgeted" in case else "uniform"
    if case.startswith("dude"):
        return DuDeConfig(r=4, lora_alpha=8, target_modules="all-linear", rank_allocation=allocation,
                          svd_niter=2 if case == "dude-randomized" else None)
    return CorDAConfig(r=4, lora_alpha=8, target_modules="all-linear", corda_method=case.split("-")[1],
                       rank_allocation=allocation)


def calibration_batches(rank: int = 0, world: int = 1) -> list:
    """5 batches: with 2 ranks, rank 0 calibrates 3 and rank 1 calibrates 2 (counts differ across ranks)."""
    from peft_ext.corda.calibration import batch_rows

    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(1, 100, (int(n),), generator=g).tolist() for n in torch.randint(6, 30, (15,), generator=g)]
    return batch_rows(rows, 3, 0)[rank::world]


def build(case: str, model, rank: int = 0, world: int = 1):
    from peft import get_peft_model

    from peft_ext import calibrate

    config = config_for(case)
    if case.startswith("corda"):
        calibrate(model, config, calibration_batches(rank, world), covariance_dtype=torch.float64,
                  sequential=case.endswith("sequential"), verbose=False)
    return get_peft_model(model, config)


def collect(peft_model) -> dict:
    out = {}
    for name, layer in peft_model.named_modules():
        if hasattr(layer, "lora_init_A") and "default" in layer.lora_init_A:
            out[name] = {"A": layer.lora_A["default"].weight.detach().clone(),
                         "B": layer.lora_B["default"].weight.detach().clone(),
                         "residual": layer.get_base_layer().weight.detach().clone()}
    return out


def failure(model) -> dict:
    """One rank fails in its share: both ranks raise (none waits forever) and the model is left as it was."""
    import torch.distributed as dist
    from peft import get_peft_model

    import peft_ext.dude.config as dude_config

    before = {k: v.clone() for k, v in model.state_dict().items()}
    real = dude_config.top_r_svd

    def broken(W, r, **kwargs):
        if dist.get_rank() == 1:
            raise ValueError("injected failure on rank 1")
        return real(W, r, **kwargs)

    dude_config.top_r_svd = broken
    try:
        get_peft_model(model, config_for("dude-exact"))
        error = None
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    untouched = model.state_dict().keys() == before.keys() and all(
        torch.equal(v, before[k]) for k, v in model.state_dict().items())
    wrapped = any(hasattr(m, "lora_A") for m in model.modules())
    return {"error": error, "untouched": untouched and not wrapped}


def main(case: str, out: str) -> None:
    import torch.distributed as dist

    from tests.helpers import make_tiny

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_tiny("llama", layers=3)
    if case == "failure":
        result = failure(model)
    else:
        count_decompositions()
        result = {"layers": collect(build(case, model, rank, world)), "calls": CALLS["n"]}
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        torch.save({"ranks": gathered, "world_size": world}, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
