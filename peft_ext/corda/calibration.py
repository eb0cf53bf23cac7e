"""CorDA calibration: the input covariance C = Σ x xᵀ / n of every target layer, over real tokens only.

    calibration data ─▶ rows of token ids ─▶ right-padded batches ─▶ forward pass with pre-hooks on the targets
        ─▶ one covariance per *distinct* input (q/k/v share one, gate/up share one) ─▶ all-reduce across ranks
        ─▶ Calibration (kept on the config until get_peft_model consumes it; optionally cached as safetensors)

Differences from peft's `preprocess_corda`, each deliberate:
* padded positions never enter (the attention mask selects the rows), so batches > 1 work and batch size does not
  change the result; no per-sample rescaling (peft divides each sample by its signed maximum, which changes the
  decomposition, not just its scale) — C is the plain second moment divided by the token count;
* layers that read the same tensor share one accumulation and one copy in memory;
* the forward stops right after the last target has seen its input (no lm_head, no logits);
* with torch.distributed initialised each rank calibrates its own shard and the sums are all-reduced;
* the cache is a safetensors file with a fingerprint (never pickle), refused when it does not match.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import warnings
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm
from .._compat import BaseTunerLayer, gather_params_ctx
from ..base_weight import no_cpu_repacking
from ..distributed import all_reduce_max, all_reduce_sum, barrier, dist_info, gathered_forward, is_zero3_partitioned
from ..jsonl import read_jsonl
from ..targets import target_module_names
from .config import CorDAConfig
from .decomposition import damped_cholesky


CACHE_FORMAT = "peft_ext-corda-covariance-v1"
TEXT_FIELDS = ("messages", "text", "prompt", "question", "instruction", "input")


@dataclass
class CovarianceGroup:
    """The covariance of one distinct input and the target layers that read it (in execution order)."""

    members: list[str]
    covariance: Optional[torch.Tensor] = None  # (d, d), Σ x xᵀ / tokens
    tokens: int = 0
    positive_definite: Optional[bool] = None  # C itself (undamped) is positive definite, i.e. of full rank
    condition_estimate: Optional[float] = None  # (max/min diagonal of C's Cholesky factor)², a lower bound of cond(C)
    _sum: Optional[torch.Tensor] = field(default=None, repr=False)
    _current: Any = field(default=None, repr=False)  # weakref to this batch's input
    _chol: dict = field(default_factory=dict, repr=False)
    _decomposed: set = field(default_factory=set, repr=False)

    @property
    def dim(self) -> int:
        return self.covariance.shape[0]

    def cholesky(self, damping: float, device: torch.device) -> tuple[torch.Tensor, float]:
        """(L, shift) of the damped covariance, computed once per group (shared by q/k/v, gate/up, ...)."""
        key = (damping, str(device))
        if key not in self._chol:
            self._chol = {key: damped_cholesky(self.covariance.to(device), damping, name=self.members[0])}
        return self._chol[key]

    def mark_decomposed(self, name: str) -> None:
        self._decomposed.add(name)
        if self._decomposed >= set(self.members):
            self._chol.clear()  # recomputed on demand if get_peft_model is retried after an error


class Calibration:
    """Result of `calibrate`: covariance groups by target layer, plus what they were computed from."""

    def __init__(self, groups: list[CovarianceGroup], fingerprint: dict, source: str):
        self.groups = groups
        self.fingerprint = fingerprint
        self.source = source  # "computed" or the cache file it was read from
        self._by_name = {m: g for g in groups for m in g.members}

    def group(self, name: str) -> Optional[CovarianceGroup]:
        return self._by_name.get(name)

    @property
    def targets(self) -> list[str]:
        return list(self._by_name)

    @property
    def tokens(self) -> int:
        return self.groups[0].tokens if self.groups else 0

    def summary(self, limit: Optional[int] = 8) -> str:
        lines = [
            f"CorDA calibration ({self.source}): {self.tokens:,} tokens, {len(self.groups)} covariances for "
            f"{len(self._by_name)} layers",
            f"  {'input of':<48} {'layers':>6} {'dim':>5} {'full rank':>9} {'cond.≈':>9}",
        ]
        worst = sorted(self.groups, key=lambda g: -(g.condition_estimate or float("inf")))
        for g in worst[:limit] if limit else worst:
            cond = f"{g.condition_estimate:.2e}" if g.condition_estimate is not None else "inf"
            lines.append(f"  {g.members[0]:<48} {len(g.members):>6} {g.dim:>5} {str(g.positive_definite):>9} {cond:>9}")
        if limit and len(self.groups) > limit:
            lines.append(f"  ... {len(self.groups) - limit} more (Calibration.summary(limit=None) lists all)")
        return "\n".join(lines)

    def to_config_record(self) -> dict:
        return {"tokens": self.tokens, "covariances": len(self.groups), "layers": len(self._by_name),
                **{k: v for k, v in self.fingerprint.items() if k != "targets"}}


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


def prepare_calibration_data(data, tokenizer, *, num_samples: int, max_length: int, seed: int, text_field=None):
    """→ ("rows", list of token-id lists) or ("batches", list of dicts of tensors)."""
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
    order = list(range(len(data)))
    if len(order) > num_samples:
        random.Random(seed).shuffle(order)
        order = order[:num_samples]
    chosen = [data[i] for i in order]
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


# --- cache --------------------------------------------------------------------------------------------------------


def _save_cache(path: str, calib: Calibration) -> None:
    from safetensors.torch import save_file

    tensors = {f"covariance.{i}": g.covariance.contiguous().cpu() for i, g in enumerate(calib.groups)}
    meta = {
        "format": CACHE_FORMAT,
        "fingerprint": json.dumps(calib.fingerprint, sort_keys=True),
        "groups": json.dumps([g.members for g in calib.groups]),
        "tokens": json.dumps([g.tokens for g in calib.groups]),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def _check_cache_destination(path: Optional[str]) -> None:
    """A cache file that will be written must be writable: found out before the calibration, not after it (its work
    would be lost). The check writes and removes a probe file beside it."""
    if path is None or os.path.exists(path):
        if path is not None and os.path.isdir(path):
            raise ValueError(f"peft_ext.calibrate: cache_file={path!r} is a directory. Fix: a .safetensors file path.")
        return
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".peft_ext_probe-"):
            pass
    except OSError as exc:
        raise ValueError(f"peft_ext.calibrate: cache_file={path!r} cannot be written ({exc.strerror or exc}). Fix: a "
                         f"path in a writable folder, or cache_file=None.") from None


def _load_cache(path: str, expected: dict) -> Calibration:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != CACHE_FORMAT:
                raise ValueError(f"format {meta.get('format')!r}")
            fingerprint = json.loads(meta["fingerprint"])
            groups = json.loads(meta["groups"])
            tokens = json.loads(meta["tokens"])
            covariances = [f.get_tensor(f"covariance.{i}") for i in range(len(groups))]
    except Exception as exc:
        raise ValueError(
            f"peft_ext.calibrate: the covariance cache '{path}' is unreadable or not a peft_ext CorDA cache ({exc}). "
            f"Fix: delete it (it is rebuilt on the next run) or pass another cache_file."
        ) from exc
    differing = sorted(k for k in set(expected) | set(fingerprint) if expected.get(k) != fingerprint.get(k))
    if differing:
        raise ValueError(
            f"peft_ext.calibrate: the covariance cache '{path}' was built for a different "
            f"{', '.join(differing)} (cached {[fingerprint.get(k) for k in differing if k != 'targets']}, "
            f"now {[expected.get(k) for k in differing if k != 'targets']}). It is not used. Fix: delete it to "
            f"rebuild, or pass another cache_file."
        )
    out = []
    for members, n, cov in zip(groups, tokens, covariances):
        if cov.shape[0] != cov.shape[1] or not torch.isfinite(cov).all():
            raise ValueError(f"peft_ext.calibrate: the covariance cache '{path}' is damaged ({members[0]}). Fix: delete it.")
        out.append(CovarianceGroup(members=members, covariance=cov, tokens=n))
    return Calibration(out, fingerprint, source=path)


# --- the engine ---------------------------------------------------------------------------------------------------


SYM_BLOCK = 128


def accumulate_upper_(acc: torch.Tensor, rows: torch.Tensor, block: int = SYM_BLOCK) -> None:
    """acc += rowsᵀ·rows on and above the diagonal blocks only (about half the FLOPs of a full product; the lower
    triangle is filled in by `symmetrize`)."""
    d = rows.shape[1]
    for i in range(0, d, block):
        acc[i : i + block, i:].addmm_(rows[:, i : i + block].mT, rows[:, i:])


def symmetrize(acc: torch.Tensor, block: int = SYM_BLOCK) -> torch.Tensor:
    """The full symmetric matrix from what `accumulate_upper_` filled (block upper triangle)."""
    d = acc.shape[0]
    for i in range(0, d, block):
        acc[i + block :, i : i + block] = acc[i : i + block, i + block :].mT
        diag = acc[i : i + block, i : i + block]
        diag.copy_(diag.triu() + diag.triu(1).mT)
    return acc


class _StopForward(Exception):
    """Raised by the hook of the last target: nothing after it is needed."""


class _Collector:
    def __init__(self, names: list[str], dtype: torch.dtype):
        self.names = set(names)
        self.dtype = dtype
        self.order: list[str] = []  # call order in the first batch
        self.group_of: dict[str, CovarianceGroup] = {}
        self.groups: list[CovarianceGroup] = []
        self.first = True
        self.mask: Optional[torch.Tensor] = None
        self.batch_index = 0
        self.stop_after: Optional[str] = None
        self.early_exit = False
        self.no_padding = False

    def hook(self, name: str):
        def pre_hook(module, args, kwargs):
            self.observe(name, args[0] if args else next(iter(kwargs.values())))

        return pre_hook

    def observe(self, name: str, x: torch.Tensor) -> None:
        if self.first:
            if name in self.group_of:
                raise ValueError(f"peft_ext.calibrate: layer '{name}' ran twice in one forward pass (a shared/reused "
                                 f"module); its input covariance is ambiguous. Fix: leave it out of target_modules.")
            self.order.append(name)
            group = next((g for g in self.groups if g._current is not None and g._current() is x), None)
            if group is None:
                group = CovarianceGroup(members=[])
                self.groups.append(group)
                self._accumulate(group, x, name)
                group._current = weakref.ref(x)
            group.members.append(name)
            self.group_of[name] = group
        else:
            group = self.group_of.get(name)
            if group is None:
                raise RuntimeError(f"peft_ext.calibrate: layer '{name}' ran in batch {self.batch_index} but not in the "
                                   f"first batch; the model's control flow depends on the data.")
            if group.members[0] == name:
                self._accumulate(group, x, name)
                group._current = weakref.ref(x)
            elif group._current is None or group._current() is not x:
                raise RuntimeError(
                    f"peft_ext.calibrate: layer '{name}' shared its input with '{group.members[0]}' in the first batch "
                    f"but not in batch {self.batch_index}. Fix: calibrate in eval mode without data-dependent routing."
                )
        if name == self.stop_after or (self.first and self.early_exit and len(self.order) == len(self.names)):
            raise _StopForward

    def _accumulate(self, group: CovarianceGroup, x: torch.Tensor, name: str) -> None:
        mask = self.mask
        if self.no_padding and x.shape[:-1] == mask.shape:
            rows = x.reshape(-1, x.shape[-1])  # a view: nothing to leave out
        elif x.shape[:-1] == mask.shape:
            rows = x[mask]
        elif x.dim() == 2 and x.shape[0] == mask.numel():
            rows = x[mask.reshape(-1)]
        else:
            raise ValueError(
                f"peft_ext.calibrate: layer '{name}' receives input of shape {tuple(x.shape)}, which does not line up "
                f"with the attention mask {tuple(mask.shape)}, so padded positions cannot be left out. Fix: leave this "
                f"layer out of target_modules."
            )
        rows = rows.to(self.dtype)
        if not torch.isfinite(rows.sum()):
            raise ValueError(
                f"peft_ext.calibrate: layer '{name}' received NaN/Inf activations in calibration batch "
                f"{self.batch_index}. Fix: check that batch's data and the model's dtype (fp16 overflow); calibrate "
                f"in float32/bfloat16."
            )
        if group._sum is None:
            group._sum = torch.zeros(x.shape[-1], x.shape[-1], dtype=self.dtype, device=x.device)
        accumulate_upper_(group._sum, rows)
        group.tokens += rows.shape[0]


def _diagnose(group: CovarianceGroup) -> None:
    """Rank and conditioning of C itself for the summary. The factor is not kept: holding one per group would double
    the calibration's memory; the decomposition factors the damped matrix once per group."""
    L, info = torch.linalg.cholesky_ex(group.covariance)
    group.positive_definite = group.tokens >= group.dim and int(info) == 0
    if group.positive_definite:
        d = L.diagonal()
        group.condition_estimate = float((d.max() / d.min()) ** 2)


@torch.no_grad()
def calibrate(
    model: nn.Module, config, data, *, tokenizer=None, num_samples: int = 256, max_length: int = 256,
    batch_size: int = 8, seed: int = 0, text_field=None, covariance_dtype: torch.dtype = torch.float32,
    cache_file: Optional[str] = None, shard: Optional[bool] = None, verbose: bool = True,
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
        cache_file: a .safetensors path: read if it exists (refused when built for another model, target set or
            data), written otherwise.
        shard: under torch.distributed each rank takes every world_size-th sample (default for texts and records;
            made batches count as sharded already); the sums are all-reduced.
    """
    names = _check_arguments(model, config, covariance_dtype, num_samples, max_length, batch_size)
    _check_cache_destination(cache_file)
    kind, items = prepare_calibration_data(data, tokenizer, num_samples=num_samples, max_length=max_length,
                                           seed=seed, text_field=text_field)
    fingerprint = {
        "model": model_fingerprint(model, names),
        "targets": names,
        "data": data_fingerprint(kind, items),
        "samples": len(items) if kind == "rows" else sum(b["input_ids"].shape[0] for b in items),
        "max_length": max_length,
        "covariance_dtype": str(covariance_dtype).removeprefix("torch."),
    }
    rank, world = dist_info()
    if cache_file is not None and os.path.exists(cache_file):
        calib = _load_cache(cache_file, fingerprint)
        for g in calib.groups:
            _diagnose(g)
        return _attach(config, calib, verbose and rank == 0)

    batches = _rank_batches(kind, items, tokenizer, batch_size, shard)
    collector = _Collector(names, covariance_dtype)
    _run_forwards(model, names, batches, collector, verbose=verbose and rank == 0)
    calib = Calibration(_reduced_groups(collector.groups, world), fingerprint, source="computed")
    if cache_file is not None:
        if rank == 0:
            _save_cache(cache_file, calib)
        barrier()
    return _attach(config, calib, verbose and rank == 0)


def _check_arguments(model, config, covariance_dtype, num_samples: int, max_length: int, batch_size: int) -> list[str]:
    """The target layer names, after refusing bad arguments with the fix."""
    if not isinstance(config, CorDAConfig):
        raise TypeError(f"peft_ext.calibrate: config is a {type(config).__name__}; pass the CorDAConfig that "
                        f"get_peft_model will receive.")
    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError("peft_ext.calibrate: the model already has peft adapter layers. Fix: calibrate the base "
                         "model, before get_peft_model.")
    if covariance_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"peft_ext.calibrate: covariance_dtype={covariance_dtype}. Fix: torch.float32 or torch.float64.")
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
    batches taken as they are (sharded only when `shard` is True)."""
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
    return batches


def _run_forwards(model: nn.Module, names: list[str], batches: list[dict], collector, verbose: bool) -> None:
    """Every batch through the model with the collector's hooks on the targets; the model is left as it was."""
    # ZeRO-3 runs collectives inside every forward: all ranks must run the same number of them
    n_forward = all_reduce_max(len(batches))
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_pre_hook(collector.hook(n), with_kwargs=True) for n in names]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # ZeRO-3 without its engine: `gathered_forward` gathers each module's weights while it runs; a forward stopped
    # midway would leave gathered weights behind, so no early exit there
    collector.early_exit = not is_zero3_partitioned(model)
    extra = {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}
    idle = {"input_ids": torch.zeros((1, 1), dtype=torch.long), "attention_mask": torch.zeros((1, 1), dtype=torch.long)}
    with gathered_forward(model), no_cpu_repacking(model):
        try:
            for i in tqdm(range(n_forward), desc="peft_ext CorDA calibration", unit="batch", disable=not verbose):
                batch = batches[i] if i < len(batches) else idle  # an idle rank: a forward that contributes nothing
                collector.batch_index = i
                collector.mask = batch["attention_mask"].to(device).bool()
                collector.no_padding = bool(collector.mask.all())
                try:
                    model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                          **extra)
                except _StopForward:
                    pass
                if collector.first:
                    _after_first_forward(collector, names)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)


def _after_first_forward(collector, names: list[str]) -> None:
    """Every target must have run; later forwards can stop after the last target."""
    collector.first = False
    missing = sorted(set(names) - set(collector.order))
    if missing:
        raise ValueError(f"peft_ext.calibrate: target layer '{missing[0]}' (and {len(missing) - 1} more) "
                         f"never ran in the forward pass, so it has no input covariance. Fix: leave it out "
                         f"of target_modules.")
    if collector.early_exit:
        collector.stop_after = collector.order[-1]


def _reduced_groups(groups: list, world: int) -> list:
    """Sums all-reduced over the ranks, divided by the token counts: the covariances."""
    if world > 1:  # every group's sum exists: the first batch creates it, even from zero real tokens
        for g in groups:
            all_reduce_sum(g._sum)
            g.tokens = int(all_reduce_sum(torch.tensor([float(g.tokens)], dtype=torch.float64)).item())
    for g in groups:
        if g.tokens == 0:
            raise ValueError("peft_ext.calibrate: the calibration data holds no real (unpadded) token. Fix: check the "
                             "data and its attention masks.")
        g.covariance = symmetrize(g._sum).div_(g.tokens)
        g._sum = g._current = None
        _diagnose(g)
    return groups


def _attach(config, calib: Calibration, verbose: bool) -> Calibration:
    config.peft_ext_runtime.calibration = calib
    config.peft_ext_runtime.expected_layers = len(calib.targets)  # the total of get_peft_model's init progress bar
    config.corda_calibration = calib.to_config_record()
    tokens = calib.tokens
    for g in calib.groups:
        if tokens < g.dim:
            warnings.warn(f"peft_ext CorDA: {tokens} calibration tokens for a {g.dim}-dimensional input "
                          f"('{g.members[0]}'): its covariance has rank <= {tokens} and relies on damping. "
                          f"Calibrate with more tokens.")
            break
    deficient = [g.members[0] for g in calib.groups if g.positive_definite is False]
    if deficient and tokens >= max(g.dim for g in calib.groups):
        warnings.warn(f"peft_ext CorDA: {len(deficient)} covariances are rank-deficient (e.g. input of "
                      f"'{deficient[0]}'); damping makes them invertible. More varied calibration data helps.")
    if verbose:
        print(calib.summary())
    return calib
