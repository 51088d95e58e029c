"""The Safe LoRA alignment matrix C of one module (SPEC §1): V, its Gram matrix, C, and the
stored forms (C, V, the exact truncated U, SaLoRA's N) — pure tensor math, no I/O, no Ray.

Conventions:
    ``V = W_aligned - W_base`` (d_out x d_in), ``C = V Vᵀ / ‖V‖_F`` (d_out x d_out).
    A LoRA module has ``A`` (r x d_in) and ``B`` (d_out x r); ΔW = B A.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch

logger = logging.getLogger(__name__)

#: Stored forms of an alignment matrix:
#: ``C``: the d_out x d_out matrix itself; ``V``: the difference V, with C B = V (Vᵀ B) / ‖V‖;
#: ``U``: an orthonormal basis U_k of the exact truncated projection (SPEC §1, optional form);
#: ``N``: an orthonormal basis V_s whose *complement* is applied, C = I − V_s V_sᵀ (SaLoRA's
#: safety module, SPEC §4; the stored tensor is a U-form basis, the letter says how it acts).
Form = Literal["C", "V", "U", "N"]
FORMS: tuple[str, ...] = ("C", "V", "U", "N")


def choose_form(d_out: int, d_in: int) -> Form:
    """The smaller of the two equivalent stored forms of C for a d_out x d_in weight.

    C has d_out² numbers and V has d_out·d_in; on a tie C wins because applying it costs one
    matrix product instead of two.
    """
    return "C" if d_out <= d_in else "V"


def as_linear(w: torch.Tensor, layout: str) -> torch.Tensor:
    """A stored 2-D weight as nn.Linear's d_out x d_in (a view): GPT-2's ``Conv1D`` stores
    d_in x d_out (``layout="conv1d"``; PEFT's ``fan_in_fan_out``), so B acts on its columns."""
    if layout == "conv1d":
        return w.T
    if layout != "linear":
        raise ValueError(f"unknown weight layout {layout!r}")
    return w


def weight_difference(old: torch.Tensor, new: torch.Tensor, names: tuple[str, str]) -> torch.Tensor:
    """``new − old`` of two 2-D weights in float32, a new tensor (the inputs are kept)."""
    if old.shape != new.shape:
        raise ValueError(f"shape mismatch: {names[0]} {tuple(old.shape)} vs {names[1]} "
                         f"{tuple(new.shape)}")
    if old.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(old.shape)}")
    return new.to(torch.float32, copy=True).sub_(old)


def alignment_difference(w_base: torch.Tensor, w_aligned: torch.Tensor) -> torch.Tensor:
    """``V = W_aligned − W_base`` in float32, whatever the stored dtype (SPEC §1)."""
    return weight_difference(w_base, w_aligned, ("base", "aligned"))


def full_precision_matmul() -> None:
    """Make float32 matrix products full IEEE float32 in this process (no TF32).

    Called once in every worker actor's ``__init__`` (the setting is process-global). On
    Ampere and later GPUs a library or user setting (``allow_tf32``,
    ``set_float32_matmul_precision("high")``) makes float32 matmuls run in TF32, which keeps
    10 mantissa bits: C and C B then carry ~1e-3 relative errors, enough to move a cosine at
    its 5th decimal and so flip the reference's ``round(cos, 5) <= τ`` selection (SPEC §2).
    Accumulation is float32 either way; the r x r score products are float64
    (:func:`module_score`).
    """
    torch.set_float32_matmul_precision("highest")


def gram(v: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """``V Vᵀ`` computing only the blocks on and above the diagonal, then mirroring them.

    ``k(k+1)/2`` of the ``k²`` row-block products for ``k = blocks``: 10/16 of the work for
    the default, and exactly symmetric. Every entry is the same dot product over the full row
    length as in ``v @ v.T``. Small matrices use the plain product.
    """
    n = int(v.shape[0])
    if n < 2048 or blocks < 2:
        return v @ v.T
    out = torch.empty(n, n, dtype=v.dtype, device=v.device)
    step = -(-n // blocks)
    for i in range(0, n, step):
        j = min(i + step, n)
        out[i:j, i:] = v[i:j] @ v[i:].T
        out[j:, i:j] = out[i:j, j:].T
    return out


def frobenius_norm(t: torch.Tensor) -> float:
    """‖t‖_F accumulated in float64 (a float32 sum over ~10⁸ squares loses digits)."""
    return float(torch.linalg.vector_norm(t, dtype=torch.float64))


@dataclass
class AlignmentMatrix:
    """The stored form of one module's alignment matrix.

    Attributes:
        form: ``"C"``, ``"V"``, ``"U"`` or ``"N"`` (see :data:`Form`).
        tensor: float32; C (d_out x d_out), V (d_out x d_in), U_k (d_out x k) or V_s
            (d_out x r_s, form ``N``).
        norm: ‖V‖_F (float64 precision); used by the ``V`` form and reported for all (for a
            SaLoRA module, ‖W Xᵀ‖_F on the calibration set).
    """

    form: Form
    tensor: torch.Tensor
    norm: float
    energy: float | None = None  # form U: Σ_{i≤k}σᵢ²/Σσᵢ² of the kept k directions

    @property
    def d_out(self) -> int:
        return int(self.tensor.shape[0])

    def apply(self, b: torch.Tensor) -> torch.Tensor:
        """``C B`` in float32 for B of shape d_out x n (n may be many adapters' ranks).

        Full float32 products are expected: worker actors disable TF32 with
        :func:`full_precision_matmul` (a TF32 ``C B`` can flip a selection).
        """
        if b.dim() != 2 or b.shape[0] != self.d_out:
            raise ValueError(f"B has shape {tuple(b.shape)}, expected ({self.d_out}, r)")
        m = self.tensor
        b = b.to(device=m.device, dtype=torch.float32)
        if self.form == "C":
            return m @ b
        if self.form == "V":
            return (m @ (m.T @ b)) / self.norm
        if self.form == "U":
            return m @ (m.T @ b)
        if self.form == "N":
            # (I − V_s V_sᵀ) B without the d_out x d_out matrix
            return b - m @ (m.T @ b)
        raise ValueError(f"unknown alignment matrix form {self.form!r}")

    def dense(self) -> torch.Tensor:
        """The d_out x d_out matrix (for tests and small models only)."""
        m = self.tensor
        if self.form == "C":
            return m
        if self.form == "V":
            return (m @ m.T) / self.norm
        if self.form == "U":
            return m @ m.T
        if self.form == "N":
            return torch.eye(m.shape[0], dtype=m.dtype, device=m.device) - m @ m.T
        raise ValueError(f"unknown alignment matrix form {self.form!r}")

    def to(self, device: torch.device | str) -> AlignmentMatrix:
        return AlignmentMatrix(self.form, self.tensor.to(device), self.norm, self.energy)


def compute_alignment(
    w_base: torch.Tensor,
    w_aligned: torch.Tensor,
    *,
    form: Form | None = None,
    rank: int | None = None,
    energy: float | None = None,
) -> AlignmentMatrix:
    """Build one module's alignment matrix from its base and aligned weights.

    Args:
        w_base: Base (unaligned) weight, d_out x d_in, any float dtype, on any device.
        w_aligned: Aligned weight, same shape.
        form: Stored form; default :func:`choose_form`. ``"U"`` selects the exact truncated
            projection and needs ``rank`` or ``energy``.
        rank: For form ``U``: keep the top ``rank`` left singular vectors.
        energy: For form ``U``: keep the smallest k with Σ_{i≤k}σᵢ²/Σσᵢ² ≥ energy.

    Returns:
        The :class:`AlignmentMatrix` in float32 on the weights' device (computed in float32;
        full float32 products expected, see :func:`full_precision_matmul`).

    Raises:
        ValueError: shapes differ, not 2-D, or ‖V‖_F = 0 (C undefined).
    """
    v = alignment_difference(w_base, w_aligned)
    norm = frobenius_norm(v)
    check_norm(norm)
    form = form or choose_form(*v.shape)
    if form == "C":
        return AlignmentMatrix("C", gram(v).div_(norm), norm)
    if form == "V":
        return AlignmentMatrix("V", v.contiguous(), norm)
    if form == "U":
        basis, captured = truncated_basis(v, rank=rank, energy=energy)
        return AlignmentMatrix("U", basis, norm, captured)
    raise ValueError(f"unknown form {form!r}")


@dataclass
class PendingAlignment:
    """A module's alignment matrix queued on its device, nothing waited for yet.

    Attributes:
        form: The stored form.
        tensor: The stored tensor (float32, on the device; its values may still be computed).
        norm: ‖V‖_F, a 0-dim float64 tensor on the device: 0 or not finite means the matrix
            is undefined (check it once the work is done, see :meth:`resolve`).
        energy: Form ``U``: the energy of the kept directions.
    """

    form: Form
    tensor: torch.Tensor
    norm: torch.Tensor
    energy: float | None = None

    def resolve(self) -> AlignmentMatrix:
        """The :class:`AlignmentMatrix` (waits for the device).

        Raises:
            ValueError: ‖V‖_F is 0 or not finite.
        """
        norm = float(self.norm)
        check_norm(norm)
        return AlignmentMatrix(self.form, self.tensor, norm, self.energy)


def check_norm(norm: float) -> None:
    """Raise ValueError unless ‖V‖_F is usable (non-zero and finite)."""
    if norm == 0.0 or not math.isfinite(norm):
        raise ValueError(
            "‖W_aligned − W_base‖_F is 0 (identical weights): C = V Vᵀ/‖V‖_F is undefined"
            if norm == 0.0 else f"‖W_aligned − W_base‖_F is {norm} (NaN/Inf in the weights)")


def start_alignment(
    w_base: torch.Tensor,
    w_aligned: torch.Tensor,
    *,
    form: Form | None = None,
    rank: int | None = None,
    energy: float | None = None,
) -> PendingAlignment:
    """:func:`compute_alignment` without waiting for the device: the products are queued and
    ‖V‖_F stays on the device, so a GPU build never stalls module by module (the exact form's
    SVD needs its values on the host, and waits).

    The values equal :func:`compute_alignment`'s: the same products, C divided by the same
    float32 rounding of ‖V‖_F.
    """
    form = form or choose_form(*w_base.shape)
    if form == "U":
        am = compute_alignment(w_base, w_aligned, form=form, rank=rank, energy=energy)
        return PendingAlignment("U", am.tensor, torch.tensor(am.norm, dtype=torch.float64),
                                am.energy)
    v = alignment_difference(w_base, w_aligned)
    norm = torch.linalg.vector_norm(v, dtype=torch.float64)
    if form == "C":
        return PendingAlignment("C", gram(v).div_(norm.to(torch.float32)), norm)
    if form == "V":
        return PendingAlignment("V", v.contiguous(), norm)
    raise ValueError(f"unknown form {form!r}")


def truncated_basis(v: torch.Tensor, *, rank: int | None,
                    energy: float | None) -> tuple[torch.Tensor, float]:
    """U_k, the top-k left singular vectors of V, and the energy they keep (SPEC §1, exact
    projection), computed in float64.

    For d_out ≤ d_in the basis comes from the symmetric eigendecomposition of the Gram matrix
    V Vᵀ (d_out x d_out; its eigenvalues are σᵢ²): about twice as fast as an SVD of V on a
    CPU, and U_k U_kᵀ agrees with the SVD's to ~1e-14 in float64 (the error of an eigenvalue
    is ~1e-16·σ₁², far below any kept σ_k² — tested against a dense SVD). A tall V
    (d_out > d_in) takes the SVD, whose U is then d_out x d_in.

    Args:
        v: V (d_out x d_in), any float dtype and device.
        rank: Keep k = ``rank`` directions (1 ≤ rank ≤ min(d_out, d_in)).
        energy: Or keep the smallest k with Σ_{i≤k}σᵢ²/Σσᵢ² ≥ ``energy`` (0 < energy ≤ 1).

    Returns:
        ``(U_k in float32, d_out x k; the kept energy fraction Σ_{i≤k}σᵢ²/Σσᵢ²)``.
    """
    if (rank is None) == (energy is None):
        raise ValueError("the exact projection needs exactly one of rank or energy")
    d_out, d_in = v.shape
    n = min(d_out, d_in)
    if d_out <= d_in:
        v64 = v.to(torch.float64)
        gram64 = v64 @ v64.T
        del v64  # peak: the Gram matrix and the eigenvectors, d_out² float64 each
        evals, evecs = torch.linalg.eigh(gram64)  # ascending
        del gram64
        s2 = evals.flip(0).clamp_min(0.0)

        def top(k: int) -> torch.Tensor:  # the last k eigenvectors, largest first
            return evecs[:, d_out - k:].flip(1)
    else:
        u, s, _ = torch.linalg.svd(v.to(torch.float64), full_matrices=False)
        s2 = s**2

        def top(k: int) -> torch.Tensor:
            return u[:, :k]
    cum = torch.cumsum(s2, 0) / torch.sum(s2)
    if rank is not None:
        if not 1 <= rank <= n:
            raise ValueError(f"rank {rank} outside 1..{n} (V is {d_out} x {d_in})")
        k = rank
    else:
        assert energy is not None
        if not 0.0 < energy <= 1.0:
            raise ValueError(f"energy {energy} outside (0, 1]")
        k = int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype)).item()) + 1
        k = min(k, n)
    return top(k).to(torch.float32).contiguous(), float(cum[k - 1])
