"""SaLoRA's math (SPEC §4) in core.safety_basis against the dense float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

from safelora_ray.core.alignment import AlignmentMatrix
from safelora_ray.core.safety_basis import (
    accumulate_second_moment,
    canonical_signs,
    safety_basis,
    second_moment,
)
from safelora_ray.core.scores import module_score
from tests.reference import dense_cos, dense_cs, dense_safety_basis, projector


def _wx(d_out: int, d_in: int, n: int, seed: int = 0, decay: bool = True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) * 0.1
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    if decay:  # distinct singular values, so the top-r subspace is well defined
        x = x * torch.linspace(2.0, 0.1, d_in, dtype=torch.float64)
    return w, x


def test_second_moment_is_the_sum_of_outer_products():
    _, x = _wx(4, 12, 30)
    x32 = x.to(torch.float32)
    naive = sum(torch.outer(r, r) for r in x32.to(torch.float64))
    torch.testing.assert_close(second_moment(x32), naive, rtol=1e-12, atol=1e-12)
    assert second_moment(x32).dtype == torch.float64
    # batched (…, d_in) inputs are flattened over the leading axes
    torch.testing.assert_close(second_moment(x32.reshape(5, 6, 12)), naive,
                               rtol=1e-12, atol=1e-12)


def test_second_moment_adds_across_splits():
    _, x = _wx(4, 16, 41, seed=3)
    x = x.to(torch.bfloat16)  # bf16 x bf16 products are exact in float64
    whole = second_moment(x)
    acc = torch.zeros(16, 16, dtype=torch.float64)
    for part in (x[:7], x[7:30], x[30:]):
        accumulate_second_moment(acc, part)
    torch.testing.assert_close(acc, whole, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("shape", [(16, 16), (8, 32), (40, 12), (6, 6)])
@pytest.mark.parametrize("rank", [1, 3, 6])
def test_safety_basis_is_the_top_left_singular_subspace_of_wx(shape, rank):
    d_out, d_in = shape
    w, x = _wx(d_out, d_in, 50, seed=d_out + rank)
    sb = safety_basis(w, second_moment(x), rank)
    ref_u, ref_s2 = dense_safety_basis(w, x, rank)
    assert sb.basis.shape == (d_out, rank) and sb.basis.dtype == torch.float64
    torch.testing.assert_close(projector(sb.basis), projector(ref_u), rtol=0, atol=1e-9)
    torch.testing.assert_close(sb.eigenvalues, ref_s2[:rank], rtol=1e-9, atol=1e-9)
    assert sb.trace == pytest.approx(float(ref_s2.sum()), rel=1e-12)
    assert sb.energy == pytest.approx(float(ref_s2[:rank].sum() / ref_s2.sum()), rel=1e-9)
    # orthonormal columns, descending eigenvalues
    torch.testing.assert_close(sb.basis.T @ sb.basis, torch.eye(rank, dtype=torch.float64),
                               rtol=0, atol=1e-12)
    assert bool((sb.eigenvalues[:-1] >= sb.eigenvalues[1:]).all())
    assert sb.degenerate == 0


def test_signs_are_canonical_and_reruns_identical():
    w, x = _wx(12, 10, 30, seed=5)
    sigma = second_moment(x)
    a = safety_basis(w, sigma, 4)
    b = safety_basis(w, sigma.clone(), 4)
    assert torch.equal(a.basis, b.basis)
    idx = a.basis.abs().argmax(dim=0)
    assert bool((a.basis[idx, torch.arange(4)] > 0).all())
    flipped = canonical_signs(-a.basis)
    assert torch.equal(flipped, a.basis)


def test_full_energy_and_degenerate_directions():
    w, x = _wx(8, 8, 3, seed=2)  # 3 tokens: W Xᵀ has rank 3
    sb = safety_basis(w, second_moment(x), 5)
    assert sb.degenerate == 2
    assert sb.energy == pytest.approx(1.0, abs=1e-12)
    assert safety_basis(w, second_moment(x), 3).degenerate == 0


def test_safety_basis_errors():
    w, x = _wx(6, 4, 10)
    s = second_moment(x)
    with pytest.raises(ValueError, match=r"outside 1\.\.6"):
        safety_basis(w, s, 7)
    with pytest.raises(ValueError, match="outside"):
        safety_basis(w, s, 0)
    with pytest.raises(ValueError, match="Σ has shape"):
        safety_basis(w, torch.zeros(5, 5, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match="zero on the calibration"):
        safety_basis(w, torch.zeros(4, 4, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match="NaN"):
        safety_basis(w, torch.full((4, 4), float("nan"), dtype=torch.float64), 2)
    with pytest.raises(ValueError, match="2-D"):
        safety_basis(w[0], s, 1)


def test_complement_form_applies_i_minus_vvt():
    w, x = _wx(10, 7, 25, seed=1)
    sb = safety_basis(w, second_moment(x), 3)
    am = AlignmentMatrix("N", sb.basis.to(torch.float32), math.sqrt(sb.trace))
    ref = dense_cs(sb.basis)
    torch.testing.assert_close(am.dense().to(torch.float64), ref, rtol=0, atol=1e-6)
    b = torch.randn(10, 4, dtype=torch.float64)
    torch.testing.assert_close(am.apply(b).to(torch.float64), ref @ b, rtol=1e-5, atol=1e-6)
    # C_s B is orthogonal to the safety directions, and C_s is idempotent
    assert float((sb.basis.T @ am.apply(b).to(torch.float64)).abs().max()) < 1e-5
    torch.testing.assert_close(am.apply(am.apply(b)), am.apply(b), rtol=1e-5, atol=1e-6)


def test_unknown_form_is_an_error_not_a_projection():
    am = AlignmentMatrix("X", torch.eye(3), 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown alignment matrix form"):
        am.apply(torch.ones(3, 1))
    with pytest.raises(ValueError, match="unknown alignment matrix form"):
        am.dense()


@pytest.mark.parametrize("seed", range(4))
def test_fold_scores_match_dense(seed):
    g = torch.Generator().manual_seed(seed)
    w, x = _wx(12, 9, 40, seed=seed)
    sb = safety_basis(w, second_moment(x), 4)
    am = AlignmentMatrix("N", sb.basis.to(torch.float32), math.sqrt(sb.trace))
    a = torch.randn(3, 9, generator=g)
    b = torch.randn(12, 3, generator=g)
    if seed % 2:  # lean B into the safety directions: a low cosine
        b = b + sb.basis.to(torch.float32) @ torch.randn(4, 3, generator=g) * 3
    sc = module_score(a, b, am.apply(b))
    assert sc.cos == pytest.approx(dense_cos(dense_cs(sb.basis), a, b), abs=1e-6)
    assert 0.0 <= sc.cos <= 1.0 + 1e-7  # C_s is an orthogonal projection
