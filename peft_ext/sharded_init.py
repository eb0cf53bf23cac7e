"""`get_peft_model` under torch.distributed: the layers' decompositions split over the ranks.

With a process group initialised (DDP, or a ZeRO-3 partitioned model) and `shard_init=True`, each layer of the
injection validates itself and reads its weight as usual but leaves its factors empty (`deferred`). The first layer
to commit then decomposes every deferred layer of the injection through `sharding.run_sharded`: each rank computes
about 1/world of them, balanced by cost, and every result is broadcast from its owner. Only then are residuals
written, so a failure anywhere rolls the whole injection back on every rank.

Every rank must call get_peft_model (TRL's trainers and trl_recipes do); a single rank calling it alone would wait
for the others. `shard_init=False` makes every rank decompose every layer on its own.
"""

from __future__ import annotations

from functools import partial

from ._compat import gather_params_ctx
from .distributed import dist_info
from .sharding import Job, decomposition_cost, run_sharded


def shards_decomposition(config, name: str) -> bool:
    """Whether layer `name`'s decomposition is left to the sharded pass at commit."""
    if dist_info()[1] == 1 or not config.shard_init:
        return False
    if (config.peft_ext_runtime.stored_init or {}).get(name) is not None:  # a reload: nothing to decompose
        return False
    return not config.init_factors_ready(name)


def decompose_deferred(runtime, method: str) -> None:
    """Fill every deferred layer of the injection in progress; on any error roll the injection back and raise."""
    entries = [(layer, adapter) for layer, adapter, _ in runtime.injection.entries
               if layer.residual_init_states()[adapter].deferred]
    jobs = []
    for layer, adapter in entries:
        state = layer.residual_init_states()[adapter]
        (r, in_features), out_features = state.lora_A.shape, state.lora_B.shape[0]
        jobs.append(Job(
            name=state.name, cost=decomposition_cost(out_features, in_features),
            shapes=((r, in_features), (out_features, r), (r,)), compute=partial(layer.decompose, state),
            gather=partial(gather_params_ctx, layer.get_base_layer().weight, modifier_rank=None),
            device=state.lora_A.device,
        ))
    try:
        results = run_sharded(jobs, desc=f"peft_ext {method} decompositions", verbose=dist_info()[0] == 0)
    except BaseException:
        runtime.abort()
        raise
    for (layer, adapter), (lora_A, lora_B, spectrum) in zip(entries, results):
        layer.fill_factors(adapter, lora_A, lora_B, spectrum)
