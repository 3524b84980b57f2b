"""The Gram-matrix QR behind flexlora.factored_svd, against an independent fp64 dense SVD.

Documented accuracy of the fp32 path (flexlora_cli/qr.py): every rank-k truncation at a rank where
the spectrum has a gap (1 - s_{k+1}/s_k >= 0.1) within 1e-5 relative Frobenius of the fp64
truncation of the same fp32 factors, the whole update within 1e-5, singular values within
1e-6 s_max, and U, Vh orthonormal to 1e-5 (largest entry of U^T U - I), as Householder QR was.
"""

from __future__ import annotations

import math

import pytest
import torch

from flexlora_cli import flexlora, qr

F64 = torch.float64
TOLERANCE = 1e-5  # truncations, the whole update, orthonormality (fp32)
GAP = 0.1  # ranks whose truncation is checked: 1 - s_{k+1} / s_k >= GAP


def stack(d_out, d_in, ranks, *, seed=0, B_noise=0.05, A_noise=0.05, coeffs=None, B_scale=None):
    """Clients holding their rank-r_i part of one shared update U diag(1/j) V^T, each perturbed.

    Like trained LoRA updates: a decaying spectrum with gaps at the clients' ranks. `A_noise` is
    each client's deviation from the shared A (0: every client has the same A rows, as at the
    start of a round); `B_scale` moves a factor of B_i into A_i (B_i * t, A_i / t).
    """
    generator = torch.Generator().manual_seed(seed)
    top = max(ranks)
    U = torch.linalg.qr(torch.randn(d_out, top, generator=generator, dtype=F64))[0]
    V = torch.linalg.qr(torch.randn(d_in, top, generator=generator, dtype=F64))[0]
    sigma = 1.0 / torch.arange(1, top + 1, dtype=F64)
    coeffs = coeffs or [0.5 + float(torch.rand((), generator=generator)) for _ in ranks]
    terms = []
    for i, r in enumerate(ranks):
        B = (U[:, :r] + B_noise * torch.randn(d_out, r, generator=generator, dtype=F64) / math.sqrt(d_out)) * sigma[:r]
        A = V[:, :r].mT + A_noise * torch.randn(r, d_in, generator=generator, dtype=F64) / math.sqrt(d_in)
        t = B_scale[i] if B_scale else 1.0
        terms.append(flexlora.LoraTerm((B * t).float(), (A / t).float(), coeffs[i]))
    return terms


def random_terms(d_out, d_in, ranks, seed=0):
    """Independent Gaussian clients: a well-conditioned stack (no shared directions)."""
    generator = torch.Generator().manual_seed(seed)
    return [
        flexlora.LoraTerm(torch.randn(d_out, r, generator=generator), torch.randn(r, d_in, generator=generator), 1.0 + i)
        for i, r in enumerate(ranks)
    ]


def reference_svd(B, A):
    """The yardstick: torch.linalg.svd of the explicit fp64 product of the same fp32 factors."""
    return torch.linalg.svd(B.double() @ A.double(), full_matrices=False)


def dense(svd, rank=None):
    k = svd.S.numel() if rank is None else min(rank, svd.S.numel())
    return (svd.U[:, :k].double() * svd.S[:k].double()) @ svd.Vh[:k].double()


def relative(actual, expected):
    return float(torch.linalg.norm(actual - expected) / max(float(torch.linalg.norm(expected)), 1e-300))


def orthonormality_error(Q):
    Q = Q.double()
    return float((Q.mT @ Q - torch.eye(Q.shape[1], dtype=F64)).abs().max()) if Q.shape[1] else 0.0


def gapped_ranks(S, candidates):
    return [r for r in sorted(set(candidates)) if r < S.numel() and S[r] <= (1 - GAP) * S[r - 1]]


def check_against_reference(terms, check_ranks=None):
    """Every documented accuracy claim for one stack; returns the result and the reference."""
    B, A = flexlora.stack_terms(terms)
    svd = flexlora.factored_svd(B, A)
    U_ref, S_ref, Vh_ref = reference_svd(B, A)
    M = B.double() @ A.double()
    k = svd.S.numel()
    assert svd.U.shape == (B.shape[0], k) and svd.Vh.shape == (k, A.shape[1]) and svd.S.dtype == torch.float32
    assert torch.all(svd.S[:-1] >= svd.S[1:]), "singular values must be descending"
    assert float((svd.S.double() - S_ref[:k]).abs().max()) <= 1e-6 * float(S_ref[0])
    assert float(S_ref[k:].sum()) <= 1e-6 * float(S_ref[0]), "a component above rounding was dropped"
    assert orthonormality_error(svd.U) <= TOLERANCE and orthonormality_error(svd.Vh.mT) <= TOLERANCE
    assert relative(dense(svd), M) <= TOLERANCE
    ranks = gapped_ranks(S_ref, check_ranks or [term.B.shape[1] for term in terms])
    assert ranks, "the stack must have gaps at some client ranks, or nothing is checked"
    for r in ranks:
        expected = (U_ref[:, :r] * S_ref[:r]) @ Vh_ref[:r]
        assert relative(dense(svd, r), expected) <= TOLERANCE, r
        assert relative(flexlora.truncate(svd, r).dense().double(), expected) <= TOLERANCE, r
    assert flexlora.canonical_signs(svd).U.equal(svd.U), "signs must be canonical"
    return svd, (U_ref, S_ref, Vh_ref)


RANKS = [4, 4, 4, 8, 16, 32]


@pytest.mark.parametrize("shape", [(384, 256), (256, 384)])
def test_random_stacks(shape):
    """(a) Independent clients, and clients sharing a decaying spectrum (5 % noise, as bench_round.py)."""
    for terms in (random_terms(*shape, RANKS), stack(*shape, RANKS)):
        svd, _ = check_against_reference(terms, check_ranks=range(1, sum(RANKS)))
        assert svd.S.numel() == sum(RANKS)
        B, A = flexlora.stack_terms(terms)
        basis = qr.gram_qr(B)
        assert basis.passes == 1 and not basis.eigen  # the fast path: one Cholesky pass


@pytest.mark.parametrize("shape", [(384, 256), (256, 384)])
def test_clients_sharing_A_up_to_tenth_of_a_percent(shape):
    """(b) Round 2 and later: every client starts from the same A; 0.1 % apart after training."""
    terms = stack(*shape, RANKS, A_noise=1e-3)
    svd, (_, S_ref, _) = check_against_reference(terms)
    assert svd.S.numel() == sum(RANKS)
    assert float(S_ref[max(RANKS)]) < 1e-2 * float(S_ref[0])  # near rank-deficient: the shared part dominates
    B, A = flexlora.stack_terms(terms)
    basis = qr.gram_qr(A.mT)
    assert basis.condition > 1e5 and basis.passes == 1 and not basis.eigen


def test_clients_sharing_A_up_to_rounding():
    """(b) 1e-5 apart: beyond one Cholesky pass; the eigendecomposition and a second pass keep it exact."""
    terms = stack(384, 256, RANKS, A_noise=1e-5)
    svd, _ = check_against_reference(terms)
    assert svd.S.numel() == sum(RANKS)
    B, A = flexlora.stack_terms(terms)
    basis = qr.gram_qr(A.mT)
    assert basis.condition > qr.ONE_PASS_CONDITION and basis.passes == 2 and basis.eigen


@pytest.mark.parametrize("shape", [(384, 256), (256, 384)])
def test_clients_sharing_A_exactly(shape):
    """(b) Identical A rows: the stack is exactly rank-deficient (rank max(r_i) on A's side)."""
    terms = stack(*shape, RANKS, A_noise=0.0)
    svd, (_, S_ref, Vh_ref) = check_against_reference(terms)
    assert svd.S.numel() == max(RANKS)  # the dependent directions are dropped, the rest kept
    B, A = flexlora.stack_terms(terms)
    assert qr.gram_qr(A.mT).eigen and qr.gram_qr(A.mT).rank == max(RANKS)
    # Past the available components, truncation pads: zero singular values, Vh completed orthonormally.
    padded = flexlora.truncate(svd, sum(RANKS))
    assert orthonormality_error(padded.Vh.mT) <= TOLERANCE
    assert relative(padded.dense().double(), B.double() @ A.double()) <= TOLERANCE


def test_wildly_different_client_scales():
    """(c) Weights x scalings from 1e-6 to 1e3, and clients whose B is 1e-8 of their A (just initialized)."""
    ranks = [4, 8, 4, 16, 8, 32]
    coeffs = [1e-6, 1e3, 3e-2, 1.0, 1e2, 5e-4]
    terms = stack(384, 256, ranks, coeffs=coeffs, B_scale=[1e-8, 1.0, 1e4, 1e-3, 1.0, 1e8])
    check_against_reference(terms, check_ranks=range(1, sum(ranks)))
    # A client that carries the update through a tiny B and a huge A must still count in full.
    heavy = stack(384, 256, [8, 8], coeffs=[1.0, 1.0], B_scale=[1e-8, 1.0], seed=3)
    check_against_reference(heavy, check_ranks=range(1, 16))


@pytest.mark.parametrize("shape, ranks", [((96, 64), [32, 48]), ((64, 96), [32, 48]), ((200, 60), [8, 16, 40]), ((120, 96), [16, 24])])
def test_stacks_wider_than_the_module(shape, ranks):
    """(d) R > min(d_out, d_in), or more than GRAM_MAX_WIDTH of it: Householder QR, every component."""
    for terms in (random_terms(*shape, ranks), stack(*shape, ranks)):
        svd, _ = check_against_reference(terms, check_ranks=range(1, min(shape)))
        assert svd.S.numel() == min(*shape, sum(ranks))


def test_zero_factors():
    """(e) Clients with all-zero B (LoRA's initialization) or A, and an all-zero round."""
    terms = stack(384, 256, RANKS)
    zeroed = [
        flexlora.LoraTerm(torch.zeros_like(terms[1].B), terms[1].A, terms[1].coeff),
        flexlora.LoraTerm(terms[2].B, torch.zeros_like(terms[2].A), terms[2].coeff),
        *terms[3:],
        flexlora.LoraTerm(terms[0].B, terms[0].A, 0.0),
    ]
    svd, _ = check_against_reference(zeroed, check_ranks=[4, 8, 16, 32])
    # Zero columns span nothing: 8 of B's and 4 of A's drop out; the update has rank 68 - 12.
    assert svd.S.numel() == sum(RANKS) - 8 and float(svd.S[sum(RANKS) - 12 :].max()) <= 1e-6 * float(svd.S[0])
    nothing = [flexlora.LoraTerm(torch.zeros(384, r), torch.zeros(r, 256), 1.0) for r in RANKS]
    svd = flexlora.merge(nothing)
    assert svd.S.numel() == 0 and flexlora.numerical_rank(svd) == 0
    B, A = flexlora.to_lora(flexlora.truncate(svd, 8), 2.0)
    assert B.shape == (384, 8) and not B.any() and orthonormality_error(A.mT) <= TOLERANCE


def test_narrow_fp32_stacks_take_the_gram_route_and_the_rest_householder(monkeypatch):
    """The speed of the round depends on this routing: narrow fp32 stacks never reach Householder QR."""
    narrow = flexlora.stack_terms(stack(384, 256, RANKS))
    wide = flexlora.stack_terms(stack(120, 96, [16, 24]))

    def refuse(*args):
        raise AssertionError("took the wrong route")

    with monkeypatch.context() as patch:
        patch.setattr(flexlora, "_householder_svd", refuse)
        flexlora.factored_svd(*narrow)
    with monkeypatch.context() as patch:
        patch.setattr(qr, "gram_qr", refuse)
        flexlora.factored_svd(*wide)
        flexlora.factored_svd(*(factor.double() for factor in narrow))


def test_gram_qr_is_a_qr_of_the_factor():
    """F = (F X) T with F X orthonormal, in fp64 arithmetic, on every branch (one pass, eigen, two passes)."""
    cases = {  # A_cat^T, where the sharing happens: (terms, eigendecomposition needed, Cholesky passes)
        "one pass": (stack(384, 256, RANKS, A_noise=1e-3), False, 1),
        "rank-deficient": (stack(384, 256, RANKS, A_noise=0.0), True, 1),
        "two passes": (stack(384, 256, RANKS, A_noise=1e-5), True, 2),
    }
    for name, (terms, eigen, passes) in cases.items():
        F = flexlora.stack_terms(terms)[1].mT
        basis = qr.gram_qr(F)
        assert (basis.eigen, basis.passes) == (eigen, passes), name
        Q = F.double() @ basis.X
        assert orthonormality_error(Q) <= 2e-16 * qr.ONE_PASS_CONDITION, name  # 1.6e-16 kappa, kappa <= 1e8
        assert relative(Q @ basis.T, F.double()) <= math.sqrt(qr.DROP), name


def test_fp64_factors_keep_fp64_accuracy():
    """fp64 stacks take Householder QR: agreement to fp64 rounding, not just fp32's."""
    terms = [flexlora.LoraTerm(t.B.double(), t.A.double(), t.coeff) for t in stack(384, 256, RANKS, A_noise=1e-3)]
    B, A = flexlora.stack_terms(terms, F64)
    svd = flexlora.factored_svd(B, A)
    assert svd.S.dtype == F64
    assert relative(svd.dense(), B @ A) <= 1e-12
    assert orthonormality_error(svd.U) <= 1e-12 and orthonormality_error(svd.Vh.mT) <= 1e-12


def test_non_finite_factors_are_refused():
    terms = stack(96, 64, [4, 8])
    B, A = flexlora.stack_terms(terms)
    B[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        flexlora.factored_svd(B, A)


def test_fp64_work_in_row_chunks_keeps_every_accuracy_claim(monkeypatch):
    """The fp64 Gram, the second pass and the fp64 columns of F @ (X Y) run over row chunks of F (so F is
    never copied whole to fp64): with 64-row chunks (six per factor) every claim above still holds."""
    monkeypatch.setattr(qr, "_CHUNK_BYTES", 1)  # the smallest chunk: 64 rows
    assert len(qr._row_chunks(384, 72)) == 6
    check_against_reference(random_terms(384, 256, RANKS), check_ranks=range(1, sum(RANKS)))
    terms = stack(384, 256, RANKS, A_noise=1e-5)
    check_against_reference(terms)
    B, A = flexlora.stack_terms(terms)
    assert qr.gram_qr(A.mT).passes == 2  # the second pass ran, chunked
    check_against_reference(stack(384, 256, RANKS, B_noise=1e-5, A_noise=1e-5))  # fp64 columns on both sides
    ranks, coeffs = [4, 8, 4, 16, 8, 32], [1e-6, 1e3, 3e-2, 1.0, 1e2, 5e-4]
    scaled = stack(384, 256, ranks, coeffs=coeffs, B_scale=[1e-8, 1.0, 1e4, 1e-3, 1.0, 1e8])
    check_against_reference(scaled, check_ranks=range(1, sum(ranks)))
