"""How far a round trusts each client: update norms from the factors, clipping, and outlier screening.

Pure functions (tensors and numbers in, numbers out); no files. The round (api.aggregate) reads each
client's factors once before any module is merged, because a clip factor scales a client's whole
update and must be known first.

- **Norm.** ||dW_i||_F over all modules of client i, dW_im = s_im B_im A_im, from the factors:
  ||B A||_F^2 = trace((B^T B)(A A^T)), O((d_out + d_in) r^2) work and no d_out x d_in matrix. The two
  r x r Gram matrices are formed in `gram_dtype` and their product summed in fp64: with fp32 Grams the
  norm's relative error is about 1e-6 (measured on Llama-2-7B shapes), with fp64 about 1e-15.
- **Clip.** min(1, C / ||dW_i||_F): the client's update is scaled so its norm is at most C.
- **Screen** (the *per-rank log-MAD rule*). Score each client by its norm per unit of rank,
  ||dW_i||_F / sqrt(r_i) (r_i its mean rank over its modules), on a log scale; a client is flagged when its
  log score exceeds the median of all clients' by more than `threshold` robust standard deviations, the
  robust standard deviation being 1.4826 x the median absolute deviation of the log scores and never less
  than ln 2. Dividing by sqrt(r_i) keeps an honest high-rank client (whose update carries more
  components) from standing out; the log scale and the floor mean that at the default threshold 3.5 only a
  per-rank norm more than 2^3.5 ~ 11x the median one is flagged, however alike the other clients are.
  The rule is one-sided: a small update cannot take over the round. Clients with a zero update are never
  flagged and are left out of the statistics.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

SCREEN_THRESHOLD = 3.5  # Iglewicz & Hoaglin's cut-off for the modified z-score
MAD_TO_STD = 1.4826  # MAD x this estimates the standard deviation of normal data
MIN_LOG_SPREAD = math.log(2.0)  # the robust standard deviation of the log scores is never taken below this
MIN_SCREENED = 3  # a median of two cannot tell which one is the outlier


def update_norm_squared(B: Tensor, A: Tensor, gram_dtype: torch.dtype = torch.float64) -> float:
    """||B @ A||_F^2 from the factors: sum of (B^T B) * (A A^T) (both Grams are symmetric, so that sum is
    the trace of their product), the Grams in `gram_dtype`, their product summed in fp64."""
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"expected B (d_out x r) and A (r x d_in), got {tuple(B.shape)} and {tuple(A.shape)}")
    B, A = B.to(gram_dtype), A.to(gram_dtype)
    square = float(((B.mT @ B).double() * (A @ A.mT).double()).sum())
    return max(square, 0.0)  # rounding may leave a zero update a hair below zero


def client_norm(modules: Iterable[tuple[Tensor, Tensor, float]], gram_dtype: torch.dtype = torch.float64) -> float:
    """||dW||_F of one client over all its modules, given (B, A, PEFT scaling) per module."""
    total = math.fsum(scaling**2 * update_norm_squared(B, A, gram_dtype) for B, A, scaling in modules)
    return math.sqrt(total)


def clip_factors(norms: Sequence[float], clip: float) -> list[float]:
    """min(1, C / ||dW_i||_F) per client (1 for a zero update)."""
    if not (clip > 0 and math.isfinite(clip)):
        raise ValueError(f"the clipping norm must be positive and finite, got {clip!r}")
    return [1.0 if norm <= clip else clip / norm for norm in norms]


@dataclass(frozen=True)
class Screening:
    """The per-rank log-MAD rule's verdict: a robust z-score per client (None: zero update, not scored)."""

    scores: tuple[float | None, ...]
    threshold: float
    spread: float = MIN_LOG_SPREAD  # the robust standard deviation used (log scale)

    @property
    def flagged(self) -> list[int]:
        """Indices of the clients whose score exceeds the threshold."""
        return [i for i, z in enumerate(self.scores) if z is not None and z > self.threshold]

    def ratio(self, index: int) -> float | None:
        """How many times the median per-rank norm client `index`'s is (exp of its log distance)."""
        z = self.scores[index]
        return None if z is None else math.exp(z * self.spread)


def screen(norms: Sequence[float], ranks: Sequence[float], threshold: float = SCREEN_THRESHOLD) -> Screening:
    """Robust z-scores of the clients' log per-rank norms (see the module docstring).

    Raises ValueError for fewer than MIN_SCREENED clients, a non-positive threshold or rank.
    """
    if len(norms) != len(ranks):
        raise ValueError(f"got {len(norms)} norms and {len(ranks)} ranks")
    if len(norms) < MIN_SCREENED:
        raise ValueError(f"screening compares each client with the median of the others; it needs at least {MIN_SCREENED} clients, got {len(norms)}")
    if not (threshold > 0 and math.isfinite(threshold)):
        raise ValueError(f"the threshold must be positive and finite, got {threshold!r}")
    if any(not r > 0 for r in ranks):
        raise ValueError(f"ranks must be positive, got {list(ranks)}")
    logs = [math.log(n / math.sqrt(r)) if n > 0 else None for n, r in zip(norms, ranks)]
    scored = [value for value in logs if value is not None]
    if not scored:
        return Screening(tuple(None for _ in logs), threshold)
    center = statistics.median(scored)
    spread = max(MAD_TO_STD * statistics.median(abs(value - center) for value in scored), MIN_LOG_SPREAD)
    scores = tuple(None if value is None else (value - center) / spread for value in logs)
    return Screening(scores, threshold, spread)
