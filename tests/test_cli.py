"""The commands end to end: real PEFT folders in, outputs loaded back with PeftModel.from_pretrained."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from conftest import energy_shares, peft_deltas, raw_factors, reference_delta, relative_error, run, run_json, truncated, write_client
from flexlora_cli.cli.app import app

runner = CliRunner()






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
    report = run_json("split", tmp_path / "merged", "--ranks", "8,16,40", "-o", tmp_path / "split", "--alpha", "32")
    expected = reference_delta(clients)
    for rank in (8, 16, 40):
        folder = tmp_path / "split" / f"rank-{rank}"
        config = json.loads((folder / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"]) == (rank, 32)
        actual = peft_deltas(folder)
        for name, delta in expected.items():
            assert_best_rank_approximation(actual[name], delta, rank)
        # the shares of energy kept, against fp64 values (summing S instead of S^2 is off by 10-40%)
        overall, per_module = energy_shares(expected, rank)
        assert report["energy_kept"][str(rank)] == pytest.approx(overall, rel=1e-5)
        for module in report["modules"]:
            assert module["energy_kept"][str(rank)] == pytest.approx(per_module[module["name"]], rel=1e-5), module["name"]


def assert_best_rank_approximation(actual: torch.Tensor, delta: torch.Tensor, rank: int) -> None:
    """The fp64 truncated SVD of the reference, to fp32 rounding (measured 1e-6..5e-6 on the fixture).

    Compared matrix to matrix: the Eckart-Young error norm alone is quadratically insensitive (an
    approximation 1e-3 off the best one changes the error norm by ~1e-6).
    """
    best = truncated(delta, rank)
    assert relative_error(actual, best) <= 1e-5, relative_error(actual, best)


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
    for client, entry in zip(clients, report["clients"]):  # each client's share at its own ranks, fp64
        own_ranks = {name: A.shape[0] for name, (_, A, _) in raw_factors(client).items()}
        overall, _ = energy_shares({name: expected[name] for name in own_ranks}, own_ranks)
        assert entry["energy_kept"] == pytest.approx(overall, rel=1e-5), entry["name"]


def test_merge_at_a_rank_reports_the_energy_it_keeps(clients, tmp_path):
    report = run_json("merge", *clients, "--rank", "6", "-o", tmp_path / "merged")
    expected = reference_delta(clients)
    overall, per_module = energy_shares(expected, 6)
    assert report["energy_kept"] == pytest.approx(overall, rel=1e-5)
    assert {m["name"]: m["energy_kept"] for m in report["modules"]} == pytest.approx(per_module, rel=1e-5)
    actual = peft_deltas(tmp_path / "merged")
    for name, delta in expected.items():
        assert_best_rank_approximation(actual[name], delta, 6)


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
        # bf16 storage of B = U S and A = Vh (unit roundoff u = 2^-9): at most u (1 + sqrt(r)) = 8.7e-3 at r = 12
        assert relative_error(actual[name], delta) <= 1e-2, name
    with safe_open(tmp_path / "merged" / "adapter_model.safetensors", "pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"BF16"}
    run("aggregate", *folders, "-o", tmp_path / "round", "--dtype", "float32")
    for folder in folders:  # bf16 inputs are exact in fp32: each client's truncation to fp32 rounding
        actual = peft_deltas(tmp_path / "round" / folder.name, base="gpt2")
        assert set(actual) == set(expected)
        for name, delta in expected.items():
            assert_best_rank_approximation(actual[name], delta, int(folder.name.removeprefix("c")))


def test_split_of_dense_file_matches_split_of_adapter(clients, tmp_path):
    run("merge", *clients, "-o", tmp_path / "merged", "--dense")
    dense = tmp_path / "merged" / "flexlora_delta.safetensors"
    run("split", dense, "--ranks", "16", "-o", tmp_path / "from_dense")
    run("split", tmp_path / "merged", "--ranks", "16", "-o", tmp_path / "from_adapter")
    expected = reference_delta(clients)
    for source in ("from_dense", "from_adapter"):  # both against the fp64 truncation, not each other
        actual = peft_deltas(tmp_path / source / "rank-16")
        assert set(actual) == set(expected)
        for name, delta in expected.items():
            assert_best_rank_approximation(actual[name], delta, 16)


def test_inspect_reports_config_and_spectrum(clients):
    report = run_json("inspect", clients[1], "--spectrum", "4,8,16")
    (item,) = report
    assert item["ranks"] == [4, 16]
    assert item["base_model"] == "tiny-llama"
    own = reference_delta([clients[1]])
    assert set(item["spectrum"]["modules"]) == set(own)
    for rank in (4, 8, 16):  # computed in fp64 by both: agreement to fp64 rounding
        overall, per_module = energy_shares(own, rank)
        assert item["spectrum"]["overall"][str(rank)] == pytest.approx(overall, rel=1e-9)
        for name, share in per_module.items():
            assert item["spectrum"]["modules"][name][str(rank)] == pytest.approx(share, rel=1e-9), name
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


def live_columns(B: torch.Tensor) -> torch.Tensor:
    """Columns of B that carry a singular value (padding beyond the update's rank is all zero)."""
    return torch.linalg.vector_norm(B, dim=0) > 1e-6 * float(torch.linalg.vector_norm(B, dim=0).max())


def assert_canonical_signs(folder) -> None:
    """flexlora.canonical_signs: the largest-magnitude entry of each U column is positive.

    B = U diag(S) / scaling (or U sqrt(S / scaling) with --balanced): positive factors, same signs as U.
    """
    for name, (B, _, _) in raw_factors(folder).items():
        live = live_columns(B)
        pivots = B[:, live].abs().argmax(dim=0)
        assert bool((B[:, live].gather(0, pivots[None, :]) > 0).all()), (folder, name)


def test_outputs_follow_the_documented_sign_convention(clients, tmp_path):
    run("merge", *clients, "--svd-path", "stacked", "-o", tmp_path / "stacked")  # factored SVD
    run("merge", *clients, "--svd-path", "dense", "--dense", "-o", tmp_path / "dense")  # dense SVD
    run("split", tmp_path / "stacked", "--ranks", "8", "-o", tmp_path / "split")  # factored, of an adapter
    run("split", tmp_path / "dense" / "flexlora_delta.safetensors", "--ranks", "8", "-o", tmp_path / "split-dense")
    run("aggregate", *clients, "-o", tmp_path / "round")
    folders = [tmp_path / "stacked", tmp_path / "dense", tmp_path / "split" / "rank-8", tmp_path / "split-dense" / "rank-8"]
    for folder in folders + [tmp_path / "round" / c.name for c in clients]:
        assert_canonical_signs(folder)
    # the paper's default: S goes into B, A = Vh has orthonormal rows
    for name, (B, A, _) in raw_factors(tmp_path / "stacked").items():
        assert torch.allclose(A @ A.mT, torch.eye(A.shape[0], dtype=A.dtype), atol=1e-5), name


def test_balanced_puts_sqrt_s_on_both_factors_and_keeps_the_delta(clients, tmp_path):
    """--balanced: B = U sqrt(S/s) and A = sqrt(S/s) Vh, s the output's PEFT scaling (1 for merge; 2 and
    3/16 among the clients); the delta PEFT computes is the same as without it."""
    run("merge", *clients, "--balanced", "-o", tmp_path / "merged")
    run("aggregate", *clients, "--balanced", "-o", tmp_path / "round")
    expected = reference_delta(clients)
    for folder in (tmp_path / "merged", *(tmp_path / "round" / c.name for c in clients)):
        actual = peft_deltas(folder)
        for name, (B, A, scaling) in raw_factors(folder).items():
            rank = B.shape[1]
            S = torch.linalg.svdvals(expected[name])[:rank]
            root = torch.sqrt(torch.cat([S, S.new_zeros(rank - S.numel())]) / scaling)  # zero-padded past min(d)
            assert torch.allclose(torch.linalg.vector_norm(B, dim=0), root, rtol=1e-5, atol=1e-6 * float(root[0])), (folder, name)
            # past the update's rank (S = 0) A keeps live unit rows, as without --balanced
            assert torch.allclose(torch.linalg.vector_norm(A, dim=1), torch.where(root > 0, root, 1.0), rtol=1e-5), (folder, name)
            assert_best_rank_approximation(actual[name], expected[name], rank)


def test_fp64_precision_reaches_fp64_rounding(clients, tmp_path):
    """--precision fp64 --dtype float64: within fp64 rounding of the reference; fp32 compute is ~1e-7 off."""
    errors = {}
    for precision in ("fp32", "fp64"):
        out = tmp_path / precision
        run("merge", *clients, "--weights", "3,1,2", "--precision", precision, "--dtype", "float64", "-o", out)
        expected = reference_delta(clients, [3, 1, 2])
        written = raw_factors(out)  # read straight from the file: PEFT would load fp64 factors into fp32 layers
        with safe_open(out / "adapter_model.safetensors", "pt") as handle:
            assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"F64"}
        errors[precision] = max(relative_error(s * B @ A, expected[name]) for name, (B, A, s) in written.items())
    assert errors["fp64"] <= 1e-12, errors
    assert errors["fp32"] >= 1e-9, errors  # the fp32 path's rounding: fp64 must be far below it
    # aggregate in fp64: each client's truncation to fp64 rounding (measured 5e-15; relative gaps >= 1.8e-3)
    run("aggregate", *clients, "--precision", "fp64", "--dtype", "float64", "-o", tmp_path / "round")
    expected = reference_delta(clients)
    for client in clients:
        for name, (B, A, s) in raw_factors(tmp_path / "round" / client.name).items():
            assert relative_error(s * B @ A, truncated(expected[name], B.shape[1])) <= 1e-10, (client.name, name)


def test_allow_base_mismatch(clients, tmp_path):
    other = write_client(tmp_path / "dave", 4, seed=7, base_model_name="tiny-llama-renamed")
    pair = [clients[0], other]
    refused = run("merge", *pair, "-o", tmp_path / "refused", code=2)
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith("Error: ") and "tiny-llama-renamed" in line and "--allow-base-mismatch" in refused.stderr
    assert not (tmp_path / "refused").exists()
    run("aggregate", *pair, "-o", tmp_path / "refused", code=2)
    assert not (tmp_path / "refused").exists()

    run("merge", *pair, "--weights", "1,3", "--allow-base-mismatch", "-o", tmp_path / "merged")
    expected = reference_delta(pair, [1, 3])  # both clients count
    actual = peft_deltas(tmp_path / "merged")
    for name, delta in expected.items():
        assert relative_error(actual[name], delta) <= 1e-5, name
    run("aggregate", *pair, "--allow-base-mismatch", "-o", tmp_path / "round")
    expected = reference_delta(pair)
    for client in pair:
        written = json.loads((tmp_path / "round" / client.name / "adapter_config.json").read_text())
        assert written["base_model_name_or_path"] == json.loads((client / "adapter_config.json").read_text())["base_model_name_or_path"]
        actual = peft_deltas(tmp_path / "round" / client.name)
        for name, (_, A, _) in raw_factors(client).items():
            assert_best_rank_approximation(actual[name], expected[name], A.shape[0])


def test_inspect_plot_draws_a_picture_of_the_spectrum(clients, tmp_path):
    from conftest import require

    require("matplotlib")
    picture = tmp_path / "spectrum.png"
    report = run_json("inspect", clients[2], "--spectrum", "8,32", "--plot", picture)
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 10_000
    assert "values" not in report[0]["spectrum"]  # drawn, not dumped
    assert not list(tmp_path.glob(".*partial*"))
    refused = runner.invoke(app, ["inspect", str(clients[2]), "--plot", str(tmp_path / "x.txt")])
    assert refused.exit_code == 2 and "--plot" in refused.output


def test_version_and_help_start_without_torch():
    import subprocess
    import sys

    code = "import sys; from flexlora_cli.cli.app import run; run(['--version']); run(['aggregate', '--help']); print(sorted(m for m in ('torch', 'peft', 'transformers') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith("flexlora ") and done.stdout.splitlines()[-1] == "[]"
    assert "lora-fair" in done.stdout  # the method choices are listed
