"""The Safe LoRA rule (and SaLoRA's safety module) as pure tensor math (no I/O, no Ray).

SPEC.md §1, §2 and §4. Everything here takes torch tensors and returns tensors or plain
numbers, so it can be tested exhaustively against a dense float64 computation.

Conventions:
    ``V = W_aligned - W_base`` (d_out x d_in), ``C = V Vᵀ / ‖V‖_F`` (d_out x d_out).
    A LoRA module has ``A`` (r x d_in) and ``B`` (d_out x r); ΔW = B A.
    SaLoRA: ``Σ = Σₜ xₜ xₜᵀ`` (d_in x d_in) over the calibration tokens reaching W, ``V_s``
    the top-r_s eigenvectors of ``W Σ Wᵀ`` (d_out x r_s), ``C_s = I − V_s V_sᵀ``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
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

#: Decimals the reference rounds cosines to before comparing them with the threshold.
COS_DECIMALS = 5


def choose_form(d_out: int, d_in: int) -> Form:
    """The smaller of the two equivalent stored forms of C for a d_out x d_in weight.

    C has d_out² numbers and V has d_out·d_in; on a tie C wins because applying it costs one
    matrix product instead of two.
    """
    return "C" if d_out <= d_in else "V"


def alignment_difference(w_base: torch.Tensor, w_aligned: torch.Tensor) -> torch.Tensor:
    """``V = W_aligned − W_base`` in float32, whatever the stored dtype (SPEC §1)."""
    if w_base.shape != w_aligned.shape:
        raise ValueError(f"shape mismatch: base {tuple(w_base.shape)} vs aligned "
                         f"{tuple(w_aligned.shape)}")
    if w_base.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w_base.shape)}")
    return w_aligned.to(torch.float32) - w_base.to(torch.float32)


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
        return AlignmentMatrix(self.form, self.tensor.to(device), self.norm)


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
    if norm == 0.0 or not math.isfinite(norm):
        raise ValueError(
            "‖W_aligned − W_base‖_F is 0 (identical weights): C = V Vᵀ/‖V‖_F is undefined"
            if norm == 0.0 else f"‖W_aligned − W_base‖_F is {norm} (NaN/Inf in the weights)"
        )
    form = form or choose_form(*v.shape)
    if form == "C":
        return AlignmentMatrix("C", gram(v).div_(norm), norm)
    if form == "V":
        return AlignmentMatrix("V", v.contiguous(), norm)
    if form == "U":
        return AlignmentMatrix("U", truncated_basis(v, rank=rank, energy=energy), norm)
    raise ValueError(f"unknown form {form!r}")


def truncated_basis(v: torch.Tensor, *, rank: int | None, energy: float | None) -> torch.Tensor:
    """U_k: the top-k left singular vectors of V (SPEC §1, exact projection)."""
    if (rank is None) == (energy is None):
        raise ValueError("the exact projection needs exactly one of rank or energy")
    u, s, _ = torch.linalg.svd(v.to(torch.float64), full_matrices=False)
    if rank is not None:
        if not 1 <= rank <= s.numel():
            raise ValueError(f"rank {rank} outside 1..{s.numel()}")
        k = rank
    else:
        assert energy is not None
        if not 0.0 < energy <= 1.0:
            raise ValueError(f"energy {energy} outside (0, 1]")
        cum = torch.cumsum(s**2, 0) / torch.sum(s**2)
        k = int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype)).item()) + 1
        k = min(k, s.numel())
    return u[:, :k].to(torch.float32).contiguous()


# ---------------------------------------------------------------------------------------------
# Sanitizing: scores, selection, projection (SPEC §2)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleScore:
    """Per-module figures of one adapter.

    Attributes:
        cos: cos(ΔW, C ΔW) = ⟨BA, CBA⟩_F / (‖BA‖_F ‖CBA‖_F), unrounded (NaN if a norm is 0).
        cos_rounded: ``round(cos, 5)`` as the reference compares it.
        norm_delta: ‖B A‖_F.
        norm_projected: ‖C B A‖_F.
        dist: ‖B − C B‖_F (for Pdst of an unprojected module).
    """

    cos: float
    cos_rounded: float
    norm_delta: float
    norm_projected: float
    dist: float


def module_score(a: torch.Tensor, b: torch.Tensor, cb: torch.Tensor) -> ModuleScore:
    """Score one module without any d x d matrix (SPEC §2); see :func:`module_scores`.

    Args:
        a: A, r x d_in.
        b: B, d_out x r.
        cb: C B, d_out x r.
    """
    return module_scores(a.unsqueeze(0), b.unsqueeze(0), cb.unsqueeze(0))[0]


def module_scores(a: torch.Tensor, b: torch.Tensor, cb: torch.Tensor) -> list[ModuleScore]:
    """Score n modules of equal shapes at once (a batch of adapters), no d x d matrix.

    With G = A Aᵀ (r x r): ⟨BA, WA⟩ = tr(BᵀW G), ‖BA‖² = tr(BᵀB G), ‖WA‖² = tr(WᵀW G).
    The r x r products are formed in float64; ``cb`` = C B comes from the (float32) apply.
    One batched product per step instead of one small product per module: on a small adapter
    the per-call overhead, not the arithmetic, is the cost.

    Args:
        a: A of each module, n x r x d_in.
        b: B of each module, n x d_out x r.
        cb: C B of each module, n x d_out x r.
    """
    a64 = a.to(torch.float64)
    b64 = b.to(device=a.device, dtype=torch.float64)
    w64 = cb.to(device=a.device, dtype=torch.float64)
    g = a64 @ a64.transpose(1, 2)
    bt = b64.transpose(1, 2)
    # tr(X G) with G symmetric = Σ (X ∘ G)
    inner = ((bt @ w64) * g).sum(dim=(1, 2)).tolist()
    nb2 = ((bt @ b64) * g).sum(dim=(1, 2)).tolist()
    nw2 = ((w64.transpose(1, 2) @ w64) * g).sum(dim=(1, 2)).tolist()
    dists = torch.linalg.vector_norm(b64 - w64, dim=(1, 2)).tolist()
    out = []
    for ip, b2, w2, dist in zip(inner, nb2, nw2, dists, strict=True):
        nb, nw = math.sqrt(max(b2, 0.0)), math.sqrt(max(w2, 0.0))
        cos = ip / (nb * nw) if nb > 0 and nw > 0 else float("nan")
        out.append(ModuleScore(cos, round_cos(cos), nb, nw, dist))
    return out


def round_cos(cos: float) -> float:
    """The reference's ``round(cos, 5)`` (NaN stays NaN)."""
    return cos if math.isnan(cos) else round(cos, COS_DECIMALS)


def select_modules(
    cos_rounded: Mapping[str, float],
    *,
    threshold: float | None = None,
    num_proj_layers: int | None = None,
    strict: bool = False,
) -> set[str]:
    """The modules to project, by threshold or by number (SPEC §2, the reference's rule).

    Args:
        cos_rounded: Module name → rounded cosine.
        threshold: Project every module with rounded cos ≤ threshold.
        num_proj_layers: τ := the k-th smallest rounded cos, then the threshold rule (ties
            may project more than k), unless ``strict``.
        strict: With ``num_proj_layers``: exactly k modules, ties broken by module name.

    Returns:
        The set of selected module names. NaN cosines (a zero update) are never selected:
        projecting a zero update changes nothing.
    """
    if (threshold is None) == (num_proj_layers is None):
        raise ValueError("give exactly one of threshold or num_proj_layers")
    finite = {m: c for m, c in cos_rounded.items() if not math.isnan(c)}
    if threshold is not None:
        return {m for m, c in finite.items() if c <= threshold}
    k = int(num_proj_layers)  # type: ignore[arg-type]
    if k < 0:
        raise ValueError(f"num_proj_layers must be ≥ 0, got {k}")
    if k == 0 or not finite:
        return set()
    ordered = sorted(finite.items(), key=lambda kv: (kv[1], kv[0]))
    if strict:
        return {m for m, _ in ordered[:k]}
    tau = ordered[min(k, len(ordered)) - 1][1]
    return {m for m, c in finite.items() if c <= tau}


def pdst(dists: Sequence[float]) -> float:
    """Pdst = mean of 1/(1 + ‖B_out − C B_in‖_F) over modules (1.0 for a projected module)."""
    if not dists:
        return float("nan")
    return sum(1.0 / (1.0 + d) for d in dists) / len(dists)


def residual_cosine(delta: torch.Tensor, projected: torch.Tensor) -> float:
    """cos(ΔW, CΔW) for a full fine-tune residual (SPEC §3), in float64."""
    d = delta.to(torch.float64).flatten()
    p = projected.to(torch.float64).flatten()
    nd, np_ = float(d.norm()), float(p.norm())
    return float(d @ p) / (nd * np_) if nd > 0 and np_ > 0 else float("nan")


# ---------------------------------------------------------------------------------------------
# SaLoRA safety modules (SPEC §4)
# ---------------------------------------------------------------------------------------------


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
