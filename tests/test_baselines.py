"""Baseline aggregators: hand-checked small cases for the math, then `aggregate --method` end to end."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import peft_deltas, raw_factors, reference_delta, relative_error, write_client
from flexlora_cli import baselines, flexlora, svd_paths
from flexlora_cli.cli.app import app

runner = CliRunner()

T = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731

# Client 1 at rank 1, client 2 at rank 2, both 2x2 updates.
B1, A1 = T([[1], [2]]), T([[3, 4]])
B2, A2 = T([[1, 0], [0, 1]]), T([[1, 1], [2, 0]])


def test_hetlora_zero_pads_averages_and_slices_by_hand():
    (b1, a1), (b2, a2) = baselines.hetlora([(B1, A1), (B2, A2)], weights=[1, 3], dtype=torch.float64)
    # Shares 1/4, 3/4. B1 padded is [[1,0],[2,0]], A1 padded is [[3,4],[0,0]].
    B_avg, A_avg = T([[1, 0], [0.5, 0.75]]), T([[1.5, 1.75], [1.5, 0]])
    torch.testing.assert_close(b2, B_avg)
    torch.testing.assert_close(a2, A_avg)
    torch.testing.assert_close(b1, B_avg[:, :1])
    torch.testing.assert_close(a1, A_avg[:1])


def test_hetlora_rank_override_and_its_limit():
    (small, _), (big, _) = baselines.hetlora([(B1, A1), (B2, A2)], ranks=[2, 1], dtype=torch.float64)
    assert small.shape == (2, 2) and big.shape == (2, 1)
    with pytest.raises(ValueError, match="largest client rank 2"):
        baselines.hetlora([(B1, A1), (B2, A2)], ranks=[3, 1])


def test_fedavg_averages_factors_not_updates_by_hand():
    Bb, Ab = T([[3], [0]]), T([[1, 0]])
    B, A = baselines.fedavg([(B1, A1), (Bb, Ab)], dtype=torch.float64)
    torch.testing.assert_close(B, T([[2], [1]]))
    torch.testing.assert_close(A, T([[2, 2]]))
    # The product of the averages is not the average of the products (what FlexLoRA keeps).
    assert not torch.allclose(B @ A, (B1 @ A1 + Bb @ Ab) / 2)


def test_fedavg_refuses_unequal_ranks():
    with pytest.raises(ValueError, match="needs equal ranks, got \\[1, 2\\]"):
        baselines.fedavg([(B1, A1), (B2, A2)])


def test_flora_stacks_exactly_with_weights_in_A_by_hand():
    Bb, Ab = T([[3], [0]]), T([[1, 0]])
    terms = [flexlora.LoraTerm(B1, A1, 0.5), flexlora.LoraTerm(Bb, Ab, 2.0)]
    B, A = baselines.flora(terms, dtype=torch.float64)
    torch.testing.assert_close(B, T([[1, 3], [2, 0]]))
    torch.testing.assert_close(A, T([[1.5, 2], [2, 0]]))
    torch.testing.assert_close(B @ A, T([[7.5, 2], [3, 4]]))  # 0.5 B1 A1 + 2 Bb Ab
    torch.testing.assert_close(B @ A, svd_paths.dense_accumulate(terms, (2, 2), torch.float64))


@pytest.mark.parametrize(
    "factors, message",
    [
        ([], "at least one"),
        ([(B1, A1), (T([[1, 0, 0]]).T, T([[1, 1, 1]]))], "update is 3x3"),
        ([(B1, A2)], "ranks differ"),
    ],
)
def test_bad_factors_raise_value_error(factors, message):
    for aggregate in (baselines.hetlora, baselines.fedavg):
        with pytest.raises(ValueError, match=message):
            aggregate(factors)


# ---- `flexlora aggregate --method ...` on real PEFT folders -------------------------------------


def run(*args, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


def padded(tensor: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """Zero-pad a factor to `rank` along its rank dimension (written independently of baselines.py)."""
    pad = [0, 0, 0, 0]
    pad[1 if dim == 1 else 3] = rank - tensor.shape[dim]
    return torch.nn.functional.pad(tensor, pad)


@pytest.fixture(scope="module")
def hetero(tmp_path_factory):
    """Two llama clients at ranks 4 and 8 with one shared scaling (alpha = 2r)."""
    root = tmp_path_factory.mktemp("hetero")
    return [write_client(root / "small", 4, seed=11), write_client(root / "large", 8, seed=12)]


def test_cli_hetlora_gives_each_client_the_padded_average_at_its_rank(hetero, tmp_path):
    report = json.loads(run("aggregate", *hetero, "--method", "hetlora", "--weights", "1,3", "-o", tmp_path / "out", "--json").stdout)
    assert report["method"] == "hetlora"
    inputs = [raw_factors(folder) for folder in hetero]
    for folder in hetero:
        out = tmp_path / "out" / folder.name
        assert json.loads((out / "adapter_config.json").read_text())["r"] == json.loads((folder / "adapter_config.json").read_text())["r"]
        actual = peft_deltas(out)
        own = raw_factors(folder)
        for name, (_, A_own, scaling) in own.items():
            B_avg = 0.25 * padded(inputs[0][name][0], 8, 1) + 0.75 * padded(inputs[1][name][0], 8, 1)
            A_avg = 0.25 * padded(inputs[0][name][1], 8, 0) + 0.75 * padded(inputs[1][name][1], 8, 0)
            r = A_own.shape[0]
            assert relative_error(actual[name], scaling * B_avg[:, :r] @ A_avg[:r]) <= 1e-6, (folder.name, name)


def test_cli_fedavg_on_equal_ranks_and_refusal_on_unequal(hetero, tmp_path):
    twins = [write_client(tmp_path / "x", 4, seed=21), write_client(tmp_path / "y", 4, seed=22)]
    run("aggregate", *twins, "--method", "fedavg", "-o", tmp_path / "out")
    x, y = raw_factors(twins[0]), raw_factors(twins[1])
    for folder in twins:
        actual = peft_deltas(tmp_path / "out" / folder.name)
        for name, (Bx, Ax, scaling) in x.items():
            By, Ay, _ = y[name]
            assert relative_error(actual[name], scaling * ((Bx + By) / 2) @ ((Ax + Ay) / 2)) <= 1e-6
    refused = run("aggregate", *hetero, "--method", "fedavg", "-o", tmp_path / "bad", code=2)
    assert "fedavg needs equal ranks" in refused.output and "Traceback" not in refused.output
    assert not (tmp_path / "bad").exists()


def test_cli_flora_writes_one_exact_stacked_global_adapter(clients, tmp_path):
    report = json.loads(run("aggregate", *clients, "--method", "flora", "--num-samples", "1,2,5", "-o", tmp_path / "out", "--json").stdout)
    folder = tmp_path / "out" / "global"
    assert report["global"] == str(folder)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["global"]  # no per-client outputs
    expected = reference_delta(clients, [1, 2, 5])
    actual = peft_deltas(folder)
    assert set(actual) == set(expected)
    for name, delta in expected.items():
        assert relative_error(actual[name], delta) <= 1e-5, name
    stacked = {m["name"]: m["rank"] for m in report["modules"]}
    for name in expected:
        assert stacked[name] == sum(raw_factors(c)[name][1].shape[0] for c in clients)


def test_cli_refuses_bad_method_and_ranks(hetero, tmp_path):
    assert "--method" in run("aggregate", *hetero, "--method", "fedprox", "-o", tmp_path / "a", code=2).output
    assert "--ranks" in run("aggregate", *hetero, "--method", "flora", "--ranks", "4", "-o", tmp_path / "b", code=2).output
    assert "largest client rank 8" in run("aggregate", *hetero, "--method", "hetlora", "--ranks", "16", "-o", tmp_path / "c", code=2).output
    assert not any((tmp_path / name).exists() for name in "abc")
