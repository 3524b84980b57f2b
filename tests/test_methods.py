"""The aggregation methods' math (flexlora_cli.methods): hand-derived small cases and fp64 dense references."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import padded

from flexlora_cli.methods import fedavg, flexlora_method, flora, hetlora, lora_fair, raflora
from flexlora_cli.methods.base import MathSettings, ModuleClients

T = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
F64 = MathSettings(dtype=torch.float64)

# Client 1 at rank 1, client 2 at rank 2, both 2x2 updates.
B1, A1 = T([[1], [2]]), T([[3, 4]])
B2, A2 = T([[1, 0], [0, 1]]), T([[1, 1], [2, 0]])


def module(factors, weights=None, scalings=None) -> ModuleClients:
    """One module's clients from explicit (B, A) pairs; weights normalized here, uniform by default."""
    count = len(factors)
    weights = [1.0] * count if weights is None else weights
    total = sum(weights)
    return ModuleClients(
        shape=(factors[0][0].shape[0], factors[0][1].shape[1]),
        ranks=tuple(A.shape[0] for _, A in factors),
        scalings=tuple(scalings or [1.0] * count),
        weights=tuple(w / total for w in weights),
        read=lambda index: factors[index],
    )


def random_factors(ranks, d_out=7, d_in=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(d_out, r, generator=generator, dtype=torch.float64),
             torch.randn(r, d_in, generator=generator, dtype=torch.float64)) for r in ranks]




def truncated(delta: torch.Tensor, rank: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return (U[:, :rank] * S[:rank]) @ Vh[:rank]


def test_module_clients_refuse_bad_arguments():
    with pytest.raises(ValueError, match="at least one client"):
        ModuleClients((2, 2), (), (), (), read=lambda i: None)
    with pytest.raises(ValueError, match="2 ranks, 1 scalings and 2 weights"):
        ModuleClients((2, 2), (1, 2), (1.0,), (0.5, 0.5), read=lambda i: None)


# ---- FedAvg / FedIT ------------------------------------------------------------------------------


def test_fedavg_averages_factors_not_updates_by_hand():
    Bb, Ab = T([[3], [0]]), T([[1, 0]])
    update = fedavg.aggregate(module([(B1, A1), (Bb, Ab)], scalings=[2.0, 2.0]), F64)
    torch.testing.assert_close(update.B, T([[2], [1]]))
    torch.testing.assert_close(update.A, T([[2, 2]]))
    assert update.global_scaling == 2.0
    # The product of the averages is not the average of the products (what FlexLoRA keeps).
    assert not torch.allclose(update.B @ update.A, (B1 @ A1 + Bb @ Ab) / 2)


def test_fedavg_refuses_unequal_ranks_and_scalings():
    with pytest.raises(ValueError, match="needs equal ranks, got \\[1, 2\\]"):
        fedavg.aggregate(module([(B1, A1), (B2, A2)]), F64)
    with pytest.raises(ValueError, match="scalings differ"):
        fedavg.aggregate(module([(B1, A1), (B1, A1)], scalings=[1.0, 2.0]), F64)


# ---- FLoRA ---------------------------------------------------------------------------------------


def test_flora_stacks_exactly_with_weights_in_A_by_hand():
    Bb, Ab = T([[3], [0]]), T([[1, 0]])
    # coefficients w_i s_i = 0.2 * 2.5 = 0.5 and 0.8 * 2.5 = 2.0
    update = flora.aggregate(module([(B1, A1), (Bb, Ab)], weights=[0.2, 0.8], scalings=[2.5, 2.5]), F64)
    torch.testing.assert_close(update.B, T([[1, 3], [2, 0]]))
    torch.testing.assert_close(update.A, T([[1.5, 2], [2, 0]]))
    torch.testing.assert_close(update.B @ update.A, T([[7.5, 2], [3, 4]]))  # 0.5 B1 A1 + 2 Bb Ab
    assert update.global_scaling == 1.0


# ---- HetLoRA -------------------------------------------------------------------------------------


def test_hetlora_sparsity_weights_zero_pad_average_and_slice_by_hand():
    # ||B1 A1||_F = ||[[3,4],[6,8]]|| = 5 sqrt(5); ||B2 A2||_F = ||[[1,1],[2,0]]|| = sqrt(6); given shares 1/4, 3/4.
    products = [0.25 * 5 * math.sqrt(5), 0.75 * math.sqrt(6)]
    e1, e2 = (p / sum(products) for p in products)
    update = hetlora.aggregate(module([(B1, A1), (B2, A2)], weights=[1, 3], scalings=[2.0, 2.0]), F64)
    assert update.info["weights"] == pytest.approx([e1, e2], rel=1e-14)
    # B1 padded is [[1,0],[2,0]], A1 padded is [[3,4],[0,0]].
    B_avg = T([[e1 + e2, 0], [2 * e1, e2]])
    A_avg = T([[3 * e1 + e2, 4 * e1 + e2], [2 * e2, 0]])
    torch.testing.assert_close(update.B, B_avg)
    torch.testing.assert_close(update.A, A_avg)
    assert update.global_scaling == 2.0
    small_B, small_A = update.client_share(1, 2.0)
    torch.testing.assert_close(small_B, B_avg[:, :1])
    torch.testing.assert_close(small_A, A_avg[:1])
    with pytest.raises(ValueError, match="outside 1..2"):
        update.client_share(3, 2.0)


def test_hetlora_weights_reduce_to_given_weights_when_norms_are_equal():
    # Different directions, one norm: ||[[0,2],[0,0]]|| = ||[[0,0],[2,0]]|| = 2.
    factors = [(T([[1], [0]]), T([[0, 2]])), (T([[0], [2]]), T([[1, 0]]))]
    update = hetlora.aggregate(module(factors, weights=[1, 3]), F64)
    assert update.info["weights"] == pytest.approx([0.25, 0.75], rel=1e-14)
    torch.testing.assert_close(update.B, T([[0.25], [1.5]]))
    torch.testing.assert_close(update.A, T([[0.75, 0.5]]))


def test_hetlora_zero_updates_fall_back_to_the_given_weights():
    fresh = [(torch.zeros(2, 1, dtype=torch.float64), A1), (torch.zeros(2, 2, dtype=torch.float64), A2)]
    update = hetlora.aggregate(module(fresh, weights=[1, 3]), F64)
    assert update.info["weights"] == pytest.approx([0.25, 0.75])
    torch.testing.assert_close(update.A, 0.25 * padded(A1, 2, 0) + 0.75 * A2)
    # One zero update among nonzero ones just gets weight 0.
    mixed = hetlora.aggregate(module([fresh[0], (B2, A2)], weights=[1, 3]), F64)
    assert mixed.info["weights"] == [0.0, 1.0]


def test_hetlora_update_norm_is_the_dense_frobenius_norm():
    for B, A in random_factors([1, 3, 5], d_out=9, d_in=4, seed=3):
        assert hetlora.update_norm(B, A) == pytest.approx(float(torch.linalg.norm(B @ A)), rel=1e-12)
    assert hetlora.update_norm(torch.zeros(3, 2), torch.ones(2, 4)) == 0.0


def test_hetlora_refuses_different_scalings():
    with pytest.raises(ValueError, match="scalings differ"):
        hetlora.aggregate(module([(B1, A1), (B2, A2)], scalings=[1.0, 2.0]), F64)


# ---- RaFLoRA -------------------------------------------------------------------------------------


def test_raflora_averages_each_rank_partition_over_the_clients_reaching_it_by_hand():
    # Index 0: both clients, shares 1/4, 3/4. Index 1: only client 2, share renormalized to 1.
    #   1/4 [[3,4],[6,8]] + 3/4 B2[:, :1] A2[:1] + 1 * B2[:, 1:] A2[1:]
    # = 1/4 [[3,4],[6,8]] + 3/4 [[1,1],[0,0]] + [[0,0],[2,0]] = [[1.5,1.75],[3.5,2]]
    expected = T([[1.5, 1.75], [3.5, 2]])
    update = raflora.aggregate(module([(B1, A1), (B2, A2)], weights=[1, 3]), F64)
    torch.testing.assert_close(update.svd.dense(), expected)
    assert update.info["partitions"] == [[0, 1], [1, 2]]
    B, A = update.client_share(1, 0.5)
    torch.testing.assert_close(0.5 * B @ A, truncated(expected, 1))


def test_raflora_heterogeneous_ranks_against_a_dense_reference():
    ranks, weights, scalings = [1, 3, 3, 5], [4.0, 1.0, 2.0, 3.0], [2.0, 0.5, 1.0, 0.25]
    factors = random_factors(ranks, seed=1)
    shares = [w / sum(weights) for w in weights]
    expected = torch.zeros(7, 6, dtype=torch.float64)
    for k, (B, A) in enumerate(factors):
        for j in range(ranks[k]):  # rank index j is averaged over the clients that have it
            reaching = sum(shares[i] for i in range(len(ranks)) if ranks[i] > j)
            expected += shares[k] / reaching * scalings[k] * torch.outer(B[:, j], A[j])
    update = raflora.aggregate(module(factors, weights, scalings), F64)
    torch.testing.assert_close(update.svd.dense(), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(update.svd.S, torch.linalg.svdvals(expected)[: update.rank], rtol=1e-12, atol=1e-12)
    B, A = update.client_share(2, 0.25)
    torch.testing.assert_close(0.25 * B @ A, truncated(expected, 2), rtol=1e-10, atol=1e-12)


def test_raflora_equals_flexlora_for_equal_ranks():
    factors = random_factors([3, 3, 3], seed=2)
    clients = module(factors, weights=[1.0, 2.0, 5.0], scalings=[2.0, 1.0, 0.5])
    expected = sum(w * s * B @ A for (B, A), w, s in zip(factors, clients.weights, clients.scalings))
    ra, flex = raflora.aggregate(clients, F64), flexlora_method.aggregate(clients, F64)
    for update in (ra, flex):
        torch.testing.assert_close(update.svd.dense(), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(update.svd.S, torch.linalg.svdvals(expected)[: update.rank], rtol=1e-12, atol=1e-12)
    assert ra.info["partitions"] == [[0, 3]]


def test_raflora_partition_reached_only_by_zero_weight_clients_contributes_nothing():
    update = raflora.aggregate(module([(B1, A1), (B2, A2)], weights=[1, 0]), F64)
    torch.testing.assert_close(update.svd.dense(), B1 @ A1)


# ---- LoRA-FAIR -----------------------------------------------------------------------------------


def test_lora_fair_corrects_b_by_hand():
    # A-bar = I and B-bar = [[1,0],[0,0]], while dW = [[0,1],[0,0]] is orthogonal to B-bar A-bar.
    # With A-bar = I the objective is 1 - cos(dW, B) + ridge ||B - B-bar||^2 / ||B-bar||^2 in the plane
    # of dW and B-bar; at ridge 1/sqrt(2) its minimum is at 45 degrees: B = (dW/||dW|| + B-bar) / 2.
    factors = [(T([[2, 0], [0, 1]]), T([[0, 1], [0, 1]])), (T([[0, 0], [0, -1]]), T([[2, -1], [0, 1]]))]
    settings = MathSettings(dtype=torch.float64, options={"ridge": 1 / math.sqrt(2)})
    update = lora_fair.aggregate(module(factors, scalings=[3.0, 3.0]), settings)
    torch.testing.assert_close(update.A, T([[1, 0], [0, 1]]))
    torch.testing.assert_close(update.B, T([[0.5, 0.5], [0, 0]]), rtol=0, atol=1e-7)
    assert update.global_scaling == 3.0
    assert update.info["cosine_before"] == pytest.approx(0.0, abs=1e-15)
    assert update.info["cosine_after"] == pytest.approx(1 / math.sqrt(2), rel=1e-7)


def test_lora_fair_recovers_the_exact_update_when_clients_share_a():
    A = T([[1, 2, 0], [0, 1, -1]])
    factors = [(B, A) for B, _ in random_factors([2, 2, 2], d_out=4, d_in=3, seed=4)]
    clients = module(factors, weights=[1.0, 2.0, 3.0], scalings=[2.0, 2.0, 2.0])
    update = lora_fair.aggregate(clients, F64)
    exact = sum(w * s * B @ A_k for (B, A_k), w, s in zip(factors, clients.weights, clients.scalings))
    torch.testing.assert_close(2.0 * update.B @ update.A, exact, rtol=1e-12, atol=1e-12)
    assert update.info["correction"] == 0.0


def test_lora_fair_keeps_the_averages_when_they_are_already_exact():
    # One B for every client: B-bar A-bar = sum_k w_k B A_k exactly, so dB = 0 even with unequal A's.
    B = T([[1, 0], [2, 1], [0, 3]])
    factors = [(B, A) for _, A in random_factors([2, 2], d_out=3, d_in=5, seed=5)]
    update = lora_fair.aggregate(module(factors, weights=[1, 4]), F64)
    assert update.info["correction"] == 0.0
    torch.testing.assert_close(update.B, 0.2 * B + 0.8 * B, rtol=0, atol=0)
    torch.testing.assert_close(update.A, 0.2 * factors[0][1] + 0.8 * factors[1][1])


@pytest.mark.parametrize("ridge", [0.0, 0.01, 1.0])
def test_lora_fair_solves_its_objective_with_heterogeneous_ranks(ridge):
    ranks, weights = [1, 2, 4], [0.2, 0.3, 0.5]
    factors = random_factors(ranks, seed=6)
    update = lora_fair.aggregate(module(factors, weights, [2.0] * 3), MathSettings(dtype=torch.float64, options={"ridge": ridge}))
    # Independent fp64 dense objective: padded averages, the dense dW, autograd for the gradient.
    B_bar = sum(w * padded(B, 4, 1) for (B, _), w in zip(factors, weights))
    A_bar = sum(w * padded(A, 4, 0) for (_, A), w in zip(factors, weights))
    delta = sum(w * B @ A for (B, A), w in zip(factors, weights))

    def objective(dB):
        product = (B_bar + dB) @ A_bar
        cosine = (delta * product).sum() / (torch.linalg.norm(delta) * torch.linalg.norm(product))
        return 1 - cosine + ridge * (dB**2).sum() / (B_bar**2).sum()

    dB = (update.B - B_bar).requires_grad_()
    value = objective(dB)
    (gradient,) = torch.autograd.grad(value, dB)
    assert float(torch.linalg.norm(gradient)) < 1e-7 * float(torch.linalg.norm(B_bar))
    assert float(value.detach()) < float(objective(torch.zeros_like(B_bar))) - 1e-3
    torch.testing.assert_close(update.A, A_bar)
    B, A = update.client_share(2, 2.0)
    torch.testing.assert_close(B, update.B[:, :2])
    torch.testing.assert_close(A, A_bar[:2])


def test_lora_fair_larger_ridge_keeps_b_closer_to_the_average():
    factors = random_factors([2, 2, 2], seed=7)
    corrections = [lora_fair.aggregate(module(factors), MathSettings(dtype=torch.float64, options={"ridge": r})).info["correction"]
                   for r in (0.001, 0.1, 10.0)]
    assert corrections[0] > corrections[1] > corrections[2] > 0


def test_lora_fair_refuses_bad_ridge_and_different_scalings():
    clients = module([(B1, A1), (B2, A2)])
    for ridge in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="ridge must be a finite number >= 0"):
            lora_fair.aggregate(clients, MathSettings(options={"ridge": ridge}))
    with pytest.raises(ValueError, match="scalings differ"):
        lora_fair.aggregate(module([(B1, A1), (B2, A2)], scalings=[1.0, 2.0]), F64)


@pytest.mark.parametrize("method", [hetlora, raflora, lora_fair])
def test_methods_compute_in_the_settings_dtype(method):
    factors = [(B.float(), A.float()) for B, A in random_factors([1, 3], seed=8)]
    update = method.aggregate(module(factors, scalings=[2.0, 2.0]), MathSettings(dtype=torch.float32))
    assert all(t.dtype == torch.float32 for t in update.tensors().values() if t.is_floating_point() and t.numel() > 1)
