"""Property tests of the math room on random small clients, against an fp64 dense reference.

The reference is built here, independently of flexlora.py: dW = sum_i w_i s_i B_i @ A_i as an
explicit fp64 matrix, and its SVD from torch.linalg.svd.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from conftest import truncated
from flexlora_cli import flexlora

settings.register_profile("flexlora", max_examples=40, deadline=None, derandomize=True)
settings.load_profile("flexlora")
F64 = torch.float64


@dataclass
class Clients:
    factors: list[tuple[torch.Tensor, torch.Tensor]]  # (B, A) per client, fp64
    scalings: list[float]
    weights: list[float]  # raw, not normalized

    @property
    def shape(self) -> tuple[int, int]:
        return self.factors[0][0].shape[0], self.factors[0][1].shape[1]

    def terms(self, weights: list[float] | None = None) -> list[flexlora.LoraTerm]:
        normalized = flexlora.normalize_weights(weights or self.weights, len(self.factors))
        return [flexlora.LoraTerm(B, A, w * s) for (B, A), w, s in zip(self.factors, normalized, self.scalings)]

    def reference(self) -> torch.Tensor:
        """The explicit fp64 dW."""
        total = sum(self.weights)
        dW = torch.zeros(self.shape, dtype=F64)
        for (B, A), w, s in zip(self.factors, self.weights, self.scalings):
            dW += (w / total) * s * (B @ A)
        return dW


@st.composite
def clients(draw, min_clients: int = 1) -> Clients:
    d_out, d_in = draw(st.integers(1, 10)), draw(st.integers(1, 10))
    count = draw(st.integers(min_clients, 4))
    ranks = draw(st.lists(st.integers(1, 6), min_size=count, max_size=count))
    scalings = draw(st.lists(st.floats(0.1, 4.0), min_size=count, max_size=count))
    weights = draw(st.lists(st.floats(0.05, 20.0), min_size=count, max_size=count))
    seed = draw(st.integers(0, 2**31 - 1))
    return Clients([random_factors(d_out, d_in, r, seed + i) for i, r in enumerate(ranks)], scalings, weights)


def random_factors(d_out: int, d_in: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian (B, A): generic singular values, so truncations are unique almost surely."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(d_out, rank, generator=generator, dtype=F64), torch.randn(rank, d_in, generator=generator, dtype=F64)


def largest(values: torch.Tensor) -> float:
    return float(values.abs().max()) if values.numel() else 0.0


def close(actual: torch.Tensor, expected: torch.Tensor, scale: float) -> bool:
    return largest(actual - expected) <= 1e-9 * max(scale, 1.0)


def norm(matrix: torch.Tensor) -> float:
    return float(torch.linalg.norm(matrix))


def truncation_is_unique(S: torch.Tensor, rank: int) -> bool:
    """The best rank-r approximation is unique unless S[r-1] == S[r] > 0 (a tie at the cut)."""
    if rank >= S.numel():
        return True
    noise = 1e-9 * float(S[0])
    return float(S[rank]) <= noise or float(S[rank - 1] - S[rank]) > 1e-6 * float(S[0])


@given(clients())
def test_factored_path_equals_the_dense_fp64_svd(c):
    dW = c.reference()
    svd = flexlora.merge(c.terms(), F64)
    S_ref = torch.linalg.svdvals(dW)
    k = svd.S.numel()
    assert k == min(*c.shape, sum(B.shape[1] for B, _ in c.factors))
    assert close(svd.S, S_ref[:k], norm(dW)) and close(S_ref[k:], torch.zeros_like(S_ref[k:]), norm(dW))
    assert close(svd.dense(), dW, norm(dW))
    # orthonormal singular vectors where the singular value is not zero
    live = int((svd.S > 1e-9 * max(largest(svd.S), 1e-300)).sum())
    assert close(svd.U[:, :live].mT @ svd.U[:, :live], torch.eye(live, dtype=F64), 1.0)
    assert close(svd.Vh[:live] @ svd.Vh[:live].mT, torch.eye(live, dtype=F64), 1.0)
    # and every truncation matches the dense path's
    dense = flexlora.dense_svd(dW)
    for rank in range(1, min(c.shape) + 1):
        if truncation_is_unique(S_ref, rank):
            assert close(flexlora.truncate(svd, rank).dense(), flexlora.truncate(dense, rank).dense(), norm(dW))


@given(clients(), st.integers(0, 3), st.floats(0.1, 8.0), st.booleans())
def test_rank_at_least_the_numerical_rank_reproduces_the_update_exactly(c, extra, scaling, balanced):
    dW = c.reference()
    svd = flexlora.merge(c.terms(), F64)
    rank = max(flexlora.numerical_rank(svd), 1) + extra
    B, A = flexlora.to_lora(flexlora.truncate(svd, rank), scaling, balanced)
    assert B.shape == (c.shape[0], rank) and A.shape == (rank, c.shape[1])
    assert close(scaling * B @ A, dW, norm(dW))
    assert flexlora.numerical_rank(svd) == int(torch.linalg.matrix_rank(dW))


@given(clients(), st.data())
def test_split_error_equals_the_discarded_singular_values(c, data):
    """Eckart-Young: ||dW - best rank-r approximation||_F = sqrt(sum_{j > r} sigma_j^2)."""
    dW = c.reference()
    S_ref = torch.linalg.svdvals(dW)
    rank = data.draw(st.integers(1, min(c.shape) + 2))
    approximation = flexlora.truncate(flexlora.merge(c.terms(), F64), rank).dense()
    discarded = float(torch.sqrt((S_ref[rank:] ** 2).sum()))
    assert abs(norm(approximation - dW) - discarded) <= 1e-9 * max(norm(dW), 1.0)
    # the share kept is 1 - ||dW - T_r(dW)||^2 / ||dW||^2, both norms of explicit fp64 matrices
    expected = 1.0 - norm(truncated(dW, rank) - dW) ** 2 / norm(dW) ** 2 if norm(dW) > 0 else 1.0
    assert flexlora.energy_kept(S_ref, rank) == pytest.approx(expected, abs=1e-9)


@given(clients(), st.data(), st.floats(0.1, 8.0))
def test_splitting_a_split_equals_splitting_once_at_the_smaller_rank(c, data, scaling):
    dW = c.reference()
    svd = flexlora.merge(c.terms(), F64)
    high = data.draw(st.integers(1, min(c.shape) + 2))
    low = data.draw(st.integers(1, high))
    assume(truncation_is_unique(torch.linalg.svdvals(dW), low))
    # split at `high` into a LoRA adapter, read it back as the CLI does (scaling * B, A), split at `low`
    B, A = flexlora.to_lora(flexlora.truncate(svd, high), scaling)
    twice = flexlora.truncate(flexlora.factored_svd(scaling * B, A), low)
    once = flexlora.truncate(svd, low)
    assert close(twice.dense(), once.dense(), norm(dW))


@given(clients(), st.floats(1e-3, 1e3))
def test_weights_scaled_by_a_constant_change_nothing(c, factor):
    before = flexlora.merge(c.terms(), F64)
    after = flexlora.merge(c.terms([w * factor for w in c.weights]), F64)
    assert close(after.dense(), before.dense(), norm(before.dense()))
    assert close(after.S, before.S, norm(before.dense()))
    scaled = flexlora.normalize_weights([w * factor for w in c.weights], len(c.weights))
    assert scaled == pytest.approx(flexlora.normalize_weights(c.weights, len(c.weights)), rel=1e-12)


@given(clients(), st.integers(1, 6), st.integers(0, 2**31 - 1), st.data())
def test_a_client_with_weight_zero_changes_nothing(c, rank, seed, data):
    d_out, d_in = c.shape
    idle = random_factors(d_out, d_in, rank, seed)
    position = data.draw(st.integers(0, len(c.factors)))
    with_idle = Clients(
        c.factors[:position] + [idle] + c.factors[position:],
        c.scalings[:position] + [1.0] + c.scalings[position:],
        c.weights[:position] + [0.0] + c.weights[position:],
    )
    before, after = flexlora.merge(c.terms(), F64), flexlora.merge(with_idle.terms(), F64)
    scale = norm(c.reference())
    assert close(after.dense(), before.dense(), scale)
    k = min(before.S.numel(), after.S.numel())
    assert close(after.S[:k], before.S[:k], scale) and close(after.S[k:], torch.zeros_like(after.S[k:]), scale)
    assert flexlora.numerical_rank(after) == flexlora.numerical_rank(before)


@given(clients(min_clients=2), st.data())
def test_the_order_of_clients_changes_nothing(c, data):
    order = data.draw(st.permutations(range(len(c.factors))))
    shuffled = Clients([c.factors[i] for i in order], [c.scalings[i] for i in order], [c.weights[i] for i in order])
    before, after = flexlora.merge(c.terms(), F64), flexlora.merge(shuffled.terms(), F64)
    scale = norm(c.reference())
    assert close(after.dense(), before.dense(), scale)
    assert close(after.S, before.S, scale)
    for rank in range(1, min(c.shape) + 1):
        if truncation_is_unique(torch.linalg.svdvals(c.reference()), rank):
            assert close(flexlora.truncate(after, rank).dense(), flexlora.truncate(before, rank).dense(), scale)


@given(clients(), st.integers(1, 8))
def test_a_client_rank_above_min_dimension_is_padded_not_refused(c, extra):
    """PEFT allows r > min(d_out, d_in); truncate pads with zero singular values and live A rows."""
    d_out, d_in = c.shape
    svd = flexlora.merge(c.terms(), F64)
    rank = min(d_out, d_in) + extra
    padded = flexlora.truncate(svd, rank)
    assert padded.U.shape == (d_out, rank) and padded.S.shape == (rank,) and padded.Vh.shape == (rank, d_in)
    assert close(padded.dense(), c.reference(), norm(c.reference()))
    live = min(rank, d_in)  # rows beyond d_in cannot be orthonormal; they stay zero
    assert close(padded.Vh[:live] @ padded.Vh[:live].mT, torch.eye(live, dtype=F64), 1.0)
    assert largest(padded.Vh[live:]) == 0.0


@given(clients(), st.booleans())
def test_signs_are_canonical_the_largest_entry_of_each_u_column_is_positive(c, dense):
    """flexlora.canonical_signs, on both SVD paths: outputs are reproducible, not LAPACK's sign choice."""
    dW = c.reference()
    svd = flexlora.dense_svd(dW) if dense else flexlora.merge(c.terms(), F64)
    live = svd.S > 1e-9 * max(largest(svd.S), 1e-300)  # a sign is only defined where S > 0
    U = svd.U[:, live]
    assert bool((U.gather(0, U.abs().argmax(dim=0)[None, :]) > 0).all())
    assert close(svd.dense(), dW, norm(dW))  # each pair flipped together: still an SVD of dW


@given(clients(), st.floats(0.1, 8.0), st.integers(1, 6))
def test_balanced_factors_carry_the_square_root_of_s_each(c, scaling, rank):
    svd = flexlora.truncate(flexlora.merge(c.terms(), F64), rank)
    B, A = flexlora.to_lora(svd, scaling, balanced=True)
    root = torch.sqrt(svd.S / scaling)
    assert close(torch.linalg.vector_norm(B, dim=0), root, 1.0)
    live = svd.S > 0
    assert close(torch.linalg.vector_norm(A, dim=1)[live], root[live], 1.0)
    B_plain, A_plain = flexlora.to_lora(svd, scaling)  # the default: S in B, orthonormal A
    assert close(torch.linalg.vector_norm(B_plain, dim=0), svd.S / scaling, 1.0)
    assert close(scaling * B @ A, scaling * B_plain @ A_plain, norm(svd.dense()))


def test_balanced_keeps_live_a_rows_past_the_rank_like_the_default():
    B1, A1 = random_factors(6, 5, 2, seed=0)
    svd = flexlora.truncate(flexlora.merge([flexlora.LoraTerm(B1, A1, 1.0)], F64), 4)  # rank 4 > rank 2 of the update
    _, A_plain = flexlora.to_lora(svd, 2.0)
    _, A_balanced = flexlora.to_lora(svd, 2.0, balanced=True)
    assert bool((torch.linalg.vector_norm(A_plain, dim=1) > 0.5).all())  # the default: every row live
    assert bool((torch.linalg.vector_norm(A_balanced, dim=1) > 0).all())
