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


def as_linear(w: torch.Tensor, layout: str) -> torch.Tensor:
    """A stored 2-D weight as nn.Linear's d_out x d_in (a view): GPT-2's ``Conv1D`` stores
    d_in x d_out (``layout="conv1d"``; PEFT's ``fan_in_fan_out``), so B acts on its columns."""
    if layout == "conv1d":
        return w.T
    if layout != "linear":
        raise ValueError(f"unknown weight layout {layout!r}")
    return w


def _difference(old: torch.Tensor, new: torch.Tensor, names: tuple[str, str]) -> torch.Tensor:
    """``new − old`` of two 2-D weights in float32, a new tensor (the inputs are kept)."""
    if old.shape != new.shape:
        raise ValueError(f"shape mismatch: {names[0]} {tuple(old.shape)} vs {names[1]} "
                         f"{tuple(new.shape)}")
    if old.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(old.shape)}")
    return new.to(torch.float32, copy=True).sub_(old)


def alignment_difference(w_base: torch.Tensor, w_aligned: torch.Tensor) -> torch.Tensor:
    """``V = W_aligned − W_base`` in float32, whatever the stored dtype (SPEC §1)."""
    return _difference(w_base, w_aligned, ("base", "aligned"))


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
    return scores_from_sums(gram_sums(lora_gram(a), b, cb))


def lora_gram(a: torch.Tensor) -> torch.Tensor:
    """G = A Aᵀ in float64 for a stack of A (n x r x d_in): all the scores need of A."""
    a64 = a.to(torch.float64)
    return a64 @ a64.transpose(1, 2)


def gram_sums(g: torch.Tensor, b: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """The sums behind the scores of n modules, on ``cb``'s device: an n x 4 float64 tensor of
    ``⟨BA, WA⟩``, ``‖BA‖²``, ``‖WA‖²`` and ``‖B − W‖_F`` (W = C B), from G = A Aᵀ.

    Args:
        g: G of each module, n x r x r (float64).
        b: B of each module, n x d_out x r (any float dtype).
        cb: C B of each module, n x d_out x r (the float32 product).
    """
    dev = cb.device
    g64 = g.to(device=dev, dtype=torch.float64)
    b64 = b.to(device=dev, dtype=torch.float64)
    w64 = cb.to(torch.float64)
    bt = b64.transpose(1, 2)
    # tr(X G) with G symmetric = Σ (X ∘ G)
    inner = ((bt @ w64) * g64).sum(dim=(1, 2))
    nb2 = ((bt @ b64) * g64).sum(dim=(1, 2))
    nw2 = ((w64.transpose(1, 2) @ w64) * g64).sum(dim=(1, 2))
    dist = torch.linalg.vector_norm(b64 - w64, dim=(1, 2))
    return torch.stack([inner, nb2, nw2, dist], dim=1)


def scores_from_sums(sums: torch.Tensor) -> list[ModuleScore]:
    """:class:`ModuleScore` of each row of :func:`gram_sums`."""
    out = []
    for ip, b2, w2, dist in sums.tolist():
        nb, nw = math.sqrt(max(b2, 0.0)), math.sqrt(max(w2, 0.0))
        cos = ip / (nb * nw) if nb > 0 and nw > 0 else float("nan")
        out.append(ModuleScore(cos, round_cos(cos), nb, nw, dist))
    return out


def project_stack(matrix: AlignmentMatrix, b: torch.Tensor, g: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """C B and the score sums of n modules sharing one alignment matrix (one module of n
    adapters), with a single matrix product for all of them.

    Args:
        matrix: The module's alignment matrix (on the compute device).
        b: B of each adapter, n x d_out x r, in the adapters' dtype (any device).
        g: G = A Aᵀ of each adapter, n x r x r, float64.

    Returns:
        ``(cb, sums)`` on the matrix's device: C B in B's dtype (as written; the cast is
        elementwise, so casting the stack equals casting each adapter's columns), and the
        n x 4 :func:`gram_sums` computed from the float32 product.
    """
    n, d_out, r = b.shape
    dev = matrix.tensor.device
    bd = b.to(dev, non_blocking=True)
    flat = bd.to(torch.float32).permute(1, 0, 2).reshape(d_out, n * r)
    cb = apply_fixed_width(matrix, flat).reshape(d_out, n, r).permute(1, 0, 2)
    return cb.to(b.dtype), gram_sums(g, bd, cb)


#: Narrowest product on the CPU: MKL computes products of fewer columns with another kernel
#: (other float32 bits), so narrower ones are zero-padded to this width.
MIN_CPU_COLUMNS = 16
#: Width of every product on a GPU: cuBLAS picks its kernel (and split of the sums) by shape,
#: so products are cut into chunks of exactly this many columns, the last one zero-padded.
GPU_COLUMNS = 256


def apply_fixed_width(matrix: AlignmentMatrix, b: torch.Tensor) -> torch.Tensor:
    """``matrix.apply(b)`` (C B for d_out x N columns) with every column's float32 bits
    independent of N and of the column's position: a column computes the same whether its
    adapter is sanitized alone, in a batch, or coalesced with other workers' batches (so
    reruns, in-process and distributed runs write the same bytes).

    Within one matrix-product kernel and shape, a column's sums run in the same order
    wherever it sits; only the kernel, chosen by shape, changes them. So the products are
    given fixed shapes: at least :data:`MIN_CPU_COLUMNS` wide on the CPU, chunks of exactly
    :data:`GPU_COLUMNS` on a GPU.
    """
    n = int(b.shape[1])
    width = GPU_COLUMNS if b.device.type == "cuda" else max(MIN_CPU_COLUMNS, n)
    if n == width:
        return matrix.apply(b)
    if n < width:
        pad = torch.zeros(b.shape[0], width - n, dtype=b.dtype, device=b.device)
        return matrix.apply(torch.cat([b, pad], dim=1))[:, :n]
    return torch.cat([apply_fixed_width(matrix, b[:, i:i + width])
                      for i in range(0, n, width)], dim=1)


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


# ---------------------------------------------------------------------------------------------
# Full fine-tunes (SPEC §3)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResidualScore:
    """Figures of one target module of a full fine-tune (SPEC §3).

    Attributes:
        cos: cos(ΔW, CΔW) = ⟨ΔW, CΔW⟩_F / (‖ΔW‖_F ‖CΔW‖_F), unrounded (NaN if a norm is 0).
        cos_rounded: ``round(cos, 5)`` as the selection compares it.
        norm_delta: ‖ΔW‖_F.
        norm_projected: ‖CΔW‖_F.
    """

    cos: float
    cos_rounded: float
    norm_delta: float
    norm_projected: float


def residual_delta(w_aligned: torch.Tensor, w_ft: torch.Tensor) -> torch.Tensor:
    """``ΔW = W_ft − W_aligned`` in float32 (SPEC §3), a new tensor (the inputs are kept)."""
    return _difference(w_aligned, w_ft, ("aligned", "fine-tuned"))


def residual_score(delta: torch.Tensor, projected: torch.Tensor,
                   chunk_rows: int = 1024) -> ResidualScore:
    """cos(ΔW, CΔW) and both norms, accumulated in float64 over blocks of rows (a float64 copy
    of a whole 8192 x 8192 residual would be 512 MiB)."""
    if delta.shape != projected.shape:
        raise ValueError(f"ΔW is {tuple(delta.shape)} but CΔW is {tuple(projected.shape)}")
    dot = nd2 = np2 = 0.0
    for i in range(0, int(delta.shape[0]), chunk_rows):
        d = delta[i:i + chunk_rows].to(torch.float64)
        p = projected[i:i + chunk_rows].to(torch.float64)
        dot += float((d * p).sum())
        nd2 += float((d * d).sum())
        np2 += float((p * p).sum())
    nd, np_ = math.sqrt(nd2), math.sqrt(np2)
    cos = dot / (nd * np_) if nd > 0 and np_ > 0 else float("nan")
    return ResidualScore(cos, round_cos(cos), nd, np_)


def residual_cosine(delta: torch.Tensor, projected: torch.Tensor) -> float:
    """cos(ΔW, CΔW) for a full fine-tune residual (SPEC §3), in float64."""
    return residual_score(delta, projected).cos


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
