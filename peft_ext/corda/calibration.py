"""CorDA calibration: the input covariance C = Σ x xᵀ / n of every target layer, over real tokens only.

    calibration data ─▶ rows of token ids ─▶ right-padded batches (this rank's shard) ─▶ one of:
      block by block (`sequential`, the default for decoder models): one block at a time, each block's covariances
        decomposed at once and freed ─▶ Calibration holding the init factors
      whole-model: one forward pass with pre-hooks on every target ─▶ all-reduce ─▶ Calibration holding every
        covariance (decomposed by get_peft_model; optionally cached as safetensors)

This module prepares the data, fingerprints it and runs the whole-model path; `covariance` holds the collector both
paths share, `sequential` and `blocks` the block-by-block path, `cache` both cache formats.

Differences from peft's `preprocess_corda`, each deliberate:
* padded positions never enter (the attention mask selects the rows), so batches > 1 work and batch size does not
  change the result; no per-sample rescaling (peft divides each sample by its signed maximum, which changes the
  decomposition, not just its scale) — C is the plain second moment divided by the token count;
* layers that read the same tensor share one accumulation and one copy in memory;
* whole-model: the forward stops right after the last target has seen its input (no lm_head, no logits);
* with torch.distributed initialised each rank calibrates its own shard and the sums are reduced;
* the cache is safetensors with a fingerprint (never pickle), refused when it does not match;
* block by block, peak extra memory is one block's covariances, not the model's.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import warnings
from collections.abc import Iterable, Mapping
from typing import Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .._compat import BaseTunerLayer, gather_params_ctx
from ..base_weight import no_cpu_repacking
from ..distributed import all_reduce_max, barrier, dist_info, gathered_forward, is_zero3_partitioned
from ..jsonl import read_jsonl
from ..targets import target_module_names
from .blocks import blocks_for_targets
from .cache import check_cache_destination, load_cache, save_cache
from .config import CorDAConfig
from .covariance import (SAMPLE_NORMALIZATIONS, Calibration, Collector, StopForward, after_first_forward, diagnose,
                         reduced_groups)
from .sample_keys import sample_digest
from .sequential import calibrate_sequential


TEXT_FIELDS = ("messages", "text", "prompt", "question", "instruction", "input")

# --- data -------------------------------------------------------------------------------------------------------


def _record_text(record: Mapping, tokenizer, text_field) -> str:
    fields = [text_field] if isinstance(text_field, str) else text_field
    if fields is None:
        fields = [next((f for f in TEXT_FIELDS if f in record), None)]
        if fields[0] is None:
            raise ValueError(
                f"peft_ext.calibrate: a calibration record has none of the fields {list(TEXT_FIELDS)} "
                f"(it has {sorted(record)}). Fix: pass text_field='...' (or a list of fields to join)."
            )
    parts = []
    for f in fields:
        if f not in record:
            raise ValueError(f"peft_ext.calibrate: text_field {f!r} is missing from a record with fields {sorted(record)}.")
        value = record[f]
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], Mapping) and "role" in value[0]:
            parts.append(tokenizer.apply_chat_template(list(value), tokenize=False))  # a conversation
            continue
        parts.append(", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value))
    return "\n".join(parts)


def _is_batch(item) -> bool:
    return isinstance(item, Mapping) and "input_ids" in item and torch.is_tensor(item["input_ids"])


def _rows_from_texts(texts: list[str], tokenizer, max_length: int, chat: bool) -> list[list[int]]:
    enc = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=not chat)
    return [list(ids) for ids in enc["input_ids"]]


def load_samples(data) -> list:
    """The calibration data as a list: a JSONL path read, a `datasets.Dataset` or any iterable listed; empty refused."""
    if isinstance(data, (str, os.PathLike)):
        data = read_jsonl(data, what="peft_ext.calibrate: calibration file")
    try:
        import datasets

        if isinstance(data, datasets.Dataset):
            data = list(data)
    except ImportError:  # pragma: no cover - datasets is a dependency of trl
        pass
    if not isinstance(data, (list, tuple)):
        data = list(data)  # an iterable of batches (e.g. a DataLoader) or of samples
    if not data:
        raise ValueError("peft_ext.calibrate: the calibration data is empty. Fix: pass at least one sample.")
    return data


def choose_samples(samples: list, num_samples: int, seed: int) -> list:
    """The samples calibrated on: all of them when there are at most `num_samples`, else a seeded random subset."""
    order = list(range(len(samples)))
    if len(order) > num_samples:
        random.Random(seed).shuffle(order)
        order = order[:num_samples]
    return [samples[i] for i in order]


def prepare_calibration_data(data, tokenizer, *, num_samples: int, max_length: int, seed: int, text_field=None):
    """→ ("rows", list of token-id lists) or ("batches", list of dicts of tensors)."""
    data = load_samples(data)
    if _is_batch(data[0]):
        batches, rows_seen = [], 0
        for b in data:
            if not _is_batch(b):
                raise ValueError("peft_ext.calibrate: mixed calibration data (batches and samples).")
            ids = b["input_ids"] if b["input_ids"].dim() == 2 else b["input_ids"].unsqueeze(0)
            mask = b.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else (mask if mask.dim() == 2 else mask.unsqueeze(0))
            take = min(ids.shape[0], num_samples - rows_seen)
            batches.append({"input_ids": ids[:take, :max_length], "attention_mask": mask[:take, :max_length]})
            rows_seen += take
            if rows_seen >= num_samples:
                break
        return "batches", batches

    if tokenizer is None:
        raise ValueError(
            "peft_ext.calibrate: the calibration data are texts/records, which need a tokenizer. Fix: pass "
            "tokenizer=..., or pass batches of {'input_ids', 'attention_mask'} tensors."
        )
    chosen = choose_samples(data, num_samples, seed)
    if isinstance(chosen[0], str):
        texts, chat = chosen, False
    elif isinstance(chosen[0], (list, tuple)) and chosen[0] and isinstance(chosen[0][0], Mapping):
        texts, chat = [tokenizer.apply_chat_template(m, tokenize=False) for m in chosen], True
    elif isinstance(chosen[0], Mapping):
        texts = [_record_text(r, tokenizer, text_field) for r in chosen]
        fields = [text_field] if isinstance(text_field, str) else (text_field or [next(
            (f for f in TEXT_FIELDS if f in chosen[0]), None)])
        chat = any(isinstance(chosen[0].get(f), (list, tuple)) and chosen[0].get(f)
                   and isinstance(chosen[0][f][0], Mapping) for f in fields)  # chat templates add special tokens
    else:
        raise TypeError(f"peft_ext.calibrate: unsupported calibration sample type {type(chosen[0]).__name__}.")
    rows = [r for r in _rows_from_texts(texts, tokenizer, max_length, chat) if r]
    if not rows:
        raise ValueError("peft_ext.calibrate: every calibration sample tokenized to zero tokens. Fix: check the data.")
    return "rows", rows


def batch_rows(rows: list[list[int]], batch_size: int, pad_id: int) -> list[dict]:
    """Right-padded batches (real tokens keep their positions, so batch size does not change the activations)."""
    batches = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, r in enumerate(chunk):
            ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[j, : len(r)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


# --- targets and fingerprint -------------------------------------------------------------------------------------


def _sha256_tensors(tensors: Iterable[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)  # a view of the bytes, no copy
    return h.hexdigest()


def model_fingerprint(model: nn.Module, names: list[str]) -> str:
    modules = dict(model.named_modules())
    h = hashlib.sha256()
    for name in names:
        weight = modules[name].weight
        with gather_params_ctx(weight):
            h.update(name.encode())
            h.update(_sha256_tensors([weight]).encode())
    return h.hexdigest()


def data_fingerprint(kind: str, items) -> str:
    if kind == "rows":
        h = hashlib.sha256()
        for r in items:
            h.update(json.dumps(r).encode())
        return h.hexdigest()
    return _sha256_tensors(t for b in items for t in (b["input_ids"], b["attention_mask"]))


@torch.no_grad()
def calibrate(
    model: nn.Module, config, data, *, tokenizer=None, num_samples: int = 256, max_length: int = 256,
    batch_size: int = 8, seed: int = 0, text_field=None, covariance_dtype: torch.dtype = torch.float32,
    sample_normalization: str = "none", cache_file: Optional[str] = None, shard: Optional[bool] = None,
    sequential: Optional[bool] = None, hidden_states_device: Optional[Union[str, torch.device]] = None,
    verbose: bool = True,
) -> Calibration:
    """Collect each target layer's input covariance for CorDA; call it on the base model, then get_peft_model.

    Args:
        model: the base model (not yet wrapped by peft).
        config: the `CorDAConfig` that get_peft_model will receive; the result is attached to it.
        data: an iterable of batches ({"input_ids", "attention_mask"} tensors, e.g. a DataLoader), or, with
            `tokenizer`, a list of texts, a list of chat conversations, a list of records, a `datasets.Dataset`, or
            the path of a local JSONL file. Records use `text_field` (a field name or a list of names to join) or the
            first of "messages", "text", "prompt", "question", "instruction", "input".
        num_samples, max_length: samples used (a seeded random subset of more; the first ones of batches), and
            tokens per sample (truncation). batch_size: samples per forward (padded positions are masked out).
        covariance_dtype: torch.float32 (default) or torch.float64 accumulation; float64 also makes the
            decomposition run in float64.
        sample_normalization: "none" (default): C = Σ x xᵀ / real tokens. "max": each sample's activations divided by
            their maximum (per layer input, over its real tokens) before summing, as peft's `preprocess_corda` does.
            "max" is recorded in the cache's fingerprint and in the saved adapter's `corda_calibration`.
        cache_file: whole-model: a .safetensors path, read if it exists (refused when built for another model,
            target set or data), written otherwise. Block by block: a folder of per-block files, so that an
            interrupted calibration restarts at the first unfinished block (a whole-model cache file at that path
            is read as it is).
        shard: under torch.distributed each rank takes every world_size-th sample (default for texts and records;
            made batches count as sharded already); the sums are reduced over the ranks.
        sequential: block by block (`peft_ext.corda.sequential`): each block's covariances are decomposed at once
            (sharded over the ranks) and freed, so the config must not change before get_peft_model. None (default):
            wherever decoder blocks hold every target; True: that, or an error; False: one whole-model pass.
        hidden_states_device: block by block: where cached hidden states are kept (e.g. "cpu"); default: the model's.
    """
    names = _check_arguments(model, config, covariance_dtype, num_samples, max_length, batch_size,
                             sample_normalization)
    blocks = blocks_for_targets(model, names, sequential)
    check_cache_destination(cache_file, sequential=blocks is not None)
    kind, items, digests = _prepare_with_digests(data, tokenizer, num_samples, max_length, seed, text_field)
    fingerprint = calibration_fingerprint(model, names, kind, items, max_length, covariance_dtype,
                                          sample_normalization)
    rank, world = dist_info()
    if cache_file is not None and os.path.isfile(cache_file):  # a whole-model cache, in either mode
        calib = load_cache(cache_file, fingerprint)
        for g in calib.groups:
            diagnose(g)
        return _attach(config, calib, digests, verbose and rank == 0)

    batches = _rank_batches(kind, items, tokenizer, batch_size, shard)
    if blocks is not None:
        hidden_device = torch.device(hidden_states_device) if hidden_states_device else None
        calib = calibrate_sequential(model, config, blocks, batches, fingerprint=fingerprint, cache_dir=cache_file,
                                     covariance_dtype=covariance_dtype, sample_normalization=sample_normalization,
                                     hidden_device=hidden_device, verbose=verbose and rank == 0)
        barrier()
    else:
        collector = Collector(names, covariance_dtype, sample_normalization)
        calib = _whole_model_pass(model, names, batches, collector, fingerprint, cache_file, verbose and rank == 0)
    return _attach(config, calib, digests, verbose and rank == 0)


def _prepare_with_digests(data, tokenizer, num_samples: int, max_length: int, seed: int, text_field):
    """`prepare_calibration_data`, and the digests of the samples it took (`sample_digests`). The samples are chosen
    once, here: `prepare_calibration_data` takes all of at most `num_samples` samples, in their order."""
    data = load_samples(data)
    chosen = data if _is_batch(data[0]) else choose_samples(data, num_samples, seed)
    kind, items = prepare_calibration_data(chosen, tokenizer, num_samples=num_samples, max_length=max_length,
                                           seed=seed, text_field=text_field)
    return kind, items, sample_digests(chosen) if kind == "rows" else None


def sample_digests(chosen: list) -> Optional[list[str]]:
    """The digests (`sample_digest`) of the samples calibrated on, in their order; None where a sample has no text
    key."""
    digests = [sample_digest(s) for s in chosen]
    return None if any(d is None for d in digests) else digests


def _whole_model_pass(model: nn.Module, names: list[str], batches: list[dict], collector: Collector,
                      fingerprint: dict, cache_file: Optional[str], verbose: bool) -> Calibration:
    """Every batch through the whole model, the sums reduced over the ranks; the cache file written (rank 0)."""
    rank, world = dist_info()
    _run_forwards(model, names, batches, collector, verbose=verbose)
    calib = Calibration(reduced_groups(collector.groups, world), fingerprint, source="computed")
    if cache_file is not None:
        if rank == 0:
            save_cache(cache_file, calib)
        barrier()
    return calib


def calibration_fingerprint(model, names: list[str], kind: str, items, max_length: int, covariance_dtype,
                            sample_normalization: str = "none") -> dict:
    """What a cache must have been built from: model weights, targets, data and accumulation settings (a
    normalization other than "none" is named; caches written before the option existed stay valid)."""
    normalization = {} if sample_normalization == "none" else {"sample_normalization": sample_normalization}
    return {
        "model": model_fingerprint(model, names),
        "targets": names,
        "data": data_fingerprint(kind, items),
        "samples": len(items) if kind == "rows" else sum(b["input_ids"].shape[0] for b in items),
        "max_length": max_length,
        "covariance_dtype": str(covariance_dtype).removeprefix("torch."),
        **normalization,
    }


def _check_arguments(model, config, covariance_dtype, num_samples: int, max_length: int, batch_size: int,
                     sample_normalization: str) -> list[str]:
    """The target layer names, after refusing bad arguments with the fix."""
    if not isinstance(config, CorDAConfig):
        raise TypeError(f"peft_ext.calibrate: config is a {type(config).__name__}; pass the CorDAConfig that "
                        f"get_peft_model will receive.")
    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError("peft_ext.calibrate: the model already has peft adapter layers. Fix: calibrate the base "
                         "model, before get_peft_model.")
    if covariance_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"peft_ext.calibrate: covariance_dtype={covariance_dtype}. Fix: torch.float32 or torch.float64.")
    if sample_normalization not in SAMPLE_NORMALIZATIONS:
        raise ValueError(f"peft_ext.calibrate: sample_normalization={sample_normalization!r}. Fix: one of "
                         f"{', '.join(map(repr, SAMPLE_NORMALIZATIONS))}.")
    if num_samples < 1 or max_length < 1 or batch_size < 1:
        raise ValueError(f"peft_ext.calibrate: num_samples={num_samples}, max_length={max_length}, "
                         f"batch_size={batch_size} must all be >= 1.")
    names = target_module_names(model, config)
    if not names:
        raise ValueError(f"peft_ext.calibrate: target_modules={config.target_modules!r} matches no nn.Linear/Conv1D "
                         f"layer of this model. Fix: check target_modules (e.g. 'all-linear').")
    return names


def _rank_batches(kind: str, items: list, tokenizer, batch_size: int, shard: Optional[bool]) -> list[dict]:
    """This rank's padded batches: token rows sharded (unless `shard` is False), sorted by length and batched; made
    batches taken as they are (sharded only when `shard` is True); then idle batches up to the count of the rank
    with the most, the same count on every rank."""
    rank, world = dist_info()
    if kind == "rows":
        if shard is None or shard:
            items = items[rank::world]
        # sorted by length: batches of similar lengths waste no compute on padding (the sums do not depend on order)
        items = sorted(items, key=len)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        batches = batch_rows(items, batch_size, pad_id)
    else:
        batches = items[rank::world] if (shard and world > 1) else items
    for i, b in enumerate(batches):
        if int(b["attention_mask"].sum()) == 0:
            raise ValueError(f"peft_ext.calibrate: calibration batch {i} is all padding (attention_mask is 0 "
                             f"everywhere). Fix: drop empty samples from the calibration data.")
    # ZeRO-3 runs collectives inside every forward, so all ranks run the same number of them: a rank with fewer
    # batches runs idle ones (all padding, contributing nothing)
    idle = {"input_ids": torch.zeros((1, 1), dtype=torch.long), "attention_mask": torch.zeros((1, 1), dtype=torch.long)}
    return batches + [idle] * (all_reduce_max(len(batches)) - len(batches))


def _run_forwards(model: nn.Module, names: list[str], batches: list[dict], collector, verbose: bool) -> None:
    """Every batch through the model with the collector's hooks on the targets; the model is left as it was."""
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_pre_hook(collector.hook(n), with_kwargs=True) for n in names]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # ZeRO-3 without its engine: `gathered_forward` gathers each module's weights while it runs; a forward stopped
    # midway would leave gathered weights behind, so no early exit there
    collector.early_exit = not is_zero3_partitioned(model)
    extra = {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}
    with gathered_forward(model), no_cpu_repacking(model):
        try:
            for i, batch in enumerate(tqdm(batches, desc="peft_ext CorDA calibration", unit="batch",
                                           disable=not verbose)):
                collector.batch_index = i
                collector.mask = batch["attention_mask"].to(device).bool()
                collector.no_padding = bool(collector.mask.all())
                try:
                    model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                          **extra)
                except StopForward:
                    pass
                if collector.first:
                    after_first_forward(collector, names)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)


def _attach(config, calib: Calibration, digests: Optional[list[str]], verbose: bool) -> Calibration:
    config.peft_ext_runtime.calibration = calib
    config.peft_ext_runtime.expected_layers = len(calib.targets)  # the total of get_peft_model's init progress bar
    config.corda_calibration = {**calib.to_config_record(), "sample_digests": digests}
    tokens = calib.tokens
    for g in calib.groups:
        if tokens < g.dim:
            warnings.warn(f"peft_ext CorDA: {tokens} calibration tokens for a {g.dim}-dimensional input "
                          f"('{g.members[0]}'): its covariance has rank <= {tokens} and relies on damping. "
                          f"Calibrate with more tokens.")
            break
    if verbose:  # rank-deficient covariances with enough tokens are the model's (e.g. MLP units that never fire): noted there
        print(calib.summary())
    return calib
