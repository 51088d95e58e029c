"""Sanitizing figures (SPEC §2, §3): per-module scores from r x r Gram sums, the projection of
a stack of B through one alignment matrix, the reference's module selection, Pdst, and the
scores of a full fine-tune's residual. Pure tensor math, no I/O, no Ray.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from safelora_ray.core.alignment import AlignmentMatrix, weight_difference

logger = logging.getLogger(__name__)

#: Decimals the reference rounds cosines to before comparing them with the threshold.
COS_DECIMALS = 5


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


#: Bytes of float64 A converted at a time on a CPU: a 7B adapter's 64 A whole are 16 MB, and
#: converting and multiplying them in cache-sized pieces takes half the time (same bits).
_GRAM_PIECE_BYTES = 1 << 20


def lora_gram(a: torch.Tensor) -> torch.Tensor:
    """G = A Aᵀ in float64 for a stack of A (n x r x d_in): all the scores need of A."""
    n, r, d_in = a.shape
    step = max(1, _GRAM_PIECE_BYTES // max(1, 8 * r * d_in))
    if a.device.type != "cpu" or n <= step:
        a64 = a.to(torch.float64)
        return a64 @ a64.transpose(1, 2)
    out = torch.empty((n, r, r), dtype=torch.float64)
    for i in range(0, n, step):
        a64 = a[i:i + step].to(torch.float64)
        torch.bmm(a64, a64.transpose(1, 2), out=out[i:i + step])
    return out


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
    below: bool = False,
) -> set[str]:
    """The modules to project, by threshold or by number (SPEC §2, the reference's rule).

    Args:
        cos_rounded: Module name → rounded cosine.
        threshold: Project every module with rounded cos ≤ threshold.
        num_proj_layers: τ := the k-th smallest rounded cos, then the threshold rule (ties
            may project more than k), unless ``strict``.
        strict: With ``num_proj_layers``: exactly k modules, ties broken by module name.
        below: With ``threshold``: rounded cos < threshold, strictly (SafeMERGE's official
            code, SPEC §5); the number mode is unchanged (≤ the k-th smallest).

    Returns:
        The set of selected module names. NaN cosines (a zero update) are never selected:
        projecting a zero update changes nothing.
    """
    if (threshold is None) == (num_proj_layers is None):
        raise ValueError("give exactly one of threshold or num_proj_layers")
    finite = {m: c for m, c in cos_rounded.items() if not math.isnan(c)}
    if threshold is not None:
        if below:
            return {m for m, c in finite.items() if c < threshold}
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
    return weight_difference(w_aligned, w_ft, ("aligned", "fine-tuned"))


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
