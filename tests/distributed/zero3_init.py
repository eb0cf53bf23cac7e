"""Launched by tests/test_distributed.py under `accelerate launch --config_file tests/distributed/zero3_cpu.yaml`:
build a ZeRO-3 partitioned tiny model, initialise a DuDe or CorDA adapter on it, gather what every layer holds and
save it from rank 0 (plus the CorDA covariances), for comparison with a single-process run.

usage: zero3_init.py METHOD MODEL_DIR OUT_PT
  METHOD: dude | corda-kpm | corda-ipm | corda-kpm-sequential | corda-ipm-sequential
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402


def build(method, model, calibration_batches):
    from peft import get_peft_model

    from peft_ext import CorDAConfig, DuDeConfig, calibrate

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    covariances = {}
    allocation = "budgeted" if "budgeted" in method else "uniform"  # e.g. corda-ipm-budgeted-sequential
    if method == "dude":
        config = DuDeConfig(r=4, lora_alpha=8, target_modules=targets, svd_niter=2)
    else:
        config = CorDAConfig(r=4, lora_alpha=8, target_modules=targets, corda_method=method.split("-")[1],
                             rank_allocation=allocation)
        # float64 sums: 2 shards all-reduced and 1 pass over all of it then differ by less than 1e-6 even in KPM's
        # smallest components, which amplify the float32 rounding of a different summation order to ~2e-6
        sequential = method.endswith("sequential")
        probe = gathered_blocks_probe(model) if sequential else []
        calib = calibrate(model, config, calibration_batches, covariance_dtype=torch.float64, sequential=sequential,
                          verbose=False)
        for h in probe[1:]:
            h.remove()
        if sequential:  # block by block: factors instead of covariances; record how many blocks were gathered at once
            covariances = {"max_blocks_gathered": torch.tensor(max(probe[0]) if probe[0] else -1)}
        else:
            covariances = {n: calib.group(n).covariance.clone() for n in calib.targets}
    return get_peft_model(model, config), covariances


def gathered_blocks_probe(model) -> list:
    """[counts, hook handles...]: when a block's q_proj runs, how many decoder blocks have gathered (full) weights
    on this rank; only for a ZeRO-3 partitioned model."""
    from peft_ext.corda.blocks import find_blocks

    _, blocks = find_blocks(model)
    counts: list = []

    def count(module, args):
        counts.append(sum(any(getattr(p, "ds_status", None) is not None and p.ds_status.name == "AVAILABLE"
                              for p in block.parameters()) for block in blocks))

    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        return [counts]
    return [counts, *(block.self_attn.q_proj.register_forward_pre_hook(count) for block in blocks)]


def collect(peft_model):
    """name -> {A, B, magnitude, residual} as full tensors (gathered under ZeRO-3)."""
    from peft.utils.integrations import gather_params_ctx

    from peft_ext.layer import PeftExtLinear

    out = {}
    for name, layer in peft_model.named_modules():
        if not isinstance(layer, PeftExtLinear):
            continue
        params = [layer.get_base_layer().weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        if "default" in layer.lora_magnitude_vector:
            params.append(layer.lora_magnitude_vector["default"].weight)
        with gather_params_ctx(params, modifier_rank=None):
            out[name] = {"residual": params[0].detach().clone(), "A": params[1].detach().clone(),
                         "B": params[2].detach().clone()}
            if len(params) == 4:
                out[name]["magnitude"] = params[3].detach().clone()
    return out


def calibration_batches():
    from peft_ext.corda.calibration import batch_rows

    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(1, 1000, (int(n),), generator=g).tolist() for n in torch.randint(6, 30, (12,), generator=g)]
    return batch_rows(rows, 3, 0)


def main(method, model_dir, out):
    import json

    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from trl_recipes.distributed import init_distributed_on_cpu

    assert init_distributed_on_cpu()
    import torch.distributed as dist

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ds = json.load(open(os.path.join(root, "tests", "distributed", "ds_zero3_cpu.json")))
    ds.update(train_micro_batch_size_per_gpu=1, train_batch_size=dist.get_world_size(), gradient_accumulation_steps=1)
    ds["bf16"] = {"enabled": False}
    ds["fp16"] = {"enabled": False}
    hf_ds_config = HfDeepSpeedConfig(ds)  # while referenced, from_pretrained builds the model partitioned (zero.Init)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert hf_ds_config.is_zero3()
    assert all(hasattr(p, "ds_id") for p in model.parameters()), "the model is not ZeRO-3 partitioned"
    batches = calibration_batches()[dist.get_rank()::dist.get_world_size()]  # each rank its shard
    peft_model, covariances = build(method, model, batches)
    result = {"layers": collect(peft_model), "covariances": covariances, "world_size": dist.get_world_size()}
    if dist.get_rank() == 0:
        torch.save(result, out)
    dist.barrier()
    dist.destroy_process_group()  # leave together: gloo aborts a rank that exits while the group is alive


if __name__ == "__main__":
    main(*sys.argv[1:])
