"""Linear algebra shared by the methods: seeded top-r SVD and DoRA row norms.

Everything here works in float32 (or float64 where asked) whatever the dtype of the weight it is given; callers cast
the results back.
"""

from __future__ import annotations

from typing import Optional

import torch


def _canonical_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fix the sign ambiguity of singular vectors: the largest-magnitude entry of each column of U is positive.

    LAPACK builds may return (u, v) or (-u, -v) for the same matrix; canonical signs make the factors reproducible
    across machines and processes (ZeRO-3 ranks compute them independently before they are compared).
    """
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U.gather(0, idx.unsqueeze(0)).squeeze(0))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs, Vh * signs.unsqueeze(1)


def randomized_svd(
    W: torch.Tensor, r: int, *, niter: int, oversample: int = 8, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r SVD by the randomized range finder with power iterations (Halko, Martinsson & Tropp 2011, Alg. 4.4).

    Unlike `torch.svd_lowrank`, the Gaussian test matrix comes from a private `torch.Generator` seeded with `seed`, so
    the result is reproducible and the global RNG is left alone; every power iteration is re-orthonormalised (QR),
    which keeps the small singular directions accurate; and `oversample` extra columns improve the top r.
    """
    m, n = W.shape
    k = min(r + oversample, m, n)
    gen = torch.Generator(device=W.device).manual_seed(seed)
    omega = torch.randn(n, k, generator=gen, device=W.device, dtype=W.dtype)
    Q, _ = torch.linalg.qr(W @ omega)
    for _ in range(niter):
        Z, _ = torch.linalg.qr(W.mT @ Q)
        Q, _ = torch.linalg.qr(W @ Z)
    Ub, S, Vh = torch.linalg.svd(Q.mT @ W, full_matrices=False)
    U = Q @ Ub
    return U[:, :r], S[:r], Vh[:r]


def top_r_svd(
    W: torch.Tensor, r: int, *, niter: Optional[int] = None, oversample: int = 8, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U_r (m×r), S_r (r), V_rᵀ (r×n) of a 2-D float matrix, with canonical signs.

    `niter=None` runs the exact `torch.linalg.svd`; an integer runs `randomized_svd` with that many power iterations.
    """
    if niter is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, Vh = randomized_svd(W, r, niter=niter, oversample=oversample, seed=seed)
    U, Vh = _canonical_signs(U, Vh)
    return U, S, Vh


@torch.no_grad()
def dora_row_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """Row norms ‖W + s·B·A‖ (one per output row) in float32, without materialising B·A or W + s·B·A.

        ‖W_i + s·B_i A‖² = ‖W_i‖² + 2s·(W Aᵀ)_i · B_i + s²·B_i (A Aᵀ) B_iᵀ

    Cost: one (out×in)·(in×r) product and an r×r Gram matrix, against peft's DoRA which builds B·A through an in×in
    identity (in²·r + in·r·out) and then two out×in temporaries. `weight` is (out, in), `lora_A` (r, in),
    `lora_B` (out, r).
    """
    W = weight.float()
    A = lora_A.float()
    B = lora_B.float()
    sq = torch.linalg.vector_norm(W, dim=1).square()
    cross = ((W @ A.mT) * B).sum(dim=1)
    quad = ((B @ (A @ A.mT)) * B).sum(dim=1)
    return (sq + (2.0 * scaling) * cross + (scaling * scaling) * quad).clamp_min(0.0).sqrt()


def safe_norm(norm: torch.Tensor) -> torch.Tensor:
    """Replace zero row norms by 1 so that magnitude / norm is finite (a zero row stays zero: its direction is 0).

    peft's DoRA divides by the raw norm and returns NaN for an all-zero weight row (peft issue 2049); a `where` on the
    quotient would still give NaN gradients, so the denominator itself is made safe.
    """
    return torch.where(norm > 0, norm, torch.ones_like(norm))
