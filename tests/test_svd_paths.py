"""Every SVD path of svd_paths against an fp64 dense reference, the cost model, and the CLI wiring."""

from __future__ import annotations

import json
import math
import weakref

import pytest
import torch
from typer.testing import CliRunner

from conftest import reference_delta, relative_error
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


def truncated(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return (U[:, :rank] * S[:rank]) @ Vh[:rank]


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


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("k", [8, 24])
def test_randomized_is_within_its_tolerance_of_the_exact_truncation(dense, k):
    terms = decaying_terms(160, 120, [4] * 20 + [40] * 4, seed=3)
    expected = reference(terms)
    passes = [0]

    def source():
        passes[0] += 1
        return iter(terms)

    svd = svd_paths.randomized_svd(source, (160, 120), k, dense=dense)
    oversample, power_iters = svd_paths.randomized_settings(k)
    assert passes[0] == (1 if dense else 2 * power_iters + 2)
    assert svd.S.numel() == k
    exact = flexlora.dense_svd(expected)
    error = svd_paths.truncation_error(svd, exact, k)
    assert error <= 1e-3  # the documented tolerance on decaying spectra
    assert math.isclose(error, relative_error(svd.dense().double(), truncated(expected, k)), rel_tol=1e-3, abs_tol=1e-6)
    # the energy left out is estimated well enough for the shares of energy kept
    total = float(torch.linalg.norm(expected) ** 2)
    assert float((svd.spectrum.double() ** 2).sum()) == pytest.approx(total, rel=1e-3)
    assert flexlora.energy_kept(svd.spectrum, k) == pytest.approx(flexlora.energy_kept(exact.S, k), rel=1e-3)


def test_randomized_is_reproducible_for_a_seed():
    terms = decaying_terms(60, 50, [4, 8, 2, 8])
    first = svd_paths.randomized_svd(terms, (60, 50), 5, seed=7)
    second = svd_paths.randomized_svd(terms, (60, 50), 5, seed=7)
    assert torch.equal(first.U, second.U) and torch.equal(first.S, second.S)


def test_truncation_error_of_identical_truncations_is_zero_and_of_a_zero_is_one():
    terms = decaying_terms(40, 30, [6, 6])
    svd = svd_paths.stacked_svd(terms, torch.float64)
    assert svd_paths.truncation_error(svd, svd, 5) <= 1e-12
    zero = flexlora.LowRank(svd.U, torch.zeros_like(svd.S), svd.Vh)
    assert svd_paths.truncation_error(zero, svd, 5) == pytest.approx(1.0)


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
    rank = 6
    report = run_json("merge", *clients, "--rank", rank, "--svd", "randomized", "-o", tmp_path / "merged")
    assert report["svd"] == "randomized"
    checked = [m for m in report["modules"] if m["randomized_error"] is not None]
    assert checked and all(m["path"] in svd_paths.RANDOMIZED_PATHS for m in checked)
    assert report["randomized_error"] == max(m["randomized_error"] for m in checked)
    exact = run_json("merge", *clients, "--rank", rank, "-o", tmp_path / "exact")
    assert report["energy_kept"] == pytest.approx(exact["energy_kept"], rel=0.05)  # not 100%: the tail is estimated
    expected = reference_delta(clients)
    for module in checked:  # the reported error is the real one
        actual = merged_delta(tmp_path / "merged", module["name"])
        assert relative_error(actual, truncated(expected[module["name"]], rank)) == pytest.approx(module["randomized_error"], rel=1e-2, abs=1e-6)


@pytest.mark.parametrize("extra,option", [([], "--svd"), (["--rank", "4", "--dense"], "--dense"), (["--svd-path", "incremental"], "--svd-path")])
def test_randomized_without_a_rank_or_with_dense_output_is_refused(clients, tmp_path, extra, option):
    result = run_json("merge", *clients, "--svd", "randomized", *extra, "-o", tmp_path / "merged", code=2)
    assert option in result.stderr and not (tmp_path / "merged").exists()


def test_aggregate_randomized_gives_each_client_nearly_its_exact_truncation(clients, tmp_path):
    full = run_json("aggregate", *clients, "--svd", "randomized", "-o", tmp_path / "full")
    assert full["randomized_error"] is None  # top_k = 64 (carol) + oversampling >= 96: no gain, so exact
    exact = run_json("aggregate", *clients, "--ranks", "6", "-o", tmp_path / "exact")
    randomized = run_json("aggregate", *clients, "--ranks", "6", "--svd", "randomized", "-o", tmp_path / "randomized")
    assert exact["svd"] == "exact" and exact["randomized_error"] is None
    assert 0 < randomized["randomized_error"] < 0.2
    for before, after in zip(exact["clients"], randomized["clients"]):
        assert after["energy_kept"] == pytest.approx(before["energy_kept"], rel=0.05)
