"""CorDA's covariances: one per distinct input of the target layers, accumulated over real tokens only, and the
`Calibration` that carries them (or, after a block-by-block calibration, the init factors decomposed from them) from
`calibrate` to `get_peft_model`.

The collector is the engine both calibration paths share: pre-hooks on the target layers see each batch's inputs,
layers that read the same tensor share one accumulation (q/k/v, gate/up), padded positions are left out through the
attention mask, and only the upper block triangle of Σ x xᵀ is accumulated.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..distributed import all_reduce_sum
from .decomposition import damped_cholesky

@dataclass
class CovarianceGroup:
    """The covariance of one distinct input and the target layers that read it (in execution order)."""

    members: list[str]
    covariance: Optional[torch.Tensor] = None  # (d, d), Σ x xᵀ / tokens; None once decomposed block by block
    size: int = 0  # d
    tokens: int = 0
    positive_definite: Optional[bool] = None  # C itself (undamped) is positive definite, i.e. of full rank
    condition_estimate: Optional[float] = None  # (max/min diagonal of C's Cholesky factor)², a lower bound of cond(C)
    _sum: Optional[torch.Tensor] = field(default=None, repr=False)
    _current: Any = field(default=None, repr=False)  # weakref to this batch's input
    _chol: dict = field(default_factory=dict, repr=False)
    _decomposed: set = field(default_factory=set, repr=False)

    @property
    def dim(self) -> int:
        return self.covariance.shape[0] if self.covariance is not None else self.size

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

    def __init__(self, groups: list[CovarianceGroup], fingerprint: dict, source: str,
                 factors: Optional[dict] = None, settings: Optional[dict] = None, cached_blocks: tuple = ()):
        self.groups = groups
        self.fingerprint = fingerprint
        self.source = source  # "computed", the cache it was read from, or "sequential" (block by block)
        self._by_name = {m: g for g in groups for m in g.members}
        # block-by-block calibration: layer name -> (A0, B0, r, scaling), decomposed with `settings` (the CorDA
        # config fields they depend on); the covariances themselves are freed
        self.factors: dict = factors if factors is not None else {}
        self.settings = settings
        self.cached_blocks = tuple(cached_blocks)  # blocks whose covariances came from the cache

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
        deficient = [g for g in self.groups if g.positive_definite is False]
        if deficient:
            lines.append(f"  {len(deficient)} of {len(self.groups)} covariances are rank-deficient (input directions the "
                         f"data never excites, e.g. MLP units that never fire); corda_damping makes them invertible")
        return "\n".join(lines)

    def to_config_record(self) -> dict:
        return {"tokens": self.tokens, "covariances": len(self.groups), "layers": len(self._by_name),
                "sequential": bool(self.factors), **{k: v for k, v in self.fingerprint.items() if k != "targets"}}


# --- the collector ---------------------------------------------------------------------------------------------------


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


class StopForward(Exception):
    """Raised by the hook of the last target: nothing after it is needed."""


SAMPLE_NORMALIZATIONS = ("none", "max")


class Collector:
    """Pre-hooks on the target layers that sum x xᵀ over the real (unpadded) tokens, once per distinct input.

    `sample_normalization` "max" divides each sample's rows by the absolute value of that sample's largest activation
    (over its real tokens) before summing, as peft's and the CorDA authors' `preprocess_corda` do; "none" weights
    every real token the same."""

    def __init__(self, names: list[str], dtype: torch.dtype, sample_normalization: str = "none"):
        self.names = set(names)
        self.dtype = dtype
        self.sample_normalization = sample_normalization
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
            raise StopForward

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
        if self.sample_normalization == "max":
            rows = rows * per_sample_max_scales(x, mask, self.dtype)[:, None]
        if not torch.isfinite(rows.sum()):
            raise ValueError(
                f"peft_ext.calibrate: layer '{name}' received NaN/Inf activations in calibration batch "
                f"{self.batch_index}. Fix: check that batch's data and the model's dtype (fp16 overflow); calibrate "
                f"in float32/bfloat16."
            )
        if group._sum is None:
            group._sum = torch.zeros(x.shape[-1], x.shape[-1], dtype=self.dtype, device=x.device)
            group.size = x.shape[-1]
        accumulate_upper_(group._sum, rows)
        group.tokens += rows.shape[0]


def per_sample_max_scales(x: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One factor per real row of `x` ((batch, seq, dim), or (batch·seq, dim) for a flattened input):
    1 / |max activation of its sample| over that sample's real tokens (the signed max, then its absolute value, as
    peft's `preprocess_corda`). A sample whose max is 0 falls back to its largest |activation|, then to 1."""
    xs = x.reshape(*mask.shape, x.shape[-1]) if x.dim() == 2 else x
    real = mask[..., None]
    peak = xs.masked_fill(~real, float("-inf")).amax(dim=(1, 2)).abs()
    if bool((peak == 0).any()):  # rare: a second pass over the activations only then
        peak = torch.where(peak == 0, xs.abs().masked_fill(~real, 0).amax(dim=(1, 2)), peak)
        peak = torch.where(peak == 0, torch.ones_like(peak), peak)
    return (1.0 / peak.to(dtype))[:, None].expand(mask.shape)[mask]


def diagnose(group: CovarianceGroup) -> None:
    """Rank and conditioning of C itself for the summary. The factor is not kept: holding one per group would double
    the calibration's memory; the decomposition factors the damped matrix once per group."""
    L, info = torch.linalg.cholesky_ex(group.covariance)
    group.positive_definite = group.tokens >= group.dim and int(info) == 0
    if group.positive_definite:
        d = L.diagonal()
        group.condition_estimate = float((d.max() / d.min()) ** 2)


def after_first_forward(collector, names: list[str]) -> None:
    """Every target must have run; later forwards can stop after the last target."""
    collector.first = False
    missing = sorted(set(names) - set(collector.order))
    if missing:
        raise ValueError(f"peft_ext.calibrate: target layer '{missing[0]}' (and {len(missing) - 1} more) "
                         f"never ran in the forward pass, so it has no input covariance. Fix: leave it out "
                         f"of target_modules.")
    if collector.early_exit:
        collector.stop_after = collector.order[-1]


def reduced_groups(groups: list, world: int) -> list:
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
        diagnose(g)
    return groups
