"""A thin QR of a tall stacked factor at GEMM speed, from its Gram matrix (for flexlora.factored_svd).

flexlora.factored_svd needs, for each stacked factor F (d x R, d >> R), an orthonormal basis Q of
F's column space and the coefficients T with F = Q T. Householder QR (geqrf + orgqr) gets both
in twice a GEMM's flops, at below GEMM speed (half of it on this project's AVX-512 CPU; far less
on others and on GPUs). Here Q is never formed: the Gram matrix G = F^T F (one GEMM over its upper
triangle, in fp64) yields a small R x k matrix X with Q = F X orthonormal and T = Q^T F, and the
caller multiplies F once by X @ (the part of Q's span it needs). It pays while R is small against
d: the R x R work (Cholesky, triangular solves) grows as R^3 (see GRAM_MAX_WIDTH).

- Cholesky QR: with D = diag(column norms) (so clients' scales of 1e-6 and 1e3 do not matter),
  L L^T = D^-1 G D^-1, X = D^-1 L^-T and T = L^T D. With G in fp64 (products of fp32 numbers are
  exact there) the orthogonality error of F X is about 1.6e-16 kappa, kappa the condition number
  of the scaled Gram (measured from kappa = 3e4 to 3e11), so one pass is taken up to kappa = 1e8.
- Stacks that are nearly or exactly rank-deficient (from round 2 on, clients start from the same A
  and differ by what they trained) take the eigendecomposition of the scaled Gram instead.
  Directions below 1e-13 of its largest eigenvalue are dropped: they hold at most 3.2e-7 of any
  scaled column, within three fp32 roundings of the data (fp64 Gram noise measured below 1e-14).
  When the kept part is still worse than kappa = 1e8, a second Cholesky pass on F X (CholeskyQR2,
  Fukaya et al. 2014) brings its orthogonality to fp64 rounding.
- The one big product per factor, F @ (X Y) for the singular vectors Y of the core, runs column
  by column in the precision the column needs: fp32 rounding leaves an error of about 1.7e-7 w in
  a column (measured), w = ||D X y|| the size of its scaled coefficients, which is large only where
  the column is made from nearly dependent directions. Columns with w <= 32 (error <= 5.4e-6;
  the dominant singular vectors have w ~ 1) run in fp32, the others in fp64.

Pure tensors, any device. Non-finite factors raise ValueError. Memory: F itself, its R x R
matrices and 16 MB row chunks of fp64 work (F is never copied whole to fp64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

F64 = torch.float64

ONE_PASS_CONDITION = 1e8  # largest scaled-Gram condition number one Cholesky pass is trusted with
DROP = 1e-13  # eigenvalues of the scaled Gram below DROP * the largest are rank deficiency
FP32_WEIGHT = 32.0  # largest scaled coefficient norm of a column that F @ (X Y) may compute in fp32
# Widest stack, as a share of min(d_out, d_in), for which flexlora.factored_svd takes the Gram route:
# measured on one thread of this project's CPU 1.1-1.45x faster than Householder QR up to R/d = 0.35,
# even at 0.47 (1.02x; 0.92x at d = 1024), slower beyond as the R^3 work (Cholesky, triangular
# solves, the core) grows to dominate.
GRAM_MAX_WIDTH = 1 / 3
_PROBES, _POWER_STEPS = 4, 8  # power iteration estimating ||L^-1||_2
_GRAM_BLOCK = 128  # columns per block of the Gram matrix's upper triangle
# fp64 work on F goes through row chunks of about this many bytes, never a full fp64 copy of F: on a
# Llama-2-7B MLP module with 40 clients (11008 x 800) a copy and its product were 140 MB of the peak.
_CHUNK_BYTES = 1 << 24


@dataclass(frozen=True)
class GramQR:
    """F = (F @ X) @ T with F @ X orthonormal (k columns), without forming F @ X.

    After one Cholesky pass X = D^-1 L^-T is kept as L (applied by a triangular solve, cheaper
    than forming L^-1 and multiplying by it); after the eigendecomposition, X itself.
    """

    T: Tensor  # k x R, fp64
    scale: Tensor  # R, fp64: F's column norms D
    condition: float  # condition number (estimated) of the kept part of the column-scaled Gram
    passes: int  # Cholesky passes: 1, or 2 for an ill-conditioned kept part
    eigen: bool  # whether the eigendecomposition was needed (rank-deficient or ill-conditioned)
    L: Tensor | None = None  # n x n lower Cholesky factor of the live columns' scaled Gram (one pass)
    X_kept: Tensor | None = None  # R x k, fp64 (eigendecomposition)
    live: Tensor | None = None  # indices of the nonzero columns, when some are zero

    @property
    def rank(self) -> int:
        return self.T.shape[0]

    @property
    def X(self) -> Tensor:
        """R x k, fp64: F @ X is the orthonormal basis."""
        return self.coefficients(torch.eye(self.rank, dtype=F64, device=self.T.device))

    def coefficients(self, Y: Tensor) -> Tensor:
        """X @ Y (R x m, fp64) for Y (k x m): the combinations of F's columns that Q @ Y takes."""
        if self.L is None:
            return self.X_kept @ Y.to(F64)
        live = self.scale if self.live is None else self.scale[self.live]
        Z = torch.linalg.solve_triangular(self.L.mT, Y.to(F64), upper=True) / live[:, None]
        if self.live is None:
            return Z
        return Z.new_zeros(self.scale.shape[0], Z.shape[1]).index_copy_(0, self.live, Z)


def gram_qr_pays(d_out: int, d_in: int, R: int) -> bool:
    """Whether flexlora.factored_svd takes the Gram route for an R-wide fp32 stack on a d_out x d_in module."""
    return 0 < R <= GRAM_MAX_WIDTH * min(d_out, d_in)


def gram_qr(F: Tensor) -> GramQR:
    """The implicit thin QR of F (d x R, d >= R) from its fp64 Gram matrix; see the module docstring."""
    if F.ndim != 2 or F.shape[0] < F.shape[1]:
        raise ValueError(f"expected a tall matrix (d x R, d >= R), got shape {tuple(F.shape)}")
    G = _gram64(F)
    if not bool(torch.isfinite(G).all()):
        raise ValueError("the factors contain NaN or Inf values")
    scale = G.diagonal().sqrt()
    live = scale > 0  # all-zero columns (a client that did not train B) span nothing
    if not bool(live.any()):
        return GramQR(G.new_zeros(0, F.shape[1]), scale, 1.0, 1, False, X_kept=G.new_zeros(F.shape[1], 0))
    if bool(live.all()):
        return _scaled_qr(F, G / scale[:, None] / scale[None, :], scale)
    index = live.nonzero().flatten()
    s = scale[index]
    part = _scaled_qr(F[:, index], G[index][:, index] / s[:, None] / s[None, :], s)
    T = part.T.new_zeros(part.rank, F.shape[1]).index_copy_(1, index, part.T)
    if part.L is not None:
        return GramQR(T, scale, part.condition, part.passes, part.eigen, L=part.L, live=index)
    X = part.X_kept.new_zeros(F.shape[1], part.rank).index_copy_(0, index, part.X_kept)
    return GramQR(T, scale, part.condition, part.passes, part.eigen, X_kept=X)


def combine(F: Tensor, basis: GramQR, Y: Tensor, rows: bool = False) -> Tensor:
    """(F X) @ Y in fp32: the orthonormal basis of F combined by Y (k x m), d x m; with `rows`, its transpose.

    Columns whose scaled coefficients are small (w <= FP32_WEIGHT) run in fp32, the rest in fp64;
    `rows` computes (Y^T X^T) @ F^T directly, so the m x d result is contiguous.
    """
    Z = basis.coefficients(Y)
    weight = torch.linalg.vector_norm(Z * basis.scale[:, None], dim=0)
    live = basis.scale[basis.scale > 0]
    # Column norms far from 1 would push X's entries out of fp32's normal range.
    in_range = bool(live.numel() == 0 or (live.min() >= 1e-18 and live.max() <= 1e18))
    narrow = (weight <= FP32_WEIGHT) & in_range

    def times(part: Tensor, dtype: torch.dtype) -> Tensor:
        if dtype == F.dtype:
            return (part.mT.to(dtype) @ F.mT if rows else F @ part.to(dtype)).float()
        # another precision than F's: by row chunks of F, so that F is never copied whole
        part = part.to(dtype)
        out = torch.empty((part.shape[1], F.shape[0]) if rows else (F.shape[0], part.shape[1]), dtype=torch.float32, device=F.device)
        for start, stop in _row_chunks(*F.shape):
            chunk = F[start:stop].to(dtype)
            if rows:
                out[:, start:stop] = part.mT @ chunk.mT
            else:
                out[start:stop] = chunk @ part
        return out

    if bool(narrow.all()):
        return times(Z, torch.float32)
    if not bool(narrow.any()):
        return times(Z, F64)
    dim = 0 if rows else 1
    shape = (Z.shape[1], F.shape[0]) if rows else (F.shape[0], Z.shape[1])
    out = torch.empty(shape, dtype=torch.float32, device=F.device)
    for mask, dtype in ((narrow, torch.float32), (~narrow, F64)):
        index = mask.nonzero().flatten()
        out.index_copy_(dim, index, times(Z[:, index], dtype))
    return out


def _scaled_qr(F: Tensor, Gs: Tensor, scale: Tensor) -> GramQR:
    """The implicit QR of F (no zero columns) from Gs = D^-1 F^T F D^-1, D = diag(scale)."""
    Gs.diagonal().fill_(1.0)  # exactly unit, as the scaling means
    L, info = torch.linalg.cholesky_ex(Gs)
    if int(info) == 0:
        # kappa(Gs) <= ||Gs||_inf ||L^-1||_2^2, the latter from below by power iteration (tight to a few %)
        condition = float(Gs.abs().sum(dim=1).max()) * _inverse_norm2(L) ** 2
        if condition <= ONE_PASS_CONDITION:
            return GramQR(L.mT * scale[None, :], scale, condition, 1, False, L=L)
    values, vectors = torch.linalg.eigh(Gs)
    keep = values > DROP * values[-1].clamp_min(0)
    values, vectors = values[keep], vectors[:, keep]
    condition = float(values[-1] / values[0]) if values.numel() else 1.0
    root = values.sqrt()
    X, T = vectors / root / scale[:, None], (root[:, None] * vectors.mT) * scale[None, :]
    if condition <= ONE_PASS_CONDITION or not values.numel():
        return GramQR(T, scale, condition, 1, True, X_kept=X)
    # Q = F X is well conditioned now (kappa(Q)^2 - 1 ~ 1.6e-16 condition <= 2e-3): CholeskyQR2's second pass
    L2 = torch.linalg.cholesky(_gram_of_product(F, X))
    X = torch.linalg.solve_triangular(L2, X.mT, upper=False).mT  # X L2^-T
    return GramQR(L2.mT @ T, scale, condition, 2, True, X_kept=X)


def gram_flops(d: int, R: int) -> float:
    """Flops of the Gram matrix of a d x R factor as computed here (upper-triangle blocks only)."""
    blocks = _gram_blocks(R)
    return 2.0 * d * R * R * (blocks + 1) / (2 * blocks)


def _gram_blocks(R: int) -> int:
    return max(1, round(R / _GRAM_BLOCK))


def _row_chunks(d: int, R: int) -> list[tuple[int, int]]:
    """Row ranges of a d x R matrix whose fp64 copies take about _CHUNK_BYTES each."""
    step = max(64, _CHUNK_BYTES // (8 * max(R, 1)))
    return [(start, min(start + step, d)) for start in range(0, d, step)]


def _gram64(F: Tensor) -> Tensor:
    """F^T F in fp64, summed over row chunks of F converted to fp64 one at a time."""
    chunks = _row_chunks(*F.shape)
    if len(chunks) == 1:
        return _gram(F.to(F64))
    G = torch.zeros(F.shape[1], F.shape[1], dtype=F64, device=F.device)
    for start, stop in chunks:
        G += _gram(F[start:stop].to(F64))
    return G


def _gram_of_product(F: Tensor, X: Tensor) -> Tensor:
    """(F X)^T (F X) in fp64, by row chunks of F (F X is never formed whole)."""
    G = torch.zeros(X.shape[1], X.shape[1], dtype=F64, device=F.device)
    for start, stop in _row_chunks(*F.shape):
        Q = F[start:stop].to(F64) @ X
        G += Q.mT @ Q
    return G


def _gram(F: Tensor) -> Tensor:
    """F^T F from the blocks of its upper triangle (torch has no SYRK; 25 % fewer flops at R = 288)."""
    R = F.shape[1]
    blocks = _gram_blocks(R)
    if blocks == 1:
        return F.mT @ F
    edges = [round(i * R / blocks) for i in range(blocks + 1)]
    G = F.new_empty(R, R)
    for start, stop in zip(edges, edges[1:]):
        rows = F[:, start:stop].mT @ F[:, start:]
        G[start:stop, start:] = rows
        G[stop:, start:stop] = rows[:, stop - start :].mT
    return G


def _inverse_norm2(L: Tensor) -> float:
    """||L^-1||_2 for lower-triangular L, from below: a few seeded power-iteration probes, by triangular solves."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    probes = torch.randn(L.shape[0], _PROBES, generator=generator, dtype=F64).to(L.device)
    for _ in range(_POWER_STEPS):
        probes = torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, probes, upper=False), upper=True)
        probes = probes / torch.linalg.vector_norm(probes, dim=0).clamp_min(torch.finfo(F64).tiny)
    return float(torch.linalg.vector_norm(torch.linalg.solve_triangular(L, probes, upper=False), dim=0).max())
