"""CorDA's context-oriented decomposition of one weight, given the covariance of the layer's input.

With C the (damped) input covariance, SVD(W·C) = U S Vᵀ and W = U S Vᵀ C⁻¹ exactly. CorDA trains r of these
components and freezes the rest: IPM trains the r largest (the directions the task's context uses most), KPM the r
smallest (leaving the components that carry the context's knowledge frozen). With s the LoRA scaling:

    B0 = U_sel · sqrt(S_sel / s)      A0 = sqrt(S_sel / s) · V_selᵀ C⁻¹      residual = W − s·B0·A0

These factors are unbalanced: ‖b_i‖ = sqrt(σ_i / s) but ‖a_i‖ = sqrt(σ_i / s)·‖C⁻¹ v_i‖, which follows the scale of
the covariance (and, for KPM's smallest components, the damping). With `balance=True` each rank-1 component is
rescaled so that ‖b_i‖ = ‖a_i‖ = sqrt(‖b_i‖·‖a_i‖): the product b_i a_iᵀ, the residual and the outputs at init are the
same, but Adam's per-element steps then move both factors alike, as for PiSSA, whose factors are balanced by
construction.

C⁻¹ is never formed: C = L Lᵀ (Cholesky, computed once per distinct input and shared by all layers reading it),
W·C = (W·L)·Lᵀ and V_selᵀ C⁻¹ = (cholesky_solve(V_sel, L))ᵀ.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..linalg import _canonical_signs, randomized_svd
from ..rank_budget import energy_shares


def damped_cholesky(
    covariance: torch.Tensor, damping: float, *, name: str, max_tries: int = 8
) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor L of C + shift·I with shift = damping · mean(diag C); returns (L, shift).

    A covariance that is positive semi-definite but singular (fewer tokens than dimensions) is made definite by the
    damping; if the factorisation still fails the damping grows ×10 a bounded number of times. Non-finite input is
    refused up front (peft's damping loop never terminates on a NaN covariance).
    """
    if not torch.isfinite(covariance).all():
        raise ValueError(
            f"peft_ext corda: the input covariance of '{name}' contains NaN/Inf. Fix: the calibration activations were "
            f"not finite; check the data and the model (e.g. an fp16 overflow) and calibrate again."
        )
    scale = float(covariance.diagonal().mean().clamp_min(torch.finfo(covariance.dtype).tiny))
    lam = damping
    for _ in range(max_tries):
        damped = covariance.clone()
        damped.diagonal().add_(lam * scale)
        L, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            return L, lam * scale
        lam = max(lam * 10, 1e-10)
    raise ValueError(
        f"peft_ext corda: the input covariance of '{name}' is not positive definite even with damping "
        f"{lam / 10:g}. Fix: calibrate with more (and more varied) samples, or raise corda_damping."
    )


def corda_factors(
    weight: torch.Tensor,
    covariance: torch.Tensor,
    chol: torch.Tensor,
    shift: float,
    *,
    r: int,
    scaling: float,
    method: str,
    niter: Optional[int] = None,
    oversample: int = 8,
    seed: int = 0,
    balance: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A0 (r × in), B0 (out × r) for `weight` (out × in), its input covariance C and the Cholesky factor L of
    C + shift·I (from `damped_cholesky`), and each selected component's share of the context energy ‖W·C‖².

    Computed in the dtype of the covariance (float32, or float64 when it was accumulated in float64). `niter`
    selects a randomized SVD, which only IPM (the largest components) can use. `balance`: ‖b_i‖ = ‖a_i‖ for every
    component (see the module docstring); False gives the unbalanced B0 = U·sqrt(S/s), A0 = sqrt(S/s)·Vᵀ C⁻¹.
    """
    W = weight.to(chol.dtype)
    WC = torch.addmm(W, W, covariance.to(chol.dtype), beta=shift)  # W·(C + shift·I) in one GEMM
    if method == "ipm" and niter is not None:
        U, S, Vh = randomized_svd(WC, r, niter=niter, oversample=oversample, seed=seed)
    else:
        U, S, Vh = selected_svd(WC, r, largest=method == "ipm")
    U, Vh = _canonical_signs(U, Vh)
    shares = energy_shares(S.clamp_min(0), WC.double().square().sum())
    Vc = torch.cholesky_solve(Vh.mT, chol)  # C⁻¹ V_sel, (in × r)
    S = S.clamp_min(0) / scaling
    if not balance:
        root = S.sqrt()
        return root.unsqueeze(1) * Vc.mT, U * root, shares
    # b_i a_iᵀ = (σ_i/s)·u_i (C⁻¹v_i)ᵀ = (σ_i/s)·‖C⁻¹v_i‖ · u_i ĉ_iᵀ with unit u_i, ĉ_i: split that norm evenly
    vc_norm = torch.linalg.vector_norm(Vc, dim=0)
    root = (S * vc_norm).sqrt()
    direction = Vc / torch.where(vc_norm > 0, vc_norm, torch.ones_like(vc_norm))
    return root.unsqueeze(1) * direction.mT, U * root, shares


def selected_svd(M: torch.Tensor, r: int, *, largest: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The r largest or r smallest singular triplets of M (m × n), in descending order of σ.

    Through the eigendecomposition of the smaller Gram matrix (MᵀM or MMᵀ), faster than `torch.linalg.svd` on these
    shapes. For the smallest triplets (KPM) the Gram matrix is formed in float64, which keeps them accurate: an eigenvalue
    σ_i² is off by about 1e-16·σ_max², i.e. σ_i by 1e-16·(σ_max/σ_i)² relatively, below the rounding of M itself.
    The other factor is recovered as M·v (resp. uᵀ·M) normalised, so σ is its norm and no small eigenvalue is
    square-rooted on its own.
    """
    m, n = M.shape
    # the largest triplets are well conditioned in float32; the smallest (KPM) need float64
    Md = M.double() if not largest else M
    tall = m >= n
    G = Md.mT @ Md if tall else Md @ Md.mT
    _, vecs = torch.linalg.eigh(G)  # ascending
    k = vecs.shape[1]
    idx = torch.arange(k - 1, k - 1 - r, -1) if largest else torch.arange(r - 1, -1, -1)
    side = vecs[:, idx]  # (n × r) right vectors if tall, else (m × r) left vectors
    other = Md @ side if tall else (side.mT @ Md).mT  # (m × r) or (n × r): σ·u or σ·v
    S = torch.linalg.vector_norm(other, dim=0)
    other = other / torch.where(S > 0, S, torch.ones_like(S))
    U, V = (other, side) if tall else (side, other)
    return U.to(M.dtype), S.to(M.dtype), V.mT.to(M.dtype)


def decompose_member(group, weight: torch.Tensor, *, r: int, scaling: float, settings: dict,
                     name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A0, B0, energy shares) in float32 for layer `name` (weight `weight`, float32 (out, in)) of a covariance group, with the CorDA
    `settings` of its config (`CorDAConfig.decomposition_settings`)."""
    if group.dim != weight.shape[1]:
        raise ValueError(
            f"peft_ext corda: the covariance for layer '{name}' is {group.dim}-dimensional but the layer has "
            f"in_features={weight.shape[1]}. Fix: calibrate this model again."
        )
    chol, shift = group.cholesky(settings["corda_damping"], weight.device)
    A0, B0, shares = corda_factors(weight, group.covariance.to(weight.device), chol, shift, r=r, scaling=scaling,
                           method=settings["corda_method"], niter=settings["svd_niter"],
                           oversample=settings["svd_oversample"], seed=settings["svd_seed"],
                           balance=settings["corda_balance_factors"])
    group.mark_decomposed(name)  # frees the Cholesky factor once every layer reading this input is done
    return A0.float(), B0.float(), shares
