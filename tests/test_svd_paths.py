"""Every SVD path of svd_paths against an fp64 dense reference, the cost model, and the CLI wiring."""

from __future__ import annotations

import json
import math
import weakref

import pytest
import torch
from typer.testing import CliRunner

from conftest import energy_shares, reference_delta, relative_error, truncated, write_client
from flexlora_cli import flexlora, svd_paths
from flexlora_cli.cli.app import app


def decaying_terms(d_out: int, d_in: int, ranks: list[int], seed: int = 0, noise: float = 0.3) -> list[flexlora.LoraTerm]:
    """Clients sharing power-law directions 1/(1+j), each with its own perturbation: a decaying spectrum."""
    generator = torch.Generator().manual_seed(seed)
    K = max(ranks)
    U = torch.randn(d_out, K, generator=generator, dtype=torch.float64) / math.sqrt(d_out)
    V = torch.randn(d_in, K, generator=generator, dtype=torch.float64) / math.sqrt(d_in)
    sigma = 1.0 / (1.0 + torch.arange(K, dtype=torch.float64))
    terms = []
    for r in ranks:
        B = (U[:, :r] + noise * torch.randn(d_out, r, generator=generator, dtype=torch.float64) / math.sqrt(d_out)) * sigma[:r]
        A = (V[:, :r] + noise * torch.randn(d_in, r, generator=generator, dtype=torch.float64) / math.sqrt(d_in)).mT
        terms.append(flexlora.LoraTerm(B, A, float(torch.rand((), generator=generator)) + 0.5))
    return terms


def reference(terms: list[flexlora.LoraTerm]) -> torch.Tensor:
    return sum(term.coeff * term.B.double() @ term.A.double() for term in terms)


def geometric_terms(d_out: int, d_in: int, ranks: list[int], rho: float, seed: int = 0) -> list[flexlora.LoraTerm]:
    """Clients whose weighted sum has exactly the singular values rho^j, j < sum(ranks) (fp64).

    Client i holds every len(ranks)-th direction, so each client has large and small components.
    """
    generator = torch.Generator().manual_seed(seed)
    K = sum(ranks)
    U = torch.linalg.qr(torch.randn(d_out, K, generator=generator, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(d_in, K, generator=generator, dtype=torch.float64)).Q
    sigma = rho ** torch.arange(K, dtype=torch.float64)
    order = torch.cat([torch.arange(i, K, len(ranks)) for i in range(len(ranks))])
    terms, start = [], 0
    for r in ranks:
        columns = order[start : start + r]
        start += r
        coeff = float(torch.rand((), generator=generator)) + 0.5
        terms.append(flexlora.LoraTerm(U[:, columns] * sigma[columns] / coeff, V[:, columns].mT, coeff))
    return terms


def documented_settings(k: int) -> tuple[int, int]:
    """(oversample p, power iterations q) as svd_paths.randomized_settings documents them (and CLIENTS.md)."""
    return max(10, k), 3


def rate_bound(S: torch.Tensor, k: int) -> float:
    """The error subspace iteration promises for the rank-k result, relative to ||T_k(M)||_F: 10 gamma^(2q+1).

    With an l = k + p column Gaussian start and q power iterations, the computed range holds the top-k
    singular subspace to tan(theta) <= C gamma^(2q+1), gamma = sigma_{l+1} / sigma_k (Halko, Martinsson &
    Tropp 2011, sec. 4.5 and Thm 9.2; Gu 2015 for the sigma_{l+1} form): the error is relative to the
    singular values past the range, so it vanishes where the spectrum has decayed by k + p. C depends on
    the Gaussian start; its typical size here is (sqrt(d_in - k) + sqrt(l)) / (sqrt(l) - sqrt(k)) = 8..11,
    so 10 is used: the rate with a typical constant, not a worst case (measured C <= 1.7 over 24 seeds).
    """
    p, q = documented_settings(k)
    width = k + p
    gamma = float(S[width] / S[k - 1]) if width < S.numel() else 0.0
    return 10 * gamma ** (2 * q + 1)


def dense64(svd: flexlora.LowRank) -> torch.Tensor:
    """U diag(S) Vh multiplied out in fp64 (an fp32 product would add its own rounding)."""
    return (svd.U.double() * svd.S.double()) @ svd.Vh.double()


# fp32 rounding of the exact paths against the fp64 reference (test_exact_paths_match_the_fp64_reference)
FP32_FLOOR = 1e-5


# Few clients (R < d), many clients (R > d), and a tall module; float32 factors as clients send them.
CASES = [(60, 50, [4, 8, 2]), (40, 30, [8, 8, 16, 4, 8]), (90, 24, [3, 5, 8, 8])]


@pytest.mark.parametrize("d_out,d_in,ranks", CASES)
@pytest.mark.parametrize("path,bound", [("stacked", None), ("dense", None), ("incremental", 12), ("incremental", 5)])
def test_exact_paths_match_the_fp64_reference(d_out, d_in, ranks, path, bound):
    terms = [flexlora.LoraTerm(t.B.float(), t.A.float(), t.coeff) for t in decaying_terms(d_out, d_in, ranks)]
    expected = reference(terms)
    plan = svd_paths.PathPlan(path, 0.0, 0, bound=bound)
    svd = svd_paths.run_path(plan, iter(terms), (d_out, d_in))  # a one-shot iterator: clients streamed once
    assert relative_error(svd.dense().double(), expected) <= 1e-5
    k = 6
    assert relative_error(flexlora.truncate(svd, k).dense().double(), truncated(expected, k)) <= 1e-5
    assert torch.allclose(svd.S[: min(svd.S.numel(), 10)].double(), torch.linalg.svdvals(expected)[: min(svd.S.numel(), 10)], rtol=1e-5, atol=1e-7)


def test_incremental_bound_below_the_true_rank_stays_exact_in_fp64():
    terms = decaying_terms(50, 40, [8] * 9)  # R = 72 > rank 40; bound 10 forces a fold at nearly every client
    svd = svd_paths.incremental_svd(iter(terms), bound=10, dtype=torch.float64)
    assert relative_error(svd.dense(), reference(terms)) <= 1e-12
    assert svd.S.numel() == 40  # rounding-noise components dropped, the true rank kept


def test_dense_path_holds_one_client_at_a_time():
    alive, peak = set(), [0]

    def stream():
        for index, base in enumerate(decaying_terms(30, 20, [4] * 12)):
            term = flexlora.LoraTerm(base.B.clone(), base.A.clone(), base.coeff)  # as if read from its file now
            alive.add(index)
            weakref.finalize(term, alive.discard, index)
            peak[0] = max(peak[0], len(alive))
            yield term
            del term

    svd_paths.dense_streamed_svd(stream(), (30, 20))
    assert peak[0] <= 2


def test_randomized_settings_are_the_documented_ones():
    assert [svd_paths.randomized_settings(k) for k in (1, 8, 10, 24, 200)] == [(10, 3), (10, 3), (10, 3), (24, 3), (200, 3)]
    assert all(svd_paths.randomized_settings(k) == documented_settings(k) for k in range(1, 300))


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("k", [8, 24])
def test_randomized_meets_the_subspace_iteration_rate(dense, k):
    """A geometric spectrum 0.8^j, where the promise is strong: 10 gamma^7 = 3.5e-7 at k = 8, 1e-16 at
    k = 24. In fp64 that is the whole error (measured 1.4e-8 and 3e-15; q = 2 gives 2.2e-6, q = 1 or
    p = 5 far more); in fp32, as the CLI computes, rounding adds up to FP32_FLOOR (measured 8e-7)."""
    d_out, d_in = 160, 120
    terms64 = geometric_terms(d_out, d_in, [4] * 10 + [40] * 2, rho=0.8)
    expected = reference(terms64)
    S = torch.linalg.svdvals(expected)
    bound = rate_bound(S, k)
    method_error = relative_error(dense64(svd_paths.randomized_svd(terms64, (d_out, d_in), k, dense=dense, dtype=torch.float64)), truncated(expected, k))
    assert method_error <= bound + 1e-12, (method_error, bound)

    terms = [flexlora.LoraTerm(t.B.float(), t.A.float(), t.coeff) for t in terms64]
    passes = [0]

    def source():
        passes[0] += 1
        return iter(terms)

    svd = svd_paths.randomized_svd(source, (d_out, d_in), k, dense=dense)
    oversample, power_iters = svd_paths.randomized_settings(k)
    assert passes[0] == (1 if dense else 2 * power_iters + 2)
    assert svd.S.numel() == k
    error = relative_error(dense64(svd), truncated(expected, k))  # dense fp64 reference
    assert error <= bound + FP32_FLOOR, (error, bound)
    # singular values: sigma_j / sqrt(1 + (C gamma_j^(2q+1))^2) <= S_j <= sigma_j (Gu 2015), and gamma_j <= gamma
    assert torch.allclose(svd.S.double(), S[:k], rtol=bound**2 + FP32_FLOOR, atol=0)
    # The energy left out: the computed values past k are exact; Hutchinson's estimate of what the range
    # misses (32 Gaussian probes: relative standard deviation sqrt(2/32) = 0.25) is allowed 3 deviations
    # of the least it can be, sum_{j > l} sigma_j^2 (3.2e-4 of the total at k = 8; at k = 24, 5e-10, below
    # fp32 rounding of the total).
    total = float(torch.linalg.norm(expected) ** 2)
    missed = float((S[k + oversample :] ** 2).sum())
    assert abs(float((svd.spectrum.double() ** 2).sum()) - total) <= 0.75 * missed + 1e-6 * total
    assert flexlora.energy_kept(svd.spectrum, k) == pytest.approx(energy_shares({"m": expected}, k)[0], abs=0.75 * missed / total + 1e-6)


def test_randomized_is_reproducible_for_a_seed():
    terms = decaying_terms(60, 50, [4, 8, 2, 8])
    first = svd_paths.randomized_svd(terms, (60, 50), 5, seed=7)
    second = svd_paths.randomized_svd(terms, (60, 50), 5, seed=7)
    assert torch.equal(first.U, second.U) and torch.equal(first.S, second.S)


@pytest.mark.parametrize("power_iters,rel", [(0, 1e-9), (3, 1e-3)])
def test_truncation_error_equals_the_dense_fp64_difference(power_iters, rel):
    """Against ||T_k(X) - T_k(Y)||_F / ||T_k(Y)||_F formed densely in fp64. A large difference (no power
    iterations: 9e-3) to 1e-9; a tiny one (q = 3: 4.6e-7, fp32 rounding) to 1e-3 (fp64 cancellation in
    a squared norm of 2e-13), which the cancellation-free Gram form reaches and sum(S_x^2) + sum(S_y^2)
    - 2<X, Y> (exact only for orthonormal factors; these are fp32) misses by 1000x."""
    terms = [flexlora.LoraTerm(t.B.float(), t.A.float(), t.coeff) for t in decaying_terms(60, 50, [6, 6, 8])]
    expected = reference(terms)
    exact = flexlora.dense_svd(expected)
    approx = svd_paths.randomized_svd(terms, (60, 50), 5, power_iters=power_iters)  # fp32 factors
    k = 5
    dense = relative_error(dense64(flexlora.truncate(approx, k)), truncated(expected, k))
    assert dense > 1e-7  # a real difference, far above the fp64 rounding of the formula
    assert svd_paths.truncation_error(approx, exact, k) == pytest.approx(dense, rel=rel)
    zero = flexlora.LowRank(exact.U, torch.zeros_like(exact.S), exact.Vh)
    assert svd_paths.truncation_error(zero, exact, k) == pytest.approx(1.0, rel=1e-12)


def test_cost_model_picks_stacked_for_few_clients_and_dense_for_many():
    assert svd_paths.choose_path(4096, 4096, [8, 16, 64]).path == "stacked"
    assert svd_paths.choose_path(4096, 4096, [8] * 850 + [200] * 150).path == "dense"
    # stacking 1,000 clients needs several GB: it must not be chosen, whatever its speed
    assert svd_paths.path_costs(4096, 4096, [8] * 850 + [200] * 150)["stacked"].bytes > svd_paths.DEFAULT_MEMORY_BUDGET


def test_cost_model_crossover_moves_with_r_over_d():
    choices = [svd_paths.choose_path(2048, 2048, [8] * n).path for n in (8, 64, 512, 4096)]
    assert choices[0] == "stacked" and choices[-1] == "dense"
    assert choices == sorted(choices, key=["stacked", "dense"].index)  # one crossover, no flip-flopping


def test_when_nothing_fits_the_budget_the_smallest_memory_path_is_taken():
    # a 128k-vocabulary head with 400 clients: dense needs ~6 GiB, stacked ~5 GiB
    plans = svd_paths.path_costs(128256, 4096, [8] * 400)
    plan = svd_paths.choose_path(128256, 4096, [8] * 400, memory_budget=512 * 2**20)
    assert plan.bytes == min(p.bytes for p in plans.values()) > 512 * 2**20


def test_incremental_stays_small_when_clients_share_directions(monkeypatch):
    # 30 clients spanning the same 8 directions: the running form never grows past rank 8
    shared = decaying_terms(200, 150, [8])[0]
    generator = torch.Generator().manual_seed(1)
    terms = [flexlora.LoraTerm(shared.B @ torch.randn(8, 8, generator=generator, dtype=torch.float64), shared.A, 0.1) for _ in range(30)]
    widths = []
    original_merge = flexlora.merge

    def spy(parts, dtype):
        widths.append(sum(part.B.shape[1] for part in parts))
        return original_merge(parts, dtype)

    monkeypatch.setattr(flexlora, "merge", spy)
    svd = svd_paths.incremental_svd(iter(terms), bound=24, dtype=torch.float64)
    assert svd.S.numel() == 8 and max(widths) <= 24 + 8
    assert relative_error(svd.dense(), reference(terms)) <= 1e-12


def test_randomized_is_offered_only_where_it_pays():
    many = [8] * 850 + [200] * 150
    assert svd_paths.choose_path(4096, 4096, many, svd="randomized", top_k=200).path in svd_paths.RANDOMIZED_PATHS
    assert svd_paths.choose_path(4096, 4096, [8, 16], svd="randomized", top_k=16).path == "stacked"
    assert svd_paths.choose_path(64, 64, [8] * 40, svd="randomized", top_k=40).exact  # k + oversample >= d
    assert svd_paths.choose_path(4096, 4096, many, svd="randomized", top_k=200, path="dense").path == "randomized-dense"


@pytest.mark.parametrize(
    "kwargs",
    [dict(ranks=[]), dict(ranks=[0, 8]), dict(svd="fast"), dict(path="qr"), dict(svd="randomized"), dict(svd="randomized", top_k=8, path="incremental")],
)
def test_bad_arguments_raise_value_error(kwargs):
    arguments = {"ranks": [8, 8], **kwargs}
    with pytest.raises(ValueError):
        svd_paths.choose_path(4096, 4096, arguments.pop("ranks"), **arguments)


# --- through the CLI: real PEFT adapters, the engine's lazy per-client reads ---------------------

runner = CliRunner()


def run_json(*args, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args] + ["--json"])
    assert result.exit_code == code, result.output
    return json.loads(result.stdout) if code == 0 else result


def merged_delta(folder, name):
    from safetensors.torch import load_file

    state = load_file(str(folder / "adapter_model.safetensors"))
    prefix = f"base_model.model.{name}"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["lora_alpha"] == config["r"]  # scaling 1 everywhere
    return state[prefix + ".lora_B.weight"].double() @ state[prefix + ".lora_A.weight"].double()


@pytest.mark.parametrize("path", ["stacked", "dense", "incremental"])
def test_merge_through_every_exact_path_matches_the_reference(clients, tmp_path, path):
    report = run_json("merge", *clients, "--weights", "3,1,2", "--svd-path", path, "-o", tmp_path / "merged")
    expected = reference_delta(clients, [3, 1, 2])
    assert {module["path"] for module in report["modules"]} == {path}
    for name, delta in expected.items():
        assert relative_error(merged_delta(tmp_path / "merged", name), delta) <= 1e-5


def test_merge_randomized_reports_its_error_against_the_exact_truncation(clients, tmp_path):
    """On the fixture's flat spectra the randomized error is large (~1e-2: the bound does not hold there),
    which makes the reported value checkable against the real one, measured on the written file."""
    rank = 6
    report = run_json("merge", *clients, "--rank", rank, "--svd", "randomized", "-o", tmp_path / "merged")
    assert report["svd"] == "randomized"
    checked = [m for m in report["modules"] if m["randomized_error"] is not None]
    assert checked and all(m["path"] in svd_paths.RANDOMIZED_PATHS for m in checked)
    assert report["randomized_error"] == max(m["randomized_error"] for m in checked)
    expected = reference_delta(clients)
    for module in checked:  # the reported error is the real one (it is measured against the fp32 exact path)
        actual = merged_delta(tmp_path / "merged", module["name"])
        real = relative_error(actual, truncated(expected[module["name"]], rank))
        assert real > 1e-4 and real == pytest.approx(module["randomized_error"], rel=1e-3)


@pytest.fixture(scope="module")
def geometric_clients(tmp_path_factory) -> list:
    """Three rank-16 PEFT clients whose merged update has singular values 0.9^j, j < 48, in every module.

    Written by PEFT (write_client), then their factors replaced by geometric_terms' (scaling 2, weight 1/3).
    """
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("geometric")
    folders = [write_client(root / f"client{i}", 16, seed=i) for i in range(3)]
    states = [load_file(str(folder / "adapter_model.safetensors")) for folder in folders]
    for seed, a_key in enumerate(sorted(k for k in states[0] if k.endswith("lora_A.weight"))):
        b_key = a_key.replace("lora_A", "lora_B")
        d_out, d_in = states[0][b_key].shape[0], states[0][a_key].shape[1]
        for state, term in zip(states, geometric_terms(d_out, d_in, [16, 16, 16], rho=0.9, seed=seed)):
            coeff = (1 / 3) * 2.0  # uniform weight x PEFT scaling alpha / r
            state[b_key], state[a_key] = (term.B * term.coeff / coeff).float().contiguous(), term.A.float().contiguous()
    for folder, state in zip(folders, states):
        save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folders


def assert_energy_within_the_estimate(actual: float, expected: dict, kept: int, width: int) -> None:
    """A randomized share of energy kept: exact but for Hutchinson's estimate of the energy the range misses
    (3 standard deviations of sqrt(2/32) on at least sum_{j > width} sigma_j^2 per module)."""
    total = sum(float(torch.linalg.norm(delta) ** 2) for delta in expected.values())
    missed = sum(float((torch.linalg.svdvals(delta)[width:] ** 2).sum()) for delta in expected.values())
    overall, _ = energy_shares(expected, kept)
    assert actual == pytest.approx(overall, abs=0.75 * missed / total + 1e-6)


@pytest.mark.parametrize("path", ["stacked", "dense"])  # the implicit operator, the dense accumulator
def test_merge_randomized_is_within_the_bound_on_a_decaying_spectrum(geometric_clients, tmp_path, path):
    rank = 6
    report = run_json("merge", *geometric_clients, "--rank", rank, "--svd", "randomized", "--svd-path", path, "-o", tmp_path / "merged")
    expected = reference_delta(geometric_clients)
    assert {m["path"] for m in report["modules"]} == {"randomized" if path == "stacked" else "randomized-dense"}
    for module in report["modules"]:
        delta = expected[module["name"]]
        bound = rate_bound(torch.linalg.svdvals(delta), rank) + FP32_FLOOR  # 10 (0.9^11)^7 = 3e-3; measured 4e-5..5e-4
        assert relative_error(merged_delta(tmp_path / "merged", module["name"]), truncated(delta, rank)) <= bound
        if module["randomized_error"] is not None:
            assert module["randomized_error"] <= bound
    oversample, _ = documented_settings(rank)
    assert_energy_within_the_estimate(report["energy_kept"], expected, rank, rank + oversample)


@pytest.mark.parametrize("extra,option", [([], "--svd"), (["--rank", "4", "--dense"], "--dense"), (["--svd-path", "incremental"], "--svd-path")])
def test_randomized_without_a_rank_or_with_dense_output_is_refused(clients, tmp_path, extra, option):
    result = run_json("merge", *clients, "--svd", "randomized", *extra, "-o", tmp_path / "merged", code=2)
    assert option in result.stderr and not (tmp_path / "merged").exists()


def test_aggregate_randomized_is_exact_where_it_cannot_gain(clients, tmp_path):
    full = run_json("aggregate", *clients, "--svd", "randomized", "-o", tmp_path / "full")
    assert full["randomized_error"] is None  # top_k = 64 (carol) + oversampling >= 96: no gain, so exact
    assert {m["path"] for m in full["modules"]} <= set(svd_paths.EXACT_PATHS)


def test_aggregate_randomized_gives_each_client_nearly_its_exact_truncation(geometric_clients, tmp_path):
    rank = 6
    exact = run_json("aggregate", *geometric_clients, "--ranks", rank, "-o", tmp_path / "exact")
    randomized = run_json("aggregate", *geometric_clients, "--ranks", rank, "--svd", "randomized", "--svd-path", "dense", "-o", tmp_path / "randomized")
    assert exact["svd"] == "exact" and exact["randomized_error"] is None
    expected = reference_delta(geometric_clients)
    bound = max(rate_bound(torch.linalg.svdvals(d), rank) for d in expected.values()) + FP32_FLOOR
    assert 0 < randomized["randomized_error"] <= bound
    oversample, _ = documented_settings(rank)
    for before, after in zip(exact["clients"], randomized["clients"]):
        assert before["energy_kept"] == pytest.approx(energy_shares(expected, rank)[0], rel=1e-5)
        assert_energy_within_the_estimate(after["energy_kept"], expected, rank, rank + oversample)
