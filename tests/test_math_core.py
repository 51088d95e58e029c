"""The pure math core against the dense float64 reference (tests/reference.py)."""

from __future__ import annotations

import math

import pytest
import torch

from safelora_ray.core.alignment import choose_form, compute_alignment, gram
from safelora_ray.core.scores import (
    module_score,
    module_scores,
    pdst,
    residual_cosine,
    round_cos,
    select_modules,
)
from tests.reference import dense_c, dense_cos, sanitize_dense

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _pair(d_out: int, d_in: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    wb = (torch.randn(d_out, d_in, generator=g) * 0.1).to(dtype)
    wa = (wb.to(torch.float32) + torch.randn(d_out, d_in, generator=g) * 0.01).to(dtype)
    return wb, wa


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(16, 16), (8, 32), (40, 12), (1, 5), (5, 1)])
def test_alignment_matches_dense_reference(dtype, shape):
    wb, wa = _pair(*shape, dtype)
    am = compute_alignment(wb, wa)
    assert am.form == choose_form(*shape)
    assert am.tensor.dtype == torch.float32
    ref = dense_c(wb, wa)
    torch.testing.assert_close(am.dense().to(torch.float64), ref, rtol=1e-5, atol=1e-7)
    v = wa.to(torch.float64) - wb.to(torch.float64)
    assert am.norm == pytest.approx(float(v.norm()), rel=1e-6)  # V is float32 (SPEC)
    # Applying the stored form equals applying the dense C.
    b = torch.randn(shape[0], 3, dtype=torch.float64)
    torch.testing.assert_close(am.apply(b).to(torch.float64), ref @ b, rtol=1e-5, atol=1e-6)


def test_stored_form_is_the_smaller_one():
    assert choose_form(1024, 4096) == "C"  # GQA v_proj: C is 1024 x 1024
    assert choose_form(4096, 4096) == "C"
    assert choose_form(11008, 4096) == "V"  # up_proj: V is smaller than C
    wb, wa = _pair(24, 8, torch.float32)
    am = compute_alignment(wb, wa)
    assert am.form == "V" and tuple(am.tensor.shape) == (24, 8)


def test_forms_agree():
    wb, wa = _pair(12, 20, torch.float32)
    c = compute_alignment(wb, wa, form="C")
    v = compute_alignment(wb, wa, form="V")
    b = torch.randn(12, 4)
    torch.testing.assert_close(c.apply(b), v.apply(b), rtol=1e-5, atol=1e-6)


def test_zero_difference_is_an_error():
    w = torch.randn(4, 4)
    with pytest.raises(ValueError, match="identical weights"):
        compute_alignment(w, w.clone())


def test_nan_difference_is_an_error():
    w = torch.randn(4, 4)
    w2 = w.clone()
    w2[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        compute_alignment(w, w2)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape mismatch"):
        compute_alignment(torch.randn(4, 4), torch.randn(4, 5))
    with pytest.raises(ValueError, match="2-D"):
        compute_alignment(torch.randn(4), torch.randn(4))


def test_truncated_basis_is_a_projection():
    wb, wa = _pair(16, 10, torch.float64)
    am = compute_alignment(wb, wa, form="U", rank=3)
    u = am.tensor.to(torch.float64)
    p = u @ u.T
    torch.testing.assert_close(p @ p, p, atol=1e-6, rtol=1e-6)
    assert tuple(u.shape) == (16, 3)
    full = compute_alignment(wb, wa, form="U", energy=1.0)
    assert full.tensor.shape[1] == 10
    half = compute_alignment(wb, wa, form="U", energy=0.5)
    s = torch.linalg.svdvals(wa.to(torch.float64) - wb.to(torch.float64))
    cum = torch.cumsum(s**2, 0) / (s**2).sum()
    k = half.tensor.shape[1]
    assert cum[k - 1] >= 0.5 and (k == 1 or cum[k - 2] < 0.5)
    with pytest.raises(ValueError):
        compute_alignment(wb, wa, form="U")


@pytest.mark.parametrize("shape", [(64, 200), (200, 64), (96, 96)])
@pytest.mark.parametrize("mode", [{"rank": 7}, {"energy": 0.9}, {"energy": 1.0}])
def test_truncated_basis_matches_dense_svd(shape, mode):
    """Both paths (eigh of V Vᵀ for a wide or square V, SVD for a tall one) against a float64
    SVD: the same k, the same projection U_k U_kᵀ, the kept energy."""
    from tests.reference import dense_exact

    g = torch.Generator().manual_seed(sum(shape))
    d_out, d_in = shape
    wb = torch.randn(d_out, d_in, generator=g)
    spectrum = torch.logspace(0, -3, min(shape))  # distinct singular values
    q1, _ = torch.linalg.qr(torch.randn(d_out, min(shape), generator=g))
    q2, _ = torch.linalg.qr(torch.randn(d_in, min(shape), generator=g))
    wa = wb + (q1 * spectrum) @ q2.T
    am = compute_alignment(wb, wa, form="U", **mode)
    ref, k = dense_exact(wb, wa, **mode)
    assert am.tensor.shape == (d_out, k)
    torch.testing.assert_close(am.dense().double(), ref, rtol=0, atol=1e-5)
    s2 = torch.linalg.svdvals(wa.double() - wb.double()) ** 2
    assert am.energy == pytest.approx(float(s2[:k].sum() / s2.sum()), rel=1e-6)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("shape,r", [((32, 32), 4), ((8, 32), 2), ((48, 16), 8)])
def test_module_score_matches_dense(seed, shape, r):
    d_out, d_in = shape
    wb, wa = _pair(d_out, d_in, torch.float32, seed)
    am = compute_alignment(wb, wa)
    g = torch.Generator().manual_seed(100 + seed)
    a = torch.randn(r, d_in, generator=g)
    b = torch.randn(d_out, r, generator=g)
    s = module_score(a, b, am.apply(b))
    c = dense_c(wb, wa)
    assert s.cos == pytest.approx(dense_cos(c, a, b), abs=1e-6)
    assert s.cos_rounded == round(s.cos, 5)
    assert s.norm_delta == pytest.approx(float((b.double() @ a.double()).norm()), rel=1e-6)
    assert s.norm_projected == pytest.approx(
        float((c @ b.double() @ a.double()).norm()), rel=1e-5)
    assert s.dist == pytest.approx(float((b.double() - c @ b.double()).norm()), rel=1e-5)


def test_batched_scores_match_dense_per_module():
    """module_scores over a batch (mixed half dtypes, one zero update) = the dense float64
    figures of each module on its own."""
    wb, wa = _pair(24, 40, torch.float32, 7)
    am = compute_alignment(wb, wa)
    c = dense_c(wb, wa)
    g = torch.Generator().manual_seed(7)
    n, r = 6, 3
    a = torch.randn(n, r, 40, generator=g)
    b = torch.randn(n, 24, r, generator=g)
    a[2] = 0  # a zero update: NaN cosine, like the single-module path
    dtypes = [torch.bfloat16, torch.float16, torch.float32] * 2
    a_in = torch.stack([a[i].to(dtypes[i]) for i in range(n)])  # stack promotes: float32
    b_in = [b[i].to(dtypes[i]) for i in range(n)]
    cb = torch.stack([am.apply(bi) for bi in b_in])
    got = module_scores(a_in, torch.stack(b_in), cb)
    for i in range(n):
        ai, bi = a_in[i].double(), b_in[i].double()
        one = module_score(a_in[i], b_in[i], cb[i])
        if i == 2:
            assert math.isnan(got[i].cos) and math.isnan(one.cos)
            continue
        assert got[i].cos == pytest.approx(dense_cos(c, ai, bi), abs=1e-6)
        assert got[i].cos_rounded == round(got[i].cos, 5)
        assert got[i].cos == pytest.approx(one.cos, abs=1e-12)
        assert got[i].norm_delta == pytest.approx(float((bi @ ai).norm()), rel=1e-9)
        assert got[i].norm_projected == pytest.approx(float((c @ bi @ ai).norm()), rel=1e-5)
        assert got[i].dist == pytest.approx(float((bi - c @ bi).norm()), rel=1e-5)


def test_zero_update_scores_nan_and_is_never_selected():
    a = torch.zeros(2, 8)
    b = torch.randn(8, 2)
    s = module_score(a, b, b)
    assert math.isnan(s.cos)
    assert select_modules({"m": s.cos_rounded}, threshold=1.0) == set()


def test_select_threshold_uses_rounded_le():
    cos = {"a": 0.35, "b": 0.350004, "c": 0.1, "d": 0.9}
    rounded = {k: round_cos(v) for k, v in cos.items()}
    assert select_modules(rounded, threshold=0.35) == {"a", "b", "c"}  # 0.350004 → 0.35


def test_select_number_ties_project_more_than_k():
    cos = {"a": 0.2, "b": 0.2, "c": 0.3, "d": 0.1}
    assert select_modules(cos, num_proj_layers=2) == {"a", "b", "d"}
    assert select_modules(cos, num_proj_layers=2, strict=True) == {"a", "d"}
    assert select_modules(cos, num_proj_layers=10) == set(cos)
    assert select_modules(cos, num_proj_layers=0) == set()
    with pytest.raises(ValueError):
        select_modules(cos)
    with pytest.raises(ValueError):
        select_modules(cos, threshold=0.1, num_proj_layers=1)


@pytest.mark.parametrize("mode", [{"threshold": 0.35}, {"threshold": 0.9}, {"num_proj_layers": 3}])
def test_end_to_end_adapter_against_reference(mode):
    torch.manual_seed(0)
    modules = {f"m{i}": (24, 16) for i in range(8)}
    cs, ams, lora = {}, {}, {}
    for i, (m, (d_out, d_in)) in enumerate(modules.items()):
        wb, wa = _pair(d_out, d_in, torch.float32, seed=i)
        ams[m] = compute_alignment(wb, wa)
        cs[m] = dense_c(wb, wa)
        a = torch.randn(4, d_in)
        # Mix of aligned-ish and random updates so cosines spread over [0, 1].
        b = torch.randn(d_out, 4) if i % 2 else cs[m].float() @ torch.randn(d_out, 4)
        lora[m] = (a, b)
    new_b, cos, selected, pdst_ref = sanitize_dense(cs, lora, **mode)
    scores = {m: module_score(a, b, ams[m].apply(b)) for m, (a, b) in lora.items()}
    ours = select_modules({m: s.cos_rounded for m, s in scores.items()}, **mode)
    assert ours == selected
    assert {m: s.cos_rounded for m, s in scores.items()} == cos
    dists = [0.0 if m in ours else scores[m].dist for m in lora]
    assert pdst(dists) == pytest.approx(pdst_ref, rel=1e-6)
    for m in ours:
        torch.testing.assert_close(ams[m].apply(lora[m][1]).double(), new_b[m], rtol=1e-5,
                                   atol=1e-6)


def test_residual_cosine():
    d = torch.randn(6, 5)
    assert residual_cosine(d, d) == pytest.approx(1.0)
    assert residual_cosine(d, -d) == pytest.approx(-1.0)


@pytest.mark.parametrize("n", [2048, 2101])
def test_blocked_gram_equals_dense_and_is_symmetric(n):
    v = torch.randn(n, 48, generator=torch.Generator().manual_seed(n))
    g = gram(v)
    assert torch.equal(g, g.T)
    torch.testing.assert_close(g.double(), v.double() @ v.double().T, rtol=1e-5, atol=1e-4)
    wb = torch.zeros(n, 48)
    am = compute_alignment(wb, v)  # the large path inside compute_alignment
    torch.testing.assert_close(am.dense().double(), dense_c(wb, v), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_lora_gram_in_pieces_equals_whole_and_naive(dtype: torch.dtype) -> None:
    """G = A Aᵀ computed a cache-sized piece at a time (a 7B adapter's 64 A of 8 x 4096 go
    in pieces) has the bits of the whole batched product, and the naive float64 value."""
    from safelora_ray.core.scores import lora_gram

    g = torch.Generator().manual_seed(3)
    a = torch.randn(37, 8, 4096, generator=g).to(dtype)  # several pieces, a short last one
    got = lora_gram(a)
    a64 = a.to(torch.float64)
    assert got.dtype == torch.float64 and torch.equal(got, a64 @ a64.transpose(1, 2))
    for i in (0, 17, 36):
        naive = [[sum(float(x) * float(y) for x, y in zip(a64[i, p].tolist(), a64[i, q].tolist(),
                                                            strict=True))
                  for q in range(8)] for p in range(2)]
        assert torch.allclose(got[i, :2], torch.tensor(naive, dtype=torch.float64),
                              rtol=1e-12, atol=1e-12)
