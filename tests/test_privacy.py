"""Central differential privacy in a round (issue 14): `--dp-noise` with `--clip`, `--seed`, the ledger,
and the (epsilon, delta) accounting, through the CLI on real PEFT folders. The noise is measured against
an fp64 reference computed here from the client files; epsilon against dp-accounting called here."""

from __future__ import annotations

import json
import math
import secrets
import sys
from pathlib import Path

import pytest
import torch

from conftest import raw_factors, require, run, run_json, write_client

dp_accounting = require("dp_accounting", "the privacy extra: pip install -e '.[privacy]'")
from dp_accounting import rdp  # noqa: E402

from flexlora_cli.adapters.ledger import LEDGER_FORMAT  # noqa: E402

WEIGHTS = [0.5, 0.3, 0.2]  # max w = 0.5: the sensitivity is C * 0.5






@pytest.fixture(scope="module")
def clients(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("private")
    return [write_client(root / "alice", 4, seed=1), write_client(root / "bob", 8, seed=2), write_client(root / "carol", 16, seed=3)]


def dense_norm(folder: Path) -> float:
    return math.sqrt(sum(float(torch.linalg.norm(s * B @ A)) ** 2 for B, A, s in raw_factors(folder).values()))


def written_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """s B A per module of a written adapter, from its files in fp64."""
    return {name: s * B @ A for name, (B, A, s) in raw_factors(folder).items()}


def clipped_sum(folders, weights, clip) -> dict[str, torch.Tensor]:
    """The noiseless update: sum_i w_i min(1, C / ||dW_i||) s_i B_i A_i in fp64."""
    deltas: dict[str, torch.Tensor] = {}
    for folder, weight in zip(folders, weights):
        factor = min(1.0, clip / dense_norm(folder))
        for name, (B, A, s) in raw_factors(folder).items():
            deltas[name] = deltas.get(name, 0) + weight * factor * s * (B @ A)
    return deltas


def private(clients, out: Path, *extra) -> list[str]:
    return ["aggregate", *clients, "--weights", ",".join(map(str, WEIGHTS)), "--clip", 2.0, "--dp-noise", 0.7, *extra, "-o", out]


def weight_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("adapter_model.safetensors"))}


def expected_epsilon(rounds: list[tuple[float, float]], delta: float) -> float:
    """dp-accounting's RDP accountant, called here on its own."""
    accountant = rdp.RdpAccountant()
    for sigma, q in rounds:
        accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)))
    return accountant.get_epsilon(delta)


# --- the noise --------------------------------------------------------------------------------------


def test_the_noise_has_the_stated_standard_deviation_and_mean_zero(clients, tmp_path):
    """The global output is the noisy update at full rank: minus the clipped sum, it is the noise itself."""
    report = run_json(*private(clients, tmp_path / "out", "--seed", 7, "--global", "--precision", "fp64", "--dtype", "float64"))
    std = 0.7 * 2.0 * max(WEIGHTS)
    assert report["privacy"]["noise_std"] == pytest.approx(std, rel=1e-12)
    exact, noisy = clipped_sum(clients, WEIGHTS, 2.0), written_deltas(tmp_path / "out" / "global")
    noise = torch.cat([(noisy[name] - delta).flatten() for name, delta in exact.items()])
    count = noise.numel()  # 52k entries over 6 modules
    # The sample std of n normal draws has a relative standard error 1/sqrt(2n); the mean a standard error std/sqrt(n).
    assert float(noise.std()) == pytest.approx(std, rel=5 / math.sqrt(2 * count))
    assert abs(float(noise.mean())) <= 5 * std / math.sqrt(count)
    for name in exact:
        assert float((noisy[name] - exact[name]).std()) == pytest.approx(std, rel=0.1), name
    # every module gets its own draw: two modules of one shape have uncorrelated noise
    first, second = ((noisy[n] - exact[n]).flatten() for n in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"))
    assert abs(float(torch.corrcoef(torch.stack([first, second]))[0, 1])) <= 5 / math.sqrt(first.numel())


def test_a_seed_gives_the_same_bytes_twice(clients, tmp_path):
    run(*private(clients, tmp_path / "a", "--seed", 7, "--global"))
    run(*private(clients, tmp_path / "b", "--seed", 7, "--global"))
    run(*private(clients, tmp_path / "c", "--seed", 8, "--global"))
    first, second, other = (weight_bytes(tmp_path / n) for n in "abc")
    assert first == second and len(first) == 4
    assert all(first[name] != other[name] for name in first)


def test_without_a_seed_the_noise_differs_and_no_seed_is_written(clients, tmp_path, monkeypatch):
    drawn: list[int] = []

    def randbits(bits: int) -> int:
        drawn.append(secrets.SystemRandom().getrandbits(bits))
        return drawn[-1]

    monkeypatch.setattr("flexlora_cli.privacy.secrets.randbits", randbits)
    run(*private(clients, tmp_path / "a", "--global", "--dp-ledger", tmp_path / "rounds.json"))
    run(*private(clients, tmp_path / "b", "--global"))
    assert len(drawn) == 2 * 6  # one secure seed per module and run
    first, second = weight_bytes(tmp_path / "a"), weight_bytes(tmp_path / "b")
    assert all(first[name] != second[name] for name in first)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    for seed in drawn:
        for form in (str(seed), f"{seed:x}", f"{seed:016x}", seed.to_bytes(8, "little"), seed.to_bytes(8, "big")):
            needle = form if isinstance(form, bytes) else form.encode()
            assert not any(needle in p.read_bytes() for p in written), (seed, form)


def test_a_given_seed_is_not_written_either(clients, tmp_path):
    seed = 918273645
    report = run_json(*private(clients, tmp_path / "out", "--seed", seed, "--global", "--dp-ledger", tmp_path / "rounds.json"))
    assert "--seed makes the noise reproducible" in " ".join(report["notes"])
    for path in [p for p in tmp_path.rglob("*") if p.is_file()]:
        assert str(seed).encode() not in path.read_bytes(), path


# --- accounting and the ledger --------------------------------------------------------------------


def test_epsilon_is_dp_accountings_over_the_rounds_of_the_ledger(clients, tmp_path):
    ledger = tmp_path / "rounds.json"
    rounds = [(0.7, 0.5), (0.7, 0.5), (1.3, 0.25)]
    for index, (sigma, q) in enumerate(rounds):
        report = run_json(
            "aggregate", *clients, "--clip", 1.0, "--dp-noise", sigma, "--dp-sampling-rate", q, "--dp-delta", 1e-6,
            "--dp-ledger", ledger, "-o", tmp_path / f"round-{index + 2}",
        )
        privacy = report["privacy"]
        assert privacy["rounds"] == index + 1 and privacy["new_ledger"] == (index == 0)
        assert privacy["epsilon"] == pytest.approx(expected_epsilon(rounds[: index + 1], 1e-6), rel=1e-9)
    document = json.loads(ledger.read_text())
    assert document["format"] == LEDGER_FORMAT
    assert [(r["noise_multiplier"], r["sampling_rate"]) for r in document["rounds"]] == rounds
    card = (tmp_path / "round-4" / "alice" / "README.md").read_text()
    assert f"({privacy['epsilon']:.4g}, 1e-06)-DP" in card and "over 3 rounds" in card


def test_without_a_ledger_epsilon_covers_this_round(clients, tmp_path):
    report = run_json("aggregate", *clients, "--clip", 1.0, "--dp-noise", 1.1, "-o", tmp_path / "out")
    assert report["privacy"]["epsilon"] == pytest.approx(expected_epsilon([(1.1, 1.0)], 1e-5), rel=1e-9)
    assert report["privacy"]["rounds"] == 1 and report["privacy"]["ledger"] is None


def test_a_failed_round_leaves_the_ledger_as_it_was(clients, tmp_path, monkeypatch):
    import errno

    from flexlora_cli.adapters.output import OutputFolder

    ledger = tmp_path / "rounds.json"
    run(*private(clients, tmp_path / "round-2", "--dp-ledger", ledger))
    before = ledger.read_bytes()

    def full_disk(self, staging):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(OutputFolder, "_move", full_disk)  # fails after the ledger was written, before OUT is replaced
    result = run(*private(clients, tmp_path / "round-3", "--dp-ledger", ledger), code=2)
    assert "No space left on device" in result.stderr
    assert ledger.read_bytes() == before and not (tmp_path / "round-3").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-2", "rounds.json"]  # no temporary left either


def test_another_federations_ledger_is_refused(clients, tmp_path):
    ledger = tmp_path / "rounds.json"
    other = [write_client(tmp_path / "zed", 4, seed=9, base_model_name="other-llama")]
    run("aggregate", *other, "--clip", 1.0, "--dp-noise", 1.0, "--dp-ledger", ledger, "-o", tmp_path / "theirs")
    before = ledger.read_bytes()
    result = run(*private(clients, tmp_path / "ours", "--dp-ledger", ledger), code=2)
    assert "belongs to another federation" in result.stderr and len(result.stderr.splitlines()) == 1
    assert ledger.read_bytes() == before and not (tmp_path / "ours").exists()


def test_an_edited_ledger_is_refused(clients, tmp_path):
    ledger = tmp_path / "rounds.json"
    run(*private(clients, tmp_path / "round-2", "--dp-ledger", ledger))
    document = json.loads(ledger.read_text())
    document["rounds"] = []  # "forget" the round spent
    ledger.write_text(json.dumps(document))
    result = run(*private(clients, tmp_path / "round-3", "--dp-ledger", ledger), code=2)
    assert "checksum does not match" in result.stderr and not (tmp_path / "round-3").exists()


# --- what is published --------------------------------------------------------------------------------


def test_under_dp_cards_and_manifest_name_no_participant_and_no_norm(clients, tmp_path):
    report = run_json(*private(clients, tmp_path / "out", "--global", "--dp-ledger", tmp_path / "rounds.json"))
    names = [c["name"] for c in report["clients"]]
    norms = [f"{c['update_norm']:.6g}" for c in report["clients"]] + [f"{c['clip_factor']:.6g}" for c in report["clients"]]
    for folder in [*names, "global"]:
        card = (tmp_path / "out" / folder / "README.md").read_text()
        assert "## Differential privacy" in card and "## Inputs" not in card
        assert not any(name in card for name in names if name != folder), folder  # at most its own name
        assert not any(number in card for number in norms) and "norm |" not in card, folder
    manifest_text = (tmp_path / "out" / "flexlora_manifest.json").read_text()
    manifest = json.loads(manifest_text)
    assert set(manifest) >= {"privacy", "method"} and not {"inputs", "outputs", "screened"} & set(manifest)
    assert not any(name in manifest_text for name in names) and not any(number in manifest_text for number in norms)
    ledger_text = (tmp_path / "rounds.json").read_text()
    assert not any(name in ledger_text for name in names)


def test_without_dp_accounting_the_error_is_one_line(clients, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # import fails as if it were not installed
    result = run("aggregate", *clients, "--clip", 1.0, "--dp-noise", 1.0, "-o", tmp_path / "out", code=2)
    assert result.stderr.startswith("Error: --dp-noise: needs the dp-accounting package") and len(result.stderr.splitlines()) == 1
    assert "pip install" in result.stderr and not (tmp_path / "out").exists()


def test_dp_accounting_is_imported_only_for_private_rounds():
    import subprocess

    code = "import sys, flexlora_cli.api, flexlora_cli.cli.app; assert 'dp_accounting' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120).returncode == 0


def test_calibrated_noise_meets_the_target_epsilon():
    from flexlora_cli.privacy import calibrate_noise, epsilon

    sigma = calibrate_noise(4.0, 1e-5, rounds=20, sampling_rate=0.3)
    assert epsilon([(sigma, 0.3)] * 20, 1e-5) <= 4.0 < epsilon([(sigma * 0.97, 0.3)] * 20, 1e-5)


def test_a_private_round_pushes_each_client_its_own_adapter_naming_no_one_else(clients, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from hub_server import HubServer

    with HubServer(token="hf_privacyTestToken") as server:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", "hf_privacyTestToken")
        report = run_json(*private(clients, tmp_path / "out", "--push-to-hub", "org/fl-{name}"))
        names = [c["name"] for c in report["clients"]]
        norms = [f"{c['update_norm']:.6g}" for c in report["clients"]]
        assert [p["repo_id"] for p in report["pushed"]] == [f"org/fl-{name}" for name in names]
        for name in names:
            remote = server.files(f"org/fl-{name}")
            assert sorted(set(remote) - {".gitattributes"}) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
            text = b"".join(remote.values())
            assert not any(other.encode() in text for other in names if other != name), name
            assert not any(number.encode() in text for number in norms) and b"## Differential privacy" in remote["README.md"]


def test_one_seed_gives_each_round_of_a_ledger_its_own_noise(clients, tmp_path):
    """Identical noise in two rounds would cancel in their difference: with a ledger, the round number is
    part of the noise's seed. Without one, the report warns that the same seed repeats the noise."""
    ledger = tmp_path / "rounds.json"
    run(*private(clients, tmp_path / "r1", "--seed", 7, "--global", "--dp-ledger", ledger))
    run(*private(clients, tmp_path / "r2", "--seed", 7, "--global", "--dp-ledger", ledger))
    first, second = written_deltas(tmp_path / "r1" / "global"), written_deltas(tmp_path / "r2" / "global")
    exact = clipped_sum(clients, WEIGHTS, 2.0)
    for name in exact:
        a, b = (first[name] - exact[name]).flatten(), (second[name] - exact[name]).flatten()
        assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) <= 5 / math.sqrt(a.numel()), name
    report = run_json(*private(clients, tmp_path / "r3", "--seed", 7))
    assert "--seed without --dp-ledger" in " ".join(report["notes"])
