"""Scaling FlexLoRA's merge to hundreds or thousands of clients: pick the cheapest SVD path per module.

All paths compute the SVD of one module's merged update M = sum_i c_i B_i A_i (d_out x d_in,
R = sum_i r_i stacked ranks):

- stacked (`flexlora.merge`): QR both stacked factors (from their fp64 Gram matrices, qr.py), SVD
  the R x R core. O(d R^2) time at GEMM speed and O(d R) memory: the fastest path while R is
  small against min(d_out, d_in).
- dense: stream the clients into one fp32 (or fp64) d_out x d_in accumulator, then a dense SVD.
  O(R d_out d_in) GEMM + O(d^3) SVD; memory is one module, whatever the number of clients.
- incremental: fold clients into a running factored form and re-compress it (QR + small SVD)
  whenever its width exceeds a bound. Only rounding noise is dropped at each re-compression,
  so it is exact; it is fast while the bound stays above the true rank, and its memory,
  (d_out + d_in) x bound, beats the dense accumulator on tall modules (embeddings, heads).
- randomized (opt-in, `svd="randomized"`): a range finder with oversampling and power
  iterations on the implicit operator X -> sum_i c_i B_i (A_i X) (or on the dense accumulator
  when that is cheaper to apply), for when only the top k components are needed.

Clients arrive as an iterable of `flexlora.LoraTerm`, read one at a time, so memory is bounded
by one module. Paths that need several passes (randomized) take a callable that returns a fresh
iterable per pass; a one-shot iterator is materialized once.

Pure tensors: no files, no network. Bad arguments raise ValueError.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from flexlora_cli import flexlora, qr
from flexlora_cli.flexlora import LoraTerm, LowRank

EXACT_PATHS = ("stacked", "dense", "incremental")
RANDOMIZED_PATHS = ("randomized", "randomized-dense")  # implicit operator / dense accumulator
PATH_CHOICES = ("auto", *EXACT_PATHS)
SVD_MODES = ("exact", "randomized")

# Peak working memory the automatic choice may plan for, per module (the process adds ~0.4 GB for torch).
DEFAULT_MEMORY_BUDGET = 1536 * 2**20

# Gaussian probes for the energy the randomized SVD leaves out (Hutchinson's estimator).
_TAIL_PROBES = 32

# Columns of stacked clients per GEMM in the implicit operator (see _batched).
_BATCH_WIDTH = 256

# A fresh iterable of the module's client terms per call (for multi-pass paths), or the terms themselves.
TermSource = Callable[[], Iterable[LoraTerm]] | Iterable[LoraTerm]


@dataclass(frozen=True)
class Rates:
    """Throughput of the kernels each path spends its time in, to turn operation counts into seconds."""

    gemm: float  # matrix-multiply flops per second (fp32)
    gemm64: float  # fp64 matrix-multiply flops per second (the stacked path's Gram matrices)
    qr: float  # Householder QR flops per second (2 m n^2 - 2 n^3 / 3 for m >= n)
    svd: float  # thin-SVD "units" per second, one unit per entry of m x n times k = min(m, n)
    load: float  # client-factor elements read (and converted) per second, per pass


# Measured on this project's CI-class machine (AMD EPYC with AVX-512, MKL) with `python
# benchmarks/bench_clients.py --calibrate --threads 1` (2026-11-29, best of 3): on its two cores,
# shared with other jobs, one thread gives the reproducible rates; only their ratios matter here.
CPU_RATES = Rates(gemm=87e9, gemm64=52e9, qr=26e9, svd=3.1e9, load=1.9e8)
# Not calibrated (no GPU was available): GEMM and QR are far faster on a GPU while SVD stays
# comparatively slow, which moves the crossover towards the stacked path.
CUDA_RATES = Rates(gemm=4e13, gemm64=2e13, qr=1e12, svd=2e10, load=5e9)


@dataclass(frozen=True)
class TruncatedSVD(LowRank):
    """The top components of a matrix, and an estimate of the squared Frobenius norm of the rest.

    The shares of energy kept (flexlora.energy_kept) need the whole norm, not just the top part.
    """

    tail_energy: float = 0.0

    @property
    def spectrum(self) -> Tensor:
        """S with the left-out energy appended as one more value: shares up to rank k come out right."""
        return torch.cat([self.S, self.S.new_tensor([math.sqrt(max(self.tail_energy, 0.0))])])


@dataclass(frozen=True)
class PathPlan:
    """One way to compute a module's SVD, with its predicted cost."""

    path: str  # one of EXACT_PATHS or RANDOMIZED_PATHS
    seconds: float  # predicted time
    bytes: int  # predicted peak working memory
    bound: int | None = None  # incremental: re-compress when the running width exceeds this
    top_k: int | None = None  # randomized: components computed
    oversample: int = 0
    power_iters: int = 0

    @property
    def exact(self) -> bool:
        return self.path in EXACT_PATHS


# --- the cost model ---------------------------------------------------------------------------


def path_costs(
    d_out: int,
    d_in: int,
    ranks: Sequence[int],
    *,
    top_k: int | None = None,
    itemsize: int = 4,
    rates: Rates = CPU_RATES,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> dict[str, PathPlan]:
    """Predicted time and memory of every path for one module (randomized ones only with top_k).

    The incremental path's bound is the cheapest one whose memory fits `memory_budget` (or the
    smallest-memory one when none fits).
    """
    _check_shape(d_out, d_in, ranks)
    R = sum(ranks)
    plans = {
        "stacked": PathPlan("stacked", *_stacked_cost(d_out, d_in, R, itemsize, rates)),
        "dense": PathPlan("dense", *_dense_cost(d_out, d_in, R, itemsize, rates)),
        "incremental": _incremental_plan(d_out, d_in, ranks, itemsize, rates, memory_budget),
    }
    if top_k is not None:
        if top_k <= 0:
            raise ValueError(f"top_k must be positive, got {top_k}")
        oversample, power_iters = randomized_settings(top_k)
        width = min(top_k + oversample, d_out, d_in)
        for path in RANDOMIZED_PATHS:
            seconds, memory = _randomized_cost(d_out, d_in, R, width, power_iters, path == "randomized-dense", itemsize, rates)
            plans[path] = PathPlan(path, seconds, memory, None, min(top_k, d_out, d_in), oversample, power_iters)
    return plans


def choose_path(
    d_out: int,
    d_in: int,
    ranks: Sequence[int],
    *,
    svd: str = "exact",
    top_k: int | None = None,
    path: str = "auto",
    itemsize: int = 4,
    rates: Rates = CPU_RATES,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> PathPlan:
    """The path to run for one module: the fastest predicted one that fits `memory_budget`.

    With svd="randomized" (which needs `top_k`) the randomized paths join the candidates; an
    exact path still wins where it is predicted cheaper (few clients). `path` forces a path:
    under svd="randomized", "stacked" means the implicit operator and "dense" the dense one.
    When nothing fits the budget, the path with the smallest memory is taken.
    """
    if svd not in SVD_MODES:
        raise ValueError(f"svd must be one of {SVD_MODES}, got {svd!r}")
    if path not in PATH_CHOICES:
        raise ValueError(f"path must be one of {PATH_CHOICES}, got {path!r}")
    if svd == "randomized" and top_k is None:
        raise ValueError("the randomized SVD needs top_k, the largest rank that will be requested")
    randomized = svd == "randomized" and top_k is not None and top_k + randomized_settings(top_k)[0] < min(d_out, d_in)
    plans = path_costs(
        d_out, d_in, ranks, top_k=top_k if randomized else None, itemsize=itemsize, rates=rates, memory_budget=memory_budget
    )
    if path != "auto":
        if randomized:
            if path == "incremental":
                raise ValueError("the randomized SVD runs on the implicit (stacked) or dense operator, not incremental")
            return plans["randomized" if path == "stacked" else "randomized-dense"]
        return plans[path]
    fitting = [plan for plan in plans.values() if plan.bytes <= memory_budget]
    if not fitting:
        return min(plans.values(), key=lambda plan: plan.bytes)
    return min(fitting, key=lambda plan: plan.seconds)


def randomized_settings(top_k: int) -> tuple[int, int]:
    """(oversample, power iterations) of the range finder for k = top_k components.

    Measured on decaying spectra without a gap at k (80 clients, paper rank mix, 1024x1024):
    p = k and q = 3 give 1e-5 to 7e-5 relative error to the exact truncation at k = 16..200,
    where p = k / 2 gives up to 7e-4 and q = 2 up to 3e-4 (benchmarks/CLIENTS.md).
    """
    return max(10, top_k), 3


def _qr_flops(m: int, n: int) -> float:
    """Householder QR of an m x n matrix (reduced), either orientation."""
    long, short = max(m, n), min(m, n)
    return 2.0 * long * short * short - 2.0 * short**3 / 3


def _stacked_cost(d_out: int, d_in: int, R: int, itemsize: int, rates: Rates) -> tuple[float, int]:
    kb, ka = min(d_out, R), min(d_in, R)
    k = min(kb, ka)
    loading = R * (d_out + d_in) / rates.load
    if itemsize == 4 and qr.gram_qr_pays(d_out, d_in, R):
        # flexlora.factored_svd's Gram-matrix QR (qr.py): fp64 Gram matrices of both stacks, fp64 work on
        # R x R matrices (Cholesky, triangular inverse, core, coefficients), an fp32 SVD of the core and
        # one fp32 product per stack (columns built from nearly dependent directions run in fp64: unmodelled).
        gram = qr.gram_flops(d_out, R) + qr.gram_flops(d_in, R) + 10.0 * R**3
        seconds = gram / rates.gemm64 + 2.0 * (d_out + d_in) * R * k / rates.gemm + k**3 / rates.svd + loading
        # the clients' factors + their scaled stack + an fp64 copy of one stack (or, for columns that need it,
        # of the stack and its product) + results + R x R work
        elements = 3 * (d_out + d_in) * R + 2 * max(d_out, d_in) * (R + k) + (d_out + d_in) * k + 12 * R * R
        return seconds, elements * itemsize
    # Householder QR: fp64 factors, and stacks wider than qr.GRAM_MAX_WIDTH of the module.
    householder = _qr_flops(d_out, R) + _qr_flops(d_in, R)
    gemm = 2.0 * kb * R * ka + 2.0 * d_out * kb * k + 2.0 * k * ka * d_in
    seconds = householder / rates.qr + gemm / rates.gemm + kb * ka * k / rates.svd + loading
    # the clients' factors + their scaled stack + its Q's + the triangular factors + core SVD + results
    elements = 3 * (d_out + d_in) * R + (kb + ka) * R + 3 * kb * ka + (d_out + d_in) * k
    return seconds, elements * itemsize


def _dense_cost(d_out: int, d_in: int, R: int, itemsize: int, rates: Rates) -> tuple[float, int]:
    k = min(d_out, d_in)
    seconds = 2.0 * R * d_out * d_in / rates.gemm + d_out * d_in * k / rates.svd + R * (d_out + d_in) / rates.load
    # accumulator + LAPACK's working copy + U, Vh + divide-and-conquer workspace
    elements = 2 * d_out * d_in + (d_out + d_in) * k + 4 * k * k
    return seconds, elements * itemsize


def _incremental_schedule(ranks: Sequence[int], bound: int, d_min: int) -> list[int]:
    """Widths of the re-compressions the incremental path will do, assuming generic (full) rank."""
    widths, kept, pending = [], 0, 0
    for r in ranks:
        pending += r
        if kept + pending > bound:
            widths.append(kept + pending)
            kept, pending = min(kept + pending, d_min), 0
    if pending or not widths:
        widths.append(kept + pending)
    return widths


def _incremental_plan(d_out, d_in, ranks, itemsize, rates, memory_budget) -> PathPlan:
    d_min, R = min(d_out, d_in), sum(ranks)
    candidates = {min(R, b) for b in (2 * max(ranks), 256, 512, 1024, 2048, 4096, 8192, d_min, 2 * d_min, R) if b >= max(ranks)}
    plans = []
    for bound in sorted(candidates):
        widths = _incremental_schedule(ranks, bound, d_min)
        seconds = sum(_stacked_cost(d_out, d_in, w, itemsize, rates)[0] for w in widths)
        memory = max(_stacked_cost(d_out, d_in, w, itemsize, rates)[1] for w in widths)
        plans.append(PathPlan("incremental", seconds, memory, bound))
    fitting = [plan for plan in plans if plan.bytes <= memory_budget]
    if fitting:
        return min(fitting, key=lambda plan: plan.seconds)
    return min(plans, key=lambda plan: plan.bytes)


def _randomized_cost(d_out, d_in, R, width, power_iters, dense, itemsize, rates) -> tuple[float, int]:
    applications = 2 * power_iters + 2  # M Omega, (M^T, M) per power iteration, M^T Q at the end
    per_application = 2.0 * d_out * d_in * width if dense else 2.0 * R * (d_out + d_in) * width
    gemm = applications * per_application + 2.0 * d_out * width * (width + _TAIL_PROBES)
    householder = (2 * power_iters + 1) * _qr_flops(max(d_out, d_in), width)
    passes = 1 if dense else applications
    seconds = gemm / rates.gemm + householder / rates.qr + width * d_in * width / rates.svd + passes * R * (d_out + d_in) / rates.load
    if dense:
        seconds += 2.0 * R * d_out * d_in / rates.gemm
    elements = 4 * (d_out + d_in) * width + (d_out * d_in if dense else 0)
    return seconds, elements * itemsize


# --- the paths -----------------------------------------------------------------------------------


def stacked_svd(terms: TermSource, dtype: torch.dtype = torch.float32) -> LowRank:
    """The existing factored path (`flexlora.merge`): all clients stacked at once."""
    return flexlora.merge(_one_pass(terms), dtype)


def dense_accumulate(terms: TermSource, shape: tuple[int, int], dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """sum_i c_i B_i A_i in one d_out x d_in accumulator, one client at a time."""
    accumulator = torch.zeros(shape, dtype=dtype, device=device)
    seen = False
    for term in _one_pass(terms):
        accumulator.addmm_(term.B.to(accumulator), term.A.to(accumulator), alpha=term.coeff)
        seen = True
    if not seen:
        raise ValueError("need at least one LoRA term")
    return accumulator


def dense_streamed_svd(terms: TermSource, shape: tuple[int, int], dtype: torch.dtype = torch.float32, device=None) -> LowRank:
    """Exact SVD through the dense accumulator: memory is one module whatever the client count."""
    return flexlora.dense_svd(dense_accumulate(terms, shape, dtype, device))


def incremental_svd(terms: TermSource, bound: int, dtype: torch.dtype = torch.float32) -> LowRank:
    """Exact SVD by folding clients into a running factored form, re-compressed past `bound` columns.

    Each re-compression (`flexlora.merge` of the running form and the pending clients) keeps
    every component above rounding noise, so the result is exact for any bound; it is cheap
    while the bound stays above the true rank (otherwise it re-compresses at every client).
    """
    if bound <= 0:
        raise ValueError(f"bound must be positive, got {bound}")
    running: LowRank | None = None
    pending: list[LoraTerm] = []
    width = 0
    for term in _one_pass(terms):
        pending.append(term)
        width += term.B.shape[1]
        if width + _width(running) > bound:
            running, pending, width = _fold(running, pending, dtype), [], 0
    if running is None and not pending:
        raise ValueError("need at least one LoRA term")
    return _fold(running, pending, dtype) if pending else running


def randomized_svd(
    terms: TermSource,
    shape: tuple[int, int],
    top_k: int,
    *,
    oversample: int | None = None,
    power_iters: int | None = None,
    dense: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> TruncatedSVD:
    """Top `top_k` singular triplets of sum_i c_i B_i A_i by a randomized range finder.

    Halko, Martinsson & Tropp (2011), Algorithm 4.4 (subspace iteration, re-orthonormalized at
    every step), applied to the implicit operator X -> sum_i c_i B_i (A_i X) and its transpose,
    one pass over the clients per application; with `dense`, to the dense accumulator instead
    (one pass over the clients in all). Deterministic for a given seed.

    The energy outside the top `top_k` is the exact energy of the computed components past k
    plus a Hutchinson estimate of what the range misses, from a few extra probe columns in the
    last pass (an estimate of a small quantity, so the total is accurate).
    """
    d_out, d_in = shape
    if top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}")
    default_oversample, default_iters = randomized_settings(top_k)
    oversample = default_oversample if oversample is None else oversample
    power_iters = default_iters if power_iters is None else power_iters
    if oversample < 0 or power_iters < 0:
        raise ValueError("oversample and power_iters must not be negative")
    if dense:
        matrix = dense_accumulate(terms, shape, dtype, device)
        apply, apply_t = matrix.matmul, matrix.mT.matmul
    else:
        apply, apply_t = _implicit_operator(terms, shape, dtype, device)
    width = min(top_k + oversample, d_out, d_in)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    probe = torch.randn(d_in, width, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
    Q = _orthonormal(apply(probe))
    for _ in range(power_iters):
        Q = _orthonormal(apply(_orthonormal(apply_t(Q))))
    probes = torch.randn(d_out, _TAIL_PROBES, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
    probes = probes - Q @ (Q.mT @ probes)  # the part of the output space that Q misses
    both = apply_t(torch.cat([Q, probes], dim=1))
    U_small, S, Vh = torch.linalg.svd(both[:, :width].mT, full_matrices=False)  # Q^T M = U_small S Vh
    kept = min(top_k, width)
    missed = float((both[:, width:].double() ** 2).sum()) / _TAIL_PROBES
    svd = flexlora.canonical_signs(LowRank((Q @ U_small[:, :kept]), S[:kept], Vh[:kept]))
    return TruncatedSVD(svd.U, svd.S, svd.Vh, tail_energy=float((S[kept:].double() ** 2).sum()) + missed)


def run_path(plan: PathPlan, terms: TermSource, shape: tuple[int, int], dtype: torch.dtype = torch.float32, device=None) -> LowRank:
    """Run one planned path on a module's client terms."""
    if plan.path == "stacked":
        return stacked_svd(terms, dtype)
    if plan.path == "dense":
        return dense_streamed_svd(terms, shape, dtype, device)
    if plan.path == "incremental":
        return incremental_svd(terms, plan.bound or min(shape), dtype)
    if plan.path in RANDOMIZED_PATHS:
        return randomized_svd(
            terms, shape, plan.top_k, oversample=plan.oversample, power_iters=plan.power_iters,
            dense=plan.path == "randomized-dense", dtype=dtype, device=device,
        )
    raise ValueError(f"unknown path {plan.path!r}")


def truncation_error(approx: LowRank, exact: LowRank, rank: int) -> float:
    """||T_k(approx) - T_k(exact)||_F / ||T_k(exact)||_F at k = rank, without forming either.

    With X - Y = L @ Rt for L = [U_x S_x, -U_y S_y] and Rt = [Vh_x; Vh_y], ||X - Y||^2 is the sum
    of (L^T L) * (Rt Rt^T): small Gram matrices in fp64, free of the cancellation that
    ||X||^2 + ||Y||^2 - 2 <X, Y> suffers when the factors are only fp32-orthonormal.
    """
    X, Y = flexlora.truncate(approx, rank), flexlora.truncate(exact, rank)
    L = torch.cat([X.U.double() * X.S.double(), -Y.U.double() * Y.S.double()], dim=1)
    Rt = torch.cat([X.Vh.double(), Y.Vh.double()], dim=0)
    squared = float(((L.mT @ L) * (Rt @ Rt.mT)).sum())
    reference = float(((Y.U.double().mT @ Y.U.double()) * (Y.S.double()[:, None] * (Y.Vh.double() @ Y.Vh.double().mT) * Y.S.double())).sum())
    if reference == 0.0:
        return 0.0 if squared <= 0.0 else math.inf
    return math.sqrt(max(squared, 0.0) / reference)


# --- helpers ---------------------------------------------------------------------------------------


def _check_shape(d_out: int, d_in: int, ranks: Sequence[int]) -> None:
    if d_out <= 0 or d_in <= 0:
        raise ValueError(f"module shape must be positive, got {d_out}x{d_in}")
    if not ranks:
        raise ValueError("need at least one client rank")
    if any(r <= 0 for r in ranks):
        raise ValueError(f"client ranks must be positive, got {list(ranks)}")


def _one_pass(terms: TermSource) -> Iterable[LoraTerm]:
    return terms() if callable(terms) else terms


def _passes(terms: TermSource) -> Callable[[], Iterable[LoraTerm]]:
    """A function returning a fresh iterable per pass; a one-shot iterator is kept in memory once."""
    if callable(terms):
        return terms
    if not isinstance(terms, Sequence):
        terms = list(terms)
    return lambda: terms


def _implicit_operator(terms: TermSource, shape, dtype, device):
    """(X -> M X, Y -> M^T Y) for M = sum_i c_i B_i A_i, one pass over the clients per call."""
    fresh = _passes(terms)
    d_out, d_in = shape

    def apply(X: Tensor) -> Tensor:
        out = torch.zeros(d_out, X.shape[1], dtype=dtype, device=device)
        for B, A in _batched(fresh(), dtype, device):
            out.addmm_(B, A @ X)
        return out

    def apply_t(Y: Tensor) -> Tensor:
        out = torch.zeros(d_in, Y.shape[1], dtype=dtype, device=device)
        for B, A in _batched(fresh(), dtype, device):
            out.addmm_(A.mT, B.mT @ Y)
        return out

    return apply, apply_t


def _batched(terms: Iterable[LoraTerm], dtype, device, width: int = _BATCH_WIDTH):
    """Clients stacked into (c B_cat, A_cat) groups of about `width` columns.

    One rank-8 client alone makes a GEMM that mostly waits for memory; a few dozen together make
    one that computes. Memory stays at a group, not the whole stack.
    """
    group: list[LoraTerm] = []
    columns = 0
    for term in terms:
        group.append(LoraTerm(term.B.to(device), term.A.to(device), term.coeff))
        columns += term.B.shape[1]
        if columns >= width:
            yield flexlora.stack_terms(group, dtype)
            group, columns = [], 0
    if group:
        yield flexlora.stack_terms(group, dtype)


def _orthonormal(X: Tensor) -> Tensor:
    return torch.linalg.qr(X).Q


def _width(svd: LowRank | None) -> int:
    return 0 if svd is None else svd.S.numel()


def _fold(running: LowRank | None, pending: list[LoraTerm], dtype: torch.dtype) -> LowRank:
    """Exact SVD of running + pending, with rounding-noise components dropped."""
    parts = list(pending)
    if running is not None:
        parts.insert(0, LoraTerm(running.U * running.S, running.Vh, 1.0))
    svd = flexlora.merge(parts, dtype)
    if svd.S.numel() == 0:
        return svd
    # Stricter than numerical_rank's max(d) * eps: a decaying tail below that is still signal.
    noise = svd.S[0] * math.sqrt(max(svd.shape)) * torch.finfo(svd.S.dtype).eps
    kept = max(int((svd.S > noise).sum()), 1)
    return LowRank(svd.U[:, :kept], svd.S[:kept], svd.Vh[:kept])
