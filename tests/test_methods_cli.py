"""Every registered method through `flexlora aggregate --method M` on real PEFT folders, checked against
fp64 references computed here from the client files (independently of flexlora_cli.methods), with
the model cards and the manifest every output carries. The methods' math is in tests/test_methods.py."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import padded, peft_deltas, raw_factors, reference_delta, relative_error, run, run_json, truncated, write_client
from flexlora_cli.methods.registry import METHODS











@pytest.fixture(scope="module")
def hetero(tmp_path_factory):
    """Three llama clients at ranks 2, 4 and 8 with one shared scaling (alpha = 2r)."""
    root = tmp_path_factory.mktemp("hetero")
    return [write_client(root / "small", 2, seed=11), write_client(root / "mid", 4, seed=13), write_client(root / "large", 8, seed=12)]


def test_hetlora_weights_each_module_by_its_clients_update_norms(hetero, tmp_path):
    report = run_json("aggregate", *hetero, "--method", "hetlora", "--weights", "1,2,3", "--global", "-o", tmp_path / "out")
    inputs = [raw_factors(folder) for folder in hetero]
    for name in inputs[0]:
        # HetLoRA's sparsity weights: w_k ||s_k B_k A_k||_F, renormalized (dense fp64 norms here).
        raw = [w * float(torch.linalg.norm(s * B @ A)) for w, (B, A, s) in zip([1, 2, 3], (i[name] for i in inputs))]
        shares = [x / sum(raw) for x in raw]
        B_avg = sum(p * padded(i[name][0], 8, 1) for p, i in zip(shares, inputs))
        A_avg = sum(p * padded(i[name][1], 8, 0) for p, i in zip(shares, inputs))
        module = next(m for m in report["modules"] if m["name"] == name)
        assert module["weights"] == pytest.approx(shares, rel=1e-9)
        for folder in [*hetero, tmp_path / "out" / "global"]:
            out = tmp_path / "out" / folder.name
            r = json.loads((out / "adapter_config.json").read_text())["r"]
            scaling = inputs[0][name][2]  # shared by all
            assert relative_error(peft_deltas(out)[name], scaling * B_avg[:, :r] @ A_avg[:r]) <= 1e-6, (folder.name, name)
    assert json.loads((tmp_path / "out" / "global" / "adapter_config.json").read_text())["r"] == 8


def test_raflora_averages_each_rank_partition_over_the_clients_that_reach_it(hetero, tmp_path):
    run("aggregate", *hetero, "--method", "raflora", "--num-samples", "3,1,2", "--global", "-o", tmp_path / "out")
    inputs = [raw_factors(folder) for folder in hetero]
    samples, ranks = [3, 1, 2], [2, 4, 8]
    for name in inputs[0]:
        # Partitions of the rank index at the distinct ranks: (0,2], (2,4], (4,8]; each averaged over the
        # clients whose rank reaches it, sample weights renormalized among them.
        expected = torch.zeros_like(inputs[0][name][0] @ inputs[0][name][1])
        for low, high in ((0, 2), (2, 4), (4, 8)):
            members = [k for k, r in enumerate(ranks) if r >= high]
            total = sum(samples[k] for k in members)
            for k in members:
                B, A, s = inputs[k][name]
                expected += samples[k] / total * s * B[:, low:high] @ A[low:high]
        assert relative_error(peft_deltas(tmp_path / "out" / "global")[name], expected) <= 1e-5, name
        for folder, r in zip(hetero, ranks):
            assert relative_error(peft_deltas(tmp_path / "out" / folder.name)[name], truncated(expected, r)) <= 1e-5, (folder.name, name)


def test_raflora_with_equal_ranks_is_flexlora(tmp_path):
    twins = [write_client(tmp_path / "x", 4, seed=21), write_client(tmp_path / "y", 4, seed=22)]
    run("aggregate", *twins, "--method", "raflora", "--weights", "1,3", "-o", tmp_path / "ra")
    expected = reference_delta(twins, [1, 3])
    for folder in twins:
        actual = peft_deltas(tmp_path / "ra" / folder.name)
        for name, delta in expected.items():
            assert relative_error(actual[name], truncated(delta, 4)) <= 1e-5


def test_lora_fair_keeps_the_average_A_and_moves_B_towards_the_exact_update(hetero, tmp_path):
    report = run_json("aggregate", *hetero, "--method", "lora-fair", "--global", "-o", tmp_path / "out")
    inputs = [raw_factors(folder) for folder in hetero]
    exact = reference_delta(hetero)
    written = json.loads((tmp_path / "out" / "global" / "adapter_config.json").read_text())
    assert written["r"] == 8
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "out" / "global" / "adapter_model.safetensors"))
    for name in inputs[0]:
        A_avg = sum(padded(i[name][1], 8, 0) for i in inputs) / 3
        B_avg = sum(padded(i[name][0], 8, 1) for i in inputs) / 3
        scaling = inputs[0][name][2]
        A_out = state[f"base_model.model.{name}.lora_A.weight"].double()
        B_out = state[f"base_model.model.{name}.lora_B.weight"].double()
        torch.testing.assert_close(A_out, A_avg, rtol=1e-6, atol=1e-7)  # A-bar unchanged
        cosine = lambda X: float((X * exact[name]).sum() / (torch.linalg.norm(X) * torch.linalg.norm(exact[name])))  # noqa: E731
        before, after = cosine(scaling * B_avg @ A_avg), cosine(scaling * B_out @ A_out)
        assert after > before + 1e-3, (name, before, after)
        module = next(m for m in report["modules"] if m["name"] == name)
        assert module["cosine_after"] == pytest.approx(after, abs=1e-5)


def test_fedavg_on_equal_ranks_and_refusal_on_unequal(hetero, tmp_path):
    twins = [write_client(tmp_path / "x", 4, seed=21), write_client(tmp_path / "y", 4, seed=22)]
    run("aggregate", *twins, "--method", "fedavg", "--global", "-o", tmp_path / "out")
    x, y = raw_factors(twins[0]), raw_factors(twins[1])
    for folder in [*twins, tmp_path / "out" / "global"]:
        actual = peft_deltas(tmp_path / "out" / folder.name)
        for name, (Bx, Ax, scaling) in x.items():
            By, Ay, _ = y[name]
            assert relative_error(actual[name], scaling * ((Bx + By) / 2) @ ((Ax + Ay) / 2)) <= 1e-6
    refused = run("aggregate", *hetero, "--method", "fedavg", "-o", tmp_path / "bad", code=2)
    assert "fedavg needs equal ranks" in refused.output and "Traceback" not in refused.output
    assert not (tmp_path / "bad").exists()


def test_flora_writes_one_exact_stacked_global_adapter(clients, tmp_path):
    report = run_json("aggregate", *clients, "--method", "flora", "--num-samples", "1,2,5", "-o", tmp_path / "out")
    folder = tmp_path / "out" / "global"
    assert report["global"] == str(folder)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["flexlora_manifest.json", "global"]  # no per-client outputs
    expected = reference_delta(clients, [1, 2, 5])
    actual = peft_deltas(folder)
    assert set(actual) == set(expected)
    for name, delta in expected.items():
        assert relative_error(actual[name], delta) <= 1e-5, name
        assert report["global_ranks"][name] == sum(raw_factors(c)[name][1].shape[0] for c in clients)


def test_global_flexlora_output_is_the_exact_update_and_energy_keeps_its_share(clients, tmp_path):
    report = run_json("aggregate", *clients, "--num-samples", "1,2,5", "--energy", "0.9", "-o", tmp_path / "out")
    expected = reference_delta(clients, [1, 2, 5])
    actual = peft_deltas(tmp_path / "out" / "global")
    for name, delta in expected.items():
        S = torch.linalg.svdvals(delta)
        shares = torch.cumsum(S**2, 0) / (S**2).sum()
        rank = int((shares < 0.9).sum()) + 1  # the smallest rank keeping 90%
        assert report["global_ranks"][name] == rank, name
        assert relative_error(actual[name], truncated(delta, rank)) <= 1e-5, name
    merged = run_json("aggregate", *clients, "--num-samples", "1,2,5", "--global", "-o", tmp_path / "exact")
    exact = peft_deltas(tmp_path / "exact" / "global")
    for name, delta in expected.items():
        assert relative_error(exact[name], delta) <= 1e-5, name
    assert merged["global_energy_kept"] == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_writes_model_cards_and_a_manifest(method, hetero, tmp_path):
    twins = hetero if method != "fedavg" else [write_client(tmp_path / "x", 4, seed=21), write_client(tmp_path / "y", 4, seed=22)]
    run("aggregate", *twins, "--method", method, "--global", "-o", tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "flexlora_manifest.json").read_text())
    assert manifest["method"] == method and manifest["written_by"] == "flexlora" and manifest["command"] == "aggregate"
    assert [i["name"] for i in manifest["inputs"]] == [t.name for t in twins]
    folders = ([t.name for t in twins] if METHODS[method].per_client else []) + ["global"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir()) == sorted(folders)
    for folder in folders:
        card = (tmp_path / "out" / folder / "README.md").read_text()
        assert METHODS[method].title in card and METHODS[method].paper in card, folder
        peft_deltas(tmp_path / "out" / folder)  # PEFT loads it


def test_refusals_name_the_flag_and_write_nothing(hetero, clients, tmp_path):
    assert "--method" in run("aggregate", *hetero, "--method", "fedprox", "-o", tmp_path / "a", code=2).output
    assert "--ranks" in run("aggregate", *hetero, "--method", "flora", "--ranks", "4", "-o", tmp_path / "b", code=2).output
    assert "largest client rank 8" in run("aggregate", *hetero, "--method", "hetlora", "--ranks", "16", "-o", tmp_path / "c", code=2).output
    # Raw-factor methods need one shared scaling: clients has rsLoRA and alpha patterns.
    assert "share one scaling" in run("aggregate", *clients, "--method", "lora-fair", "-o", tmp_path / "d", code=2).output
    assert "--energy" in run("aggregate", *hetero, "--method", "hetlora", "--energy", "0.9", "-o", tmp_path / "e", code=2).output
    assert not any((tmp_path / name).exists() for name in "abcde")
