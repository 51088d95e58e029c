"""SaLoRA's safety module (SPEC §4): second moments of the calibration activations and the
safety basis V_s. Pure tensor math, no I/O, no Ray.

Conventions:
    ``Σ = Σₜ xₜ xₜᵀ`` (d_in x d_in) over the calibration tokens reaching W, ``V_s`` the top-r_s
    eigenvectors of ``W Σ Wᵀ`` (d_out x r_s), ``C_s = I − V_s V_sᵀ``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


def second_moment(x: torch.Tensor) -> torch.Tensor:
    """``Σ = Xᵀ X = Σₜ xₜ xₜᵀ`` of the rows of ``x`` (…, d_in), in float64 (d_in x d_in).

    Every product is formed in float64: a float32 or bfloat16 activation times another is
    exact there, so only the additions round, and partial sums from several workers add up to
    the same Σ whatever the split (up to float64 addition order).
    """
    x64 = x.reshape(-1, x.shape[-1]).to(torch.float64)
    return x64.T @ x64


def accumulate_second_moment(sigma: torch.Tensor, x: torch.Tensor) -> None:
    """``sigma += Xᵀ X`` in place (float64 ``sigma``, d_in x d_in; ``x`` of shape (…, d_in))."""
    x64 = x.reshape(-1, x.shape[-1]).to(dtype=torch.float64, device=sigma.device)
    sigma.addmm_(x64.T, x64)


def canonical_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each column so that its entry of largest magnitude is positive.

    Eigenvectors are defined up to sign; LAPACK, cuSOLVER and their versions pick differently.
    Fixing the sign makes V_s one tensor for one Σ (ties between equal magnitudes go to the
    first such entry).
    """
    if vectors.numel() == 0:
        return vectors
    idx = vectors.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(torch.gather(vectors, 0, idx))
    signs[signs == 0] = 1
    return vectors * signs


@dataclass(frozen=True)
class SafetyBasis:
    """One module's SaLoRA safety directions.

    Attributes:
        basis: V_s, d_out x r_s, float64, orthonormal columns in descending eigenvalue order,
            signs fixed by :func:`canonical_signs`.
        eigenvalues: The top r_s eigenvalues of ``W Σ Wᵀ`` (= squared singular values of
            ``W Xᵀ``), descending, float64.
        trace: ``tr(W Σ Wᵀ) = ‖W Xᵀ‖_F²``.
    """

    basis: torch.Tensor
    eigenvalues: torch.Tensor
    trace: float

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])

    @property
    def energy(self) -> float:
        """Fraction of ``‖W Xᵀ‖_F²`` the r_s directions capture (Σ top eigenvalues / trace)."""
        return float(self.eigenvalues.sum()) / self.trace if self.trace > 0 else float("nan")

    @property
    def degenerate(self) -> int:
        """How many of the r_s directions carry (numerically) no energy: they are an arbitrary
        basis of a null space, so r_s exceeds what the calibration set determines."""
        top = float(self.eigenvalues[0]) if self.eigenvalues.numel() else 0.0
        tol = max(top, 0.0) * self.basis.shape[0] * torch.finfo(torch.float64).eps
        return int((self.eigenvalues <= tol).sum())


def safety_basis(w: torch.Tensor, sigma: torch.Tensor, rank: int) -> SafetyBasis:
    """V_s: the top-``rank`` eigenvectors of ``W Σ Wᵀ`` (SPEC §4), exactly (no randomized SVD).

    ``W Σ Wᵀ = (W Xᵀ)(W Xᵀ)ᵀ``, so these are the top left singular vectors of ``W Xᵀ``.
    Computed in float64 with ``torch.linalg.eigh`` on ``sigma``'s device.

    Args:
        w: The module's weight, d_out x d_in (Linear orientation), any float dtype.
        sigma: Σ, d_in x d_in, float64 (symmetric PSD).
        rank: r_s, 1 ≤ r_s ≤ d_out.

    Raises:
        ValueError: shapes disagree, ``rank`` is out of range, or ``W Xᵀ`` is zero or not
            finite.
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    d_out, d_in = (int(d) for d in w.shape)
    if tuple(sigma.shape) != (d_in, d_in):
        raise ValueError(f"Σ has shape {tuple(sigma.shape)}, the weight needs ({d_in}, {d_in})")
    if not 1 <= rank <= d_out:
        raise ValueError(f"safety rank {rank} outside 1..{d_out} (d_out of the weight)")
    w64 = w.to(device=sigma.device, dtype=torch.float64)
    m = w64 @ sigma.to(torch.float64) @ w64.T
    m = (m + m.T) / 2  # exactly symmetric: eigh reads one triangle
    trace = float(torch.trace(m))
    if not math.isfinite(trace):
        raise ValueError(f"‖W Xᵀ‖_F² is {trace} (NaN/Inf in the weight or activations)")
    if trace <= 0.0:
        raise ValueError("W Xᵀ is zero on the calibration tokens: the safety directions are "
                         "undefined")
    evals, evecs = torch.linalg.eigh(m)
    top = evals.flip(0)[:rank].contiguous()
    basis = canonical_signs(evecs.flip(1)[:, :rank]).contiguous()
    return SafetyBasis(basis, top, trace)
