"""The FlexLoRA algorithm (Bai et al., NeurIPS 2024, arXiv 2402.11505), as pure tensor math.

For one adapted module, client i contributes LoRA factors A_i (r_i x d_in), B_i (d_out x r_i),
its PEFT scaling s_i and its aggregation weight w_i. The server forms

    dW = sum_i w_i * s_i * B_i @ A_i

and hands every client back the best rank-r_i approximation of dW (truncated SVD).

dW has rank <= R = sum_i r_i, so the dense d_out x d_in matrix is never built: with
B_cat = [w_i s_i B_i] and A_cat = [A_i] stacked, QR-factor both (B_cat = Qb Rb,
A_cat^T = Qa Ra); then dW = Qb (Rb Ra^T) Qa^T and the SVD of the small R x R core gives the
exact SVD of dW.

No files, no network: tensors in, tensors out. Bad arguments raise ValueError.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from flexlora_cli import qr


@dataclass(frozen=True)
class LoraTerm:
    """One client's contribution to one module: dW_i = coeff * B @ A."""

    B: Tensor  # d_out x r
    A: Tensor  # r x d_in
    coeff: float  # w_i * s_i


@dataclass(frozen=True)
class LowRank:
    """A matrix as its (thin) SVD, U @ diag(S) @ Vh, singular values in descending order."""

    U: Tensor  # d_out x k
    S: Tensor  # k
    Vh: Tensor  # k x d_in

    @property
    def shape(self) -> tuple[int, int]:
        return self.U.shape[0], self.Vh.shape[1]

    def dense(self) -> Tensor:
        return (self.U * self.S) @ self.Vh


def lora_scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """PEFT's scaling of a LoRA delta: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def normalize_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """Client weights normalized to sum 1; uniform when none are given."""
    if count <= 0:
        raise ValueError("need at least one client")
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise ValueError(f"got {len(weights)} weights for {count} clients")
    try:
        values = [float(w) for w in weights]
    except OverflowError:  # an integer (a sample count) beyond the float range
        raise ValueError("weights must be finite numbers, at most 1.8e308") from None
    if any(not math.isfinite(w) for w in values):
        raise ValueError(f"weights must be finite numbers, got {values}")
    if any(w < 0 for w in values):
        raise ValueError(f"weights must not be negative, got {values}")
    if max(values) <= 0:
        raise ValueError(f"weights must not sum to zero, got {values}")
    # Scale by a power of two first: exact, so ordinary weights normalize bit for bit as without it,
    # while the sum of huge weights (1e308 + 1e308) cannot overflow and subnormal ones keep their ratios.
    exponent = math.frexp(max(values))[1]
    scaled = [math.ldexp(w, -exponent) for w in values]
    total = math.fsum(scaled)
    return [w / total for w in scaled]


def stack_terms(terms: Iterable[LoraTerm], dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """B_cat = [c_1 B_1, ..., c_n B_n] (d_out x R) and A_cat = [A_1; ...; A_n] (R x d_in).

    `terms` is consumed one at a time: from a lazy source (a client's factors read when its turn
    comes) only the scaled pieces are held until they are joined, not the factors as read as well.
    """
    Bs, As = [], []
    for term in terms:
        Bs.append(term.B.to(dtype) * term.coeff)
        As.append(term.A.to(dtype))
    if not Bs:
        raise ValueError("need at least one LoRA term")
    return torch.cat(Bs, dim=1), torch.cat(As, dim=0)


def factored_svd(B: Tensor, A: Tensor) -> LowRank:
    """Exact thin SVD of B @ A without forming it: orthonormal bases of both factors, SVD of the small core.

    fp32 stacks narrow against the module (R <= min(d_out, d_in) * qr.GRAM_MAX_WIDTH) take the
    Gram-matrix QR of `flexlora_cli.qr` (fp64 Gram matrices, GEMM speed), accurate to fp32 rounding
    also when the stack is nearly or exactly rank-deficient or its columns differ in scale by many
    orders; the exactly dependent directions are dropped, so the result may hold fewer than R
    components (`truncate` pads past them). fp64 factors, and wider stacks (where the R^3 work
    dominates and Householder's is smaller), take Householder QR (torch.linalg.qr): fp64 accuracy,
    min(R, d_out, d_in) components.
    """
    if not qr.gram_qr_pays(B.shape[0], A.shape[1], B.shape[1]) or B.dtype != torch.float32 or A.dtype != torch.float32:
        return _householder_svd(B, A)
    b, a = qr.gram_qr(B), qr.gram_qr(A.mT)
    if not min(b.rank, a.rank):
        return LowRank(B.new_zeros(B.shape[0], 0), B.new_zeros(0), A.new_zeros(0, A.shape[1]))
    # The core Q_b^T (B A) Q_a = T_b T_a^T (k_b x k_a) and its SVD in fp32, as Householder QR's core
    # was: its rounding is fp32's relative to the core's norm, and fp32 costs half of fp64.
    norm = float(b.T.abs().max() * a.T.abs().max()) or 1.0
    core = (b.T / b.T.abs().max()).float() @ (a.T / a.T.abs().max()).float().mT
    Uc, S, Vhc = (part.to(torch.float64) for part in torch.linalg.svd(core, full_matrices=False))
    U = qr.combine(B, b, Uc)
    Vh = qr.combine(A.mT, a, Vhc.mT, rows=True)
    return canonical_signs(LowRank(U, (S * norm).float(), Vh), inplace=True)  # U and Vh are this call's own


def _householder_svd(B: Tensor, A: Tensor) -> LowRank:
    """factored_svd through Householder QR of both factors (fp64 factors, stacks as wide as the module)."""
    Qb, Rb = torch.linalg.qr(B)  # d_out x k_b, k_b x R
    Qa, Ra = torch.linalg.qr(A.mT)  # d_in x k_a, k_a x R
    Uc, S, Vhc = torch.linalg.svd(Rb @ Ra.mT, full_matrices=False)
    return canonical_signs(LowRank(Qb @ Uc, S, Vhc @ Qa.mT))


def dense_svd(delta: Tensor) -> LowRank:
    """Thin SVD of an explicit matrix (for dense inputs and as the reference path)."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return canonical_signs(LowRank(U, S, Vh))


def merge(terms: Iterable[LoraTerm], dtype: torch.dtype = torch.float32) -> LowRank:
    """FlexLoRA's merged update sum_i c_i B_i A_i, as its exact SVD (factored path)."""
    return factored_svd(*stack_terms(terms, dtype))


def numerical_rank(svd: LowRank) -> int:
    """Count of singular values above rounding noise (the rule of torch.linalg.matrix_rank)."""
    if svd.S.numel() == 0:
        return 0
    tolerance = svd.S[0] * max(svd.shape) * torch.finfo(svd.S.dtype).eps
    return int((svd.S > tolerance).sum())


def truncate(svd: LowRank, rank: int) -> LowRank:
    """Best rank-`rank` approximation (Eckart-Young), as exactly `rank` components.

    When `rank` exceeds the available components, the extra singular values are zero and the
    extra right singular vectors complete Vh to an orthonormal set, as a full SVD would: the
    client's next round then starts with live A rows instead of dead all-zero ones. (PEFT allows
    r > min(d_out, d_in); rows beyond d_in cannot be orthonormal and stay zero.)
    """
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    d_out, d_in = svd.shape
    kept = min(rank, svd.S.numel())
    U, S, Vh = svd.U[:, :kept], svd.S[:kept], svd.Vh[:kept]
    missing = rank - kept
    if missing:
        completed = min(missing, d_in - kept)
        U = torch.cat([U, U.new_zeros(d_out, missing)], dim=1)
        S = torch.cat([S, S.new_zeros(missing)])
        Vh = torch.cat([Vh, _orthonormal_complement(Vh, completed), Vh.new_zeros(missing - completed, d_in)])
    return LowRank(U, S, Vh)


def to_lora(svd: LowRank, scaling: float, balanced: bool = False) -> tuple[Tensor, Tensor]:
    """LoRA factors (B, A) whose PEFT delta scaling * B @ A equals the given low-rank matrix.

    By default the singular values go into B (B = U S / scaling, A = Vh), as in the paper;
    `balanced` puts sqrt(S / scaling) on both sides instead. Either way, a component with S = 0 (past
    the update's rank) keeps its unit row of A and a zero column of B, so that the client's next round
    starts with live A rows (a zero B column times a zero A row would get no gradient at all).
    """
    if not scaling > 0:
        raise ValueError(f"scaling must be positive, got {scaling}")
    if balanced:
        root = torch.sqrt(svd.S / scaling)
        return svd.U * root, torch.where(root > 0, root, 1.0)[:, None] * svd.Vh
    return svd.U * (svd.S / scaling), svd.Vh


def energy_kept(S: Tensor, rank: int) -> float:
    """Share of the squared Frobenius norm that the top `rank` singular values carry."""
    total = float((S.double() ** 2).sum())
    if total == 0.0:
        return 1.0
    return float((S[:rank].double() ** 2).sum()) / total


def rank_for_energy(S: Tensor, share: float) -> int:
    """The smallest rank whose singular values keep at least `share` of the squared Frobenius norm.

    `share` is in (0, 1]; an all-zero update keeps everything at rank 1.
    """
    if not 0.0 < share <= 1.0:
        raise ValueError(f"energy share must be in (0, 1], got {share}")
    squares = S.double() ** 2
    total = float(squares.sum())
    if total == 0.0 or S.numel() == 0:
        return 1
    kept = torch.cumsum(squares, 0) / total
    # Rounding may leave the last cumulative share a hair under 1.0: share 1.0 means every nonzero value.
    reached = torch.nonzero(kept >= share * (1.0 - 4 * torch.finfo(torch.float64).eps)).flatten()
    return int(reached[0]) + 1 if reached.numel() else int(S.numel())


def canonical_signs(svd: LowRank, inplace: bool = False) -> LowRank:
    """Fix each singular pair's sign so the largest-magnitude entry of U's column is positive.

    An SVD is unique only up to the sign of each pair; this makes outputs reproducible. `inplace`
    flips U and Vh where they are (for factors the caller owns: no copies of a large U).
    """
    if svd.S.numel() == 0:
        return svd
    width = max(1, (1 << 22) // max(svd.U.shape[0], 1))  # columns per 16 MB (fp32) slice of |U|
    pivots = torch.cat([svd.U[:, j : j + width].abs().argmax(dim=0) for j in range(0, svd.U.shape[1], width)])
    signs = torch.sign(svd.U.gather(0, pivots[None, :])).squeeze(0)
    signs[signs == 0] = 1
    if inplace:
        svd.U.mul_(signs)
        svd.Vh.mul_(signs[:, None])
        return svd
    return LowRank(svd.U * signs, svd.S, signs[:, None] * svd.Vh)


def _orthonormal_complement(Vh: Tensor, count: int) -> Tensor:
    """`count` orthonormal rows orthogonal to Vh's rows, deterministic (seeded)."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    d_in = Vh.shape[1]
    probe = torch.randn(d_in, count, generator=generator, dtype=torch.float64).to(Vh)
    for _ in range(2):  # twice is enough for orthogonality to working precision
        probe = probe - Vh.mT @ (Vh @ probe)
    Q, _ = torch.linalg.qr(probe)
    return Q.mT

