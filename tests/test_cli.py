"""The commands end to end: real PEFT folders in, outputs loaded back with PeftModel.from_pretrained."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import peft_deltas, raw_factors, reference_delta, relative_error, write_client
from flexlora_cli.cli.app import app

runner = CliRunner()


def run(*args: str, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


def run_json(*args: str):
    return json.loads(run(*args, "--json").stdout)


def test_merge_reproduces_the_weighted_update_exactly(clients, tmp_path):
    weights = [3.0, 1.0, 2.0]
    report = run_json("merge", *clients, "--weights", "3,1,2", "-o", tmp_path / "merged")
    expected = reference_delta(clients, weights)
    actual = peft_deltas(tmp_path / "merged")
    assert set(actual) == set(expected)
    for name, delta in expected.items():
        assert relative_error(actual[name], delta) <= 1e-5, name
    ranks = {m["name"]: m["rank"] for m in report["modules"]}
    for name, delta in expected.items():
        assert ranks[name] == torch.linalg.matrix_rank(delta).item()
    assert [c["weight"] for c in report["clients"]] == pytest.approx([0.5, 1 / 6, 1 / 3])


def test_split_error_equals_discarded_singular_values(clients, tmp_path):
    run("merge", *clients, "-o", tmp_path / "merged")
    run("split", tmp_path / "merged", "--ranks", "8,16,40", "-o", tmp_path / "split", "--alpha", "32")
    expected = reference_delta(clients)
    for rank in (8, 16, 40):
        folder = tmp_path / "split" / f"rank-{rank}"
        config = json.loads((folder / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"]) == (rank, 32)
        actual = peft_deltas(folder)
        for name, delta in expected.items():
            assert_best_rank_approximation(actual[name], delta, rank)


def assert_best_rank_approximation(actual: torch.Tensor, delta: torch.Tensor, rank: int) -> None:
    """Eckart-Young: the Frobenius error equals the norm of the discarded singular values."""
    S = torch.linalg.svdvals(delta)
    floor = float(torch.sqrt((S[rank:] ** 2).sum()))
    error = float(torch.linalg.norm(actual - delta))
    assert abs(error - floor) <= 1e-5 * float(torch.linalg.norm(delta)), (error, floor)


def sorted_if_list(value):
    return sorted(value) if isinstance(value, list) else value


def test_aggregate_gives_each_client_its_own_rank_and_config(clients, tmp_path):
    report = run_json("aggregate", *clients, "--num-samples", "100,300,600", "-o", tmp_path / "round")
    expected = reference_delta(clients, [100, 300, 600])
    for client in clients:
        out = tmp_path / "round" / client.name
        original = json.loads((client / "adapter_config.json").read_text())
        written = json.loads((out / "adapter_config.json").read_text())
        for field in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "target_modules", "base_model_name_or_path"):
            assert sorted_if_list(written[field]) == sorted_if_list(original[field]), field
        actual = peft_deltas(out)
        own = raw_factors(client)
        assert set(actual) == set(own)
        for name, (_, A, _) in own.items():
            assert_best_rank_approximation(actual[name], expected[name], A.shape[0])
    assert {c["name"] for c in report["clients"]} == {"alice", "bob", "carol"}
    kept = {c["name"]: c["energy_kept"] for c in report["clients"]}
    assert 0 < kept["alice"] < kept["bob"] < kept["carol"] <= 1


def test_aggregate_twice_is_byte_identical(clients, tmp_path):
    for attempt in ("one", "two"):
        run("aggregate", *clients, "-o", tmp_path / attempt)
    for client in clients:
        for filename in ("adapter_model.safetensors", "adapter_config.json"):
            first = (tmp_path / "one" / client.name / filename).read_bytes()
            assert first == (tmp_path / "two" / client.name / filename).read_bytes()


def test_gpt2_conv1d_and_bf16_roundtrip(tmp_path):
    folders = [
        write_client(tmp_path / f"c{r}", r, base="gpt2", seed=r, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, base_model_name="tiny-gpt2", dtype=torch.bfloat16)
        for r in (4, 8)
    ]
    run("merge", *folders, "-o", tmp_path / "merged", "--dense")
    expected = reference_delta(folders)
    actual = peft_deltas(tmp_path / "merged", base="gpt2")
    for name, delta in expected.items():
        assert relative_error(actual[name], delta) <= 1e-2, name  # bf16 output storage
    from safetensors import safe_open

    with safe_open(tmp_path / "merged" / "adapter_model.safetensors", "pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"BF16"}
    run("aggregate", *folders, "-o", tmp_path / "round", "--dtype", "float32")
    assert peft_deltas(tmp_path / "round" / "c4", base="gpt2")


def test_split_of_dense_file_matches_split_of_adapter(clients, tmp_path):
    run("merge", *clients, "-o", tmp_path / "merged", "--dense")
    dense = tmp_path / "merged" / "flexlora_delta.safetensors"
    run("split", dense, "--ranks", "16", "-o", tmp_path / "from_dense")
    run("split", tmp_path / "merged", "--ranks", "16", "-o", tmp_path / "from_adapter")
    a = peft_deltas(tmp_path / "from_dense" / "rank-16")
    b = peft_deltas(tmp_path / "from_adapter" / "rank-16")
    for name in a:
        assert relative_error(a[name], b[name]) <= 1e-4


def test_inspect_reports_config_and_spectrum(clients):
    report = run_json("inspect", clients[1], "--spectrum", "4,16")
    (item,) = report
    assert item["ranks"] == [4, 16]
    assert item["base_model"] == "tiny-llama"
    assert item["spectrum"]["overall"]["16"] == pytest.approx(1.0)
    assert 0 < item["spectrum"]["overall"]["4"] < 1
    human = run("inspect", clients[0])
    assert "tiny-llama" in human.output


def test_missing_folder_is_one_line_and_exit_2(tmp_path):
    result = run("merge", tmp_path / "nope", "-o", tmp_path / "out", code=2)
    assert "nope" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["merge", "split", "aggregate", "inspect"])
def test_help_explains_arguments_and_shows_examples(command):
    text = run(command, "--help").output
    assert "Examples:" in text and f"flexlora {command}" in text
    assert "[required]" in text and "[@rev]" in text  # argument help is rendered, markup escaped
