"""The covariance caches of `calibrate`: safetensors files with a fingerprint (never pickle), refused when built for
another model, target set or data.

* whole-model calibration: one file, every covariance;
* block-by-block calibration: a folder with one file per finished block (`block-00007.safetensors`), so that an
  interrupted calibration restarts at the first unfinished block.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Optional

import torch

from .covariance import Calibration, CovarianceGroup


CACHE_FORMAT = "peft_ext-corda-covariance-v1"
BLOCK_FORMAT = "peft_ext-corda-block-covariance-v1"
# --- whole-model cache --------------------------------------------------------------------------------------------------------


def save_cache(path: str, calib: Calibration) -> None:
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


def check_cache_destination(path: Optional[str], sequential: bool) -> None:
    """A cache that will be written must be writable: found out before the calibration, not after it (its work
    would be lost). The check writes and removes a probe file beside it. A block-by-block calibration (`sequential`)
    keeps its cache in a folder at `path`, and also reads a whole-model cache file there."""
    if path is None or os.path.exists(path):
        if path is not None and os.path.isdir(path) and not sequential:
            raise ValueError(f"peft_ext.calibrate: cache_file={path!r} is a folder (a block-by-block cache), but this "
                             f"calibration is whole-model. Fix: a .safetensors file path, or sequential=None/True.")
        return
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".peft_ext_probe-"):
            pass
    except OSError as exc:
        raise ValueError(f"peft_ext.calibrate: cache_file={path!r} cannot be written ({exc.strerror or exc}). Fix: a "
                         f"path in a writable folder, or cache_file=None.") from None


def read_cache(path: str) -> Calibration:
    """A whole-model cache as it is, its fingerprint unchecked (`load_cache` checks it)."""
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
    out = []
    for members, n, cov in zip(groups, tokens, covariances):
        if cov.shape[0] != cov.shape[1] or not torch.isfinite(cov).all():
            raise ValueError(f"peft_ext.calibrate: the covariance cache '{path}' is damaged ({members[0]}). Fix: delete it.")
        out.append(CovarianceGroup(members=members, covariance=cov, tokens=n))
    return Calibration(out, fingerprint, source=path)


def load_cache(path: str, expected: dict) -> Calibration:
    """`read_cache`, refused when it was built for another model, target set or data than `expected`."""
    calib = read_cache(path)
    fingerprint = calib.fingerprint
    differing = sorted(k for k in set(expected) | set(fingerprint) if expected.get(k) != fingerprint.get(k))
    if differing:
        raise ValueError(
            f"peft_ext.calibrate: the covariance cache '{path}' was built for a different "
            f"{', '.join(differing)} (cached {[fingerprint.get(k) for k in differing if k != 'targets']}, "
            f"now {[expected.get(k) for k in differing if k != 'targets']}). It is not used. Fix: delete it to "
            f"rebuild, or pass another cache_file."
        )
    return calib


# --- block-by-block cache -----------------------------------------------------------------------------------------


def block_cache_path(folder: str, index: int) -> str:
    return os.path.join(folder, f"block-{index:05d}.safetensors")


def save_block_cache(folder: str, index: int, groups: list[CovarianceGroup], fingerprint: dict) -> None:
    """One finished block's covariances, written atomically (a run killed while writing leaves no partial file)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    path = block_cache_path(folder, index)
    meta = {"format": BLOCK_FORMAT, "block": str(index), "fingerprint": json.dumps(fingerprint, sort_keys=True),
            "groups": json.dumps([g.members for g in groups]), "tokens": json.dumps([g.tokens for g in groups])}
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file({f"covariance.{i}": g.covariance.contiguous().cpu() for i, g in enumerate(groups)}, tmp, metadata=meta)
    os.replace(tmp, path)


def load_block_cache(folder: str, index: int, expected: dict,
                     device: torch.device) -> Optional[list[CovarianceGroup]]:
    """The cached covariances of block `index`, or None when that block has no file yet; a file built for another
    model, target set or data is refused."""
    from safetensors import safe_open

    path = block_cache_path(folder, index)
    if not os.path.exists(path):
        return None
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != BLOCK_FORMAT or meta.get("block") != str(index):
                raise ValueError(f"format {meta.get('format')!r}, block {meta.get('block')!r}")
            fingerprint, members = json.loads(meta["fingerprint"]), json.loads(meta["groups"])
            tokens = json.loads(meta["tokens"])
            covariances = [f.get_tensor(f"covariance.{i}").to(device) for i in range(len(members))]
    except Exception as exc:
        raise ValueError(f"peft_ext.calibrate: the block cache '{path}' is unreadable or not a peft_ext CorDA block "
                         f"cache ({exc}). Fix: delete the folder '{folder}' or pass another cache_file.") from exc
    differing = sorted(k for k in set(expected) | set(fingerprint) if expected.get(k) != fingerprint.get(k))
    if differing:
        raise ValueError(f"peft_ext.calibrate: the block cache '{folder}' was built for a different "
                         f"{', '.join(differing)}; it is not used. Fix: delete the folder, or pass another cache_file.")
    return [CovarianceGroup(members=m, covariance=c, tokens=n, size=c.shape[0])
            for m, c, n in zip(members, covariances, tokens)]
