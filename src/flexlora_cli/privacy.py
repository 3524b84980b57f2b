"""Central differential privacy for a round: the settings, the Gaussian noise, and the accounting.

The mechanism (client-level DP, add/remove-one-client adjacency): every client's whole update is clipped
to Frobenius norm C (flexlora_cli.trust), the clipped updates are summed with weights w_i fixed in
advance and public, and Gaussian noise of standard deviation sigma * C * max_i w_i is added to every entry
of every module's full-size sum. Adding or removing one client changes that sum (all modules together)
by at most max_i w_i * C in L2 norm, so this is the Gaussian mechanism with noise multiplier sigma; the
SVD truncation to each client's rank afterwards is post-processing.

Accounting is Google's `dp-accounting` package (its RDP accountant; imported only when used): each
round is a PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), composed over the rounds in the ledger.

No files here (the ledger file is flexlora_cli.adapters.ledger). Math functions raise ValueError;
`Privacy` refuses bad settings with OptionError, as flexlora_cli.compute.Compute does.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import secrets
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from flexlora_cli.errors import OptionError

DEFAULT_DELTA = 1e-5
ACCOUNTANT = "RDP"
INSTALL_HINT = "pip install 'flexlora-cli[privacy]' (or pip install dp-accounting)"

# (shape, dtype, device) -> a tensor of independent N(0, std^2) entries: what a method adds to a module.
NoiseFn = Callable[[tuple[int, int], torch.dtype, torch.device], Tensor]


@dataclass(frozen=True)
class Privacy:
    """The DP settings of a round (the clipping norm C is aggregate's `clip`, which DP requires).

    noise: the noise multiplier sigma (std sigma * C * max_i w_i per entry). delta: the delta of the
    (epsilon, delta) reported. sampling_rate: the probability q with which each client of the federation
    took part in this round, sampled independently by whoever ran the round (1.0: every client, every
    round). ledger: the file that carries the rounds so far from round to round (None: this round
    only). seed: makes the noise reproducible (tests only: whoever knows it can remove the noise); None
    draws each module's seed from the OS's secure source.
    """

    noise: float
    delta: float = DEFAULT_DELTA
    sampling_rate: float = 1.0
    ledger: Path | str | None = None
    seed: int | None = None

    def __post_init__(self):
        if not _finite_number(self.noise) or self.noise <= 0:
            raise OptionError.argument("dp_noise", f"the noise multiplier must be positive, got {self.noise!r}")
        if not _finite_number(self.delta) or not 0 < self.delta < 1:
            raise OptionError.argument("dp_delta", f"must be in (0, 1), e.g. 1e-5, got {self.delta!r}")
        if not _finite_number(self.sampling_rate) or not 0 < self.sampling_rate <= 1:
            raise OptionError.argument("dp_sampling_rate", f"must be in (0, 1] (1: every client takes part in every round), got {self.sampling_rate!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**64):
            raise OptionError.argument("seed", f"must be an integer in [0, 2^64), got {self.seed!r}")
        if self.ledger is not None:
            object.__setattr__(self, "ledger", Path(self.ledger))


def noise_std(noise_multiplier: float, clip: float, weights: Sequence[float]) -> float:
    """sigma * C * max_i w_i: the L2 sensitivity of the weighted sum of clipped updates, times sigma."""
    if not weights or min(weights) < 0:
        raise ValueError(f"need non-negative weights, got {list(weights)}")
    return noise_multiplier * clip * max(weights)


def module_noise(std: float, name: str, seed: int | None = None, round_key: str = "") -> NoiseFn:
    """The noise of one module: N(0, std^2) per entry, from a generator seeded by (seed, round_key, module
    name), or with seed None by 64 bits from the OS's secure source (`secrets`), drawn when the noise is and
    kept nowhere. Seeding by name makes a module's noise independent of which other modules the round has;
    `round_key` (the ledger's federation and round number) makes one seed give each round its own noise (the
    same noise twice would cancel in the difference of two rounds)."""
    if not (std > 0 and math.isfinite(std)):
        raise ValueError(f"the noise standard deviation must be positive and finite, got {std!r}")

    def draw(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> Tensor:
        generator = torch.Generator(device=device)
        generator.manual_seed(_module_seed(seed, name, round_key) if seed is not None else secrets.randbits(64))
        return torch.randn(shape, generator=generator, dtype=dtype, device=device).mul_(std)

    return draw


def noisy_dense_svd(terms, shape: tuple[int, int], noise: NoiseFn, dtype: torch.dtype, device=None):
    """SVD of sum_i c_i B_i A_i + noise, the sum built in one dense d_out x d_in accumulator."""
    from flexlora_cli import flexlora, svd_paths

    delta = svd_paths.dense_accumulate(terms, shape, dtype, device)
    delta += noise(shape, delta.dtype, delta.device)
    return flexlora.dense_svd(delta)


def epsilon(rounds: Sequence[tuple[float, float]], delta: float) -> float:
    """The epsilon at `delta` of these rounds, each (noise multiplier, sampling rate), composed by
    dp-accounting's RDP accountant under add/remove-one adjacency."""
    if not rounds:
        raise ValueError("need at least one round")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    dp = load_accounting()
    accountant = dp.rdp.RdpAccountant(neighboring_relation=dp.NeighboringRelation.ADD_OR_REMOVE_ONE)
    with _quiet_absl():  # the RDP orders are computed as events are composed
        for (sigma, rate), count in sorted(Counter((float(s), float(q)) for s, q in rounds).items()):
            event = dp.PoissonSampledDpEvent(rate, dp.GaussianDpEvent(sigma))
            accountant.compose(dp.SelfComposedDpEvent(event, count))
        return float(accountant.get_epsilon(delta))


def calibrate_noise(target_epsilon: float, delta: float, rounds: int, sampling_rate: float = 1.0) -> float:
    """The smallest noise multiplier whose `rounds` rounds at `sampling_rate` stay within (target_epsilon,
    delta), by dp-accounting's calibration over its RDP accountant (for choosing --dp-noise)."""
    if not (target_epsilon > 0 and rounds >= 1 and 0 < sampling_rate <= 1 and 0 < delta < 1):
        raise ValueError("need target_epsilon > 0, rounds >= 1, sampling_rate in (0, 1] and delta in (0, 1)")
    dp = load_accounting()

    def event(sigma: float):
        return dp.SelfComposedDpEvent(dp.PoissonSampledDpEvent(sampling_rate, dp.GaussianDpEvent(sigma)), int(rounds))

    with _quiet_absl():
        return float(dp.calibrate_dp_mechanism(dp.rdp.RdpAccountant, event, target_epsilon, delta))


def load_accounting():
    """The dp_accounting package (with its rdp module), or OptionError saying how to install it."""
    try:
        import dp_accounting
        import dp_accounting.rdp  # noqa: F401  (a submodule the package does not always import)
    except ImportError:
        raise OptionError.argument("dp_noise", "needs the dp-accounting package for its privacy accounting", hint=INSTALL_HINT) from None
    return dp_accounting


def accountant_name() -> str:
    """How reports name the accountant, with the package's version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{ACCOUNTANT} (dp-accounting {version('dp-accounting')})"
    except PackageNotFoundError:
        return f"{ACCOUNTANT} (dp-accounting)"


def _module_seed(seed: int, name: str, round_key: str = "") -> int:
    key = f"flexlora-dp-noise:{seed}:{round_key}:{name}" if round_key else f"flexlora-dp-noise:{seed}:{name}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """dp-accounting logs (through absl) every RDP order it skips; that is not the user's business."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
