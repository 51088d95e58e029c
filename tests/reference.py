"""A naive, dense float64 implementation of SPEC.md, independent of the product's code.

Everything is formed explicitly (C as a d x d matrix, ΔW = B A as a d_out x d_in matrix) and
computed in float64: slow, obvious, and the yardstick every numeric path is tested against.
"""

from __future__ import annotations

import torch


def dense_c(w_base: torch.Tensor, w_aligned: torch.Tensor) -> torch.Tensor:
    """C = V Vᵀ / ‖V‖_F with V = W_aligned − W_base, in float64."""
    v = w_aligned.to(torch.float64) - w_base.to(torch.float64)
    return (v @ v.T) / torch.sqrt((v * v).sum())


def dense_cos(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """cos(ΔW, C ΔW) with ΔW = B A, every matrix dense, float64."""
    a, b, c = a.to(torch.float64), b.to(torch.float64), c.to(torch.float64)
    delta = b @ a
    proj = (c @ b) @ a
    num = (delta * proj).sum()
    den = torch.sqrt((delta * delta).sum()) * torch.sqrt((proj * proj).sum())
    return float(num / den)


def sanitize_dense(
    c_by_module: dict[str, torch.Tensor],
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    threshold: float | None = None,
    num_proj_layers: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float], set[str], float]:
    """Apply SPEC §2 to one adapter.

    Args:
        c_by_module: module → C (float64, dense).
        lora: module → (A, B).
        threshold / num_proj_layers: the selection mode.

    Returns:
        (new B per module in float64, rounded cos per module, projected modules, Pdst).
    """
    cos = {m: round(dense_cos(c_by_module[m], a, b), 5) for m, (a, b) in lora.items()}
    if threshold is None:
        assert num_proj_layers is not None
        tau = sorted(cos.values())[num_proj_layers - 1]
    else:
        tau = threshold
    selected = {m for m, v in cos.items() if v <= tau}
    new_b: dict[str, torch.Tensor] = {}
    dists = []
    for m, (_a, b) in lora.items():
        b64 = b.to(torch.float64)
        cb = c_by_module[m].to(torch.float64) @ b64
        if m in selected:
            new_b[m] = cb
            dists.append(0.0)
        else:
            new_b[m] = b64
            dists.append(float(torch.sqrt(((b64 - cb) ** 2).sum())))
    pdst = sum(1 / (1 + d) for d in dists) / len(dists)
    return new_b, cos, selected, pdst


def dense_exact(w_base: torch.Tensor, w_aligned: torch.Tensor, *, rank: int | None = None,
                energy: float | None = None) -> tuple[torch.Tensor, int]:
    """Ĉ_k = U_k U_kᵀ from a dense float64 SVD of V (SPEC §1, exact form), and its k: ``rank``,
    or the smallest k with Σ_{i≤k}σᵢ²/Σσᵢ² ≥ ``energy``."""
    v = w_aligned.to(torch.float64) - w_base.to(torch.float64)
    u, s, _ = torch.linalg.svd(v, full_matrices=False)
    if rank is not None:
        k = rank
    else:
        assert energy is not None
        total = float((s**2).sum())
        k, acc = 0, 0.0
        while k < len(s) and acc / total < energy:
            acc += float(s[k] ** 2)
            k += 1
    return u[:, :k] @ u[:, :k].T, k


def dense_finetune(c: torch.Tensor, w_aligned: torch.Tensor,
                   w_ft: torch.Tensor) -> tuple[float, torch.Tensor, float, float]:
    """SPEC §3 for one module, dense float64: (rounded cos(ΔW, CΔW), W_aligned + CΔW, ‖ΔW‖,
    ‖CΔW‖) with ΔW = W_ft − W_aligned (weights in nn.Linear's d_out x d_in)."""
    wa = w_aligned.to(torch.float64)
    delta = w_ft.to(torch.float64) - wa
    proj = c.to(torch.float64) @ delta
    nd, np_ = float(delta.norm()), float(proj.norm())
    cos = float((delta * proj).sum()) / (nd * np_)
    return round(cos, 5), wa + proj, nd, np_


# ---------------------------------------------------------------------------------------------
# SaLoRA (SPEC §4), dense: X explicitly, the SVD of W Xᵀ, C_s as a d x d matrix
# ---------------------------------------------------------------------------------------------


def dense_safety_basis(w: torch.Tensor, x: torch.Tensor, rank: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """V_s from the SVD of ``W Xᵀ`` (X: n x d_in, the counted tokens' inputs), float64.

    Returns:
        (V_s, d_out x rank; all squared singular values, descending).
    """
    wx = w.to(torch.float64) @ x.to(torch.float64).T
    u, s, _ = torch.linalg.svd(wx, full_matrices=False)
    return u[:, :rank], s**2


def projector(basis: torch.Tensor) -> torch.Tensor:
    """``V Vᵀ`` for an orthonormal basis V: equal for any basis of the same subspace."""
    b = basis.to(torch.float64)
    return b @ b.T


def dense_cs(basis: torch.Tensor) -> torch.Tensor:
    """SaLoRA's safety module ``C_s = I − V_s V_sᵀ`` (d_out x d_out, float64)."""
    return torch.eye(basis.shape[0], dtype=torch.float64) - projector(basis)
