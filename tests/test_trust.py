"""Trust in a round (issue 14): update norms, `--clip`, and outlier screening (`--screen`), through the
CLI on real PEFT folders, against fp64 dense references computed here from the client files; and the
screening rule itself (flexlora_cli.trust) on norms of known shape."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import peft_deltas, raw_factors, relative_error, run, run_json, write_client
from flexlora_cli import trust






def dense_norm(folder: Path) -> float:
    """||dW||_F over all modules, dW = s B A, dense in fp64 from the files."""
    return math.sqrt(sum(float(torch.linalg.norm(s * B @ A)) ** 2 for B, A, s in raw_factors(folder).values()))


def poisoned(source: Path, target: Path, factor: float = 1000.0) -> Path:
    """A copy of a client whose every lora_B is `factor` times larger (a broken or hostile upload)."""
    shutil.copytree(source, target)
    weights = target / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors = {k: (v * factor if ".lora_B." in k else v).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return target


@pytest.fixture(scope="module")
def honest(tmp_path_factory) -> list[Path]:
    """Four clients at ranks 4, 4, 8 and 64 (one with rsLoRA, one with a rank_pattern)."""
    root = tmp_path_factory.mktemp("honest")
    return [
        write_client(root / "alice", 4, seed=1),
        write_client(root / "bob", 4, seed=2, rank_pattern={"layers.1.self_attn.q_proj": 2}),
        write_client(root / "carol", 8, seed=3, use_rslora=True, lora_alpha=6),
        write_client(root / "dave", 64, seed=4),
    ]


@pytest.fixture(scope="module")
def mallory(honest, tmp_path_factory) -> Path:
    return poisoned(honest[0], tmp_path_factory.mktemp("bad") / "mallory")


def written_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """s B A per module of a written adapter, read from its files in fp64 (PEFT would load it in fp32)."""
    return {name: s * B @ A for name, (B, A, s) in raw_factors(folder).items()}


def clipped_reference(folders, weights, clip) -> dict[str, torch.Tensor]:
    """sum_i w_i min(1, C / ||dW_i||) s_i B_i A_i, all in fp64 from the files."""
    total = sum(weights)
    deltas: dict[str, torch.Tensor] = {}
    for folder, weight in zip(folders, weights):
        factor = min(1.0, clip / dense_norm(folder))
        for name, (B, A, s) in raw_factors(folder).items():
            deltas[name] = deltas.get(name, 0) + (weight / total) * factor * s * (B @ A)
    return deltas


# --- norms ------------------------------------------------------------------------------------------


def test_update_norm_from_factors_equals_the_dense_norm():
    generator = torch.Generator().manual_seed(0)
    for d_out, d_in, r in ((96, 48, 1), (200, 130, 17), (64, 64, 90)):
        B = torch.randn(d_out, r, generator=generator, dtype=torch.float64)
        A = torch.randn(r, d_in, generator=generator, dtype=torch.float64)
        exact = float(torch.linalg.norm(B @ A)) ** 2
        assert trust.update_norm_squared(B, A) == pytest.approx(exact, rel=1e-12)
        assert trust.update_norm_squared(B.float(), A.float(), torch.float32) == pytest.approx(exact, rel=1e-5)  # fp32 Grams


def test_the_report_gives_each_clients_update_norm_over_all_its_modules(honest, tmp_path):
    default = run_json("aggregate", *honest, "-o", tmp_path / "a")
    fp64 = run_json("aggregate", *honest, "--precision", "fp64", "-o", tmp_path / "b")
    for folder, fast, exact in zip(honest, default["clients"], fp64["clients"]):
        assert fast["update_norm"] == pytest.approx(dense_norm(folder), rel=1e-5)  # fp32 Grams (module docstring: ~1e-6)
        assert exact["update_norm"] == pytest.approx(dense_norm(folder), rel=1e-12)
        assert fast["clip_factor"] is None and not fast["clipped"] and not fast["screened"]
    card = (tmp_path / "a" / "alice" / "README.md").read_text()
    assert "| update norm |" in card and f"{default['clients'][3]['update_norm']:.6g}" in card


# --- clipping ---------------------------------------------------------------------------------------


def test_the_clipped_merge_equals_the_clipped_weighted_sum(honest, tmp_path):
    norms = sorted(dense_norm(f) for f in honest)
    clip = (norms[1] + norms[2]) / 2  # two clients clipped, two not
    weights = [0.4, 0.1, 0.3, 0.2]
    report = run_json(
        "aggregate", *honest, "--weights", ",".join(map(str, weights)), "--clip", clip, "--global",
        "--precision", "fp64", "--dtype", "float64", "-o", tmp_path / "out",
    )
    expected = clipped_reference(honest, weights, clip)
    merged, loaded = written_deltas(tmp_path / "out" / "global"), peft_deltas(tmp_path / "out" / "global")
    for name, delta in expected.items():
        assert relative_error(merged[name], delta) <= 1e-10, name
        assert relative_error(loaded[name], delta) <= 1e-6, name  # PEFT loads it (in fp32)
    for folder, client in zip(honest, report["clients"]):
        factor = min(1.0, clip / dense_norm(folder))
        assert client["clip_factor"] == pytest.approx(factor, rel=1e-12)
        assert client["clipped"] == (factor < 1.0)
    assert sum(c["clipped"] for c in report["clients"]) == 2
    manifest = json.loads((tmp_path / "out" / "flexlora_manifest.json").read_text())
    assert manifest["clip"] == clip and [i["clip_factor"] for i in manifest["inputs"]] == [c["clip_factor"] for c in report["clients"]]


def test_clipping_scales_b_for_methods_that_average_raw_factors(tmp_path):
    """fedavg: B-bar = sum_i w_i c_i B_i, A-bar = sum_i w_i A_i (the clip applies to B, as the issue asks)."""
    folders = [write_client(tmp_path / n, 4, seed=s) for n, s in (("x", 21), ("y", 22), ("z", 23))]
    clip = min(dense_norm(f) for f in folders) * 0.5  # every client clipped
    run("aggregate", *folders, "--method", "fedavg", "--clip", clip, "-o", tmp_path / "out")
    inputs = [raw_factors(f) for f in folders]
    factors = [clip / dense_norm(f) for f in folders]
    for name, (_, _, s) in inputs[0].items():
        B = sum(c * i[name][0] for c, i in zip(factors, inputs)) / 3
        A = sum(i[name][1] for i in inputs) / 3
        assert relative_error(peft_deltas(tmp_path / "out" / "x")[name], s * B @ A) <= 1e-6, name


def test_a_poisoned_client_is_clipped_and_the_report_says_so(honest, mallory, tmp_path):
    clip = 1.5 * max(dense_norm(f) for f in honest)  # no honest client is clipped
    result = run("aggregate", *honest, mallory, "--clip", clip, "-o", tmp_path / "out")
    assert f"clipped to norm {clip:g}: mallory x" in result.stderr
    report = run_json("aggregate", *honest, mallory, "--clip", clip, "-o", tmp_path / "json")
    bad = report["clients"][-1]
    assert bad["clipped"] and bad["clip_factor"] == pytest.approx(clip / dense_norm(mallory), rel=1e-5)
    assert bad["clip_factor"] < 2e-3 and not any(c["clipped"] for c in report["clients"][:-1])


# --- screening --------------------------------------------------------------------------------------


def test_screening_leaves_a_poisoned_client_out_and_still_sends_it_the_result(honest, mallory, tmp_path):
    report = run_json("aggregate", *honest, mallory, "--screen", "--global", "--precision", "fp64", "--dtype", "float64", "-o", tmp_path / "out")
    assert report["screened"] == ["mallory"]
    bad = report["clients"][-1]
    assert bad["screened"] and bad["weight"] == 0.0 and bad["screen_score"] > trust.SCREEN_THRESHOLD
    assert [c["weight"] for c in report["clients"][:-1]] == pytest.approx([0.25] * 4)  # renormalized among the rest
    assert any("mallory was left out of the round" in note for note in report["notes"])
    expected = clipped_reference(honest, [1, 1, 1, 1], math.inf)  # the honest clients alone
    merged = written_deltas(tmp_path / "out" / "global")
    for name, delta in expected.items():
        assert relative_error(merged[name], delta) <= 1e-10, name
    assert json.loads((tmp_path / "out" / "mallory" / "adapter_config.json").read_text())["r"] == 4  # it still gets its share
    manifest = json.loads((tmp_path / "out" / "flexlora_manifest.json").read_text())
    assert manifest["screened"] == ["mallory"] and manifest["screen"]["rule"] == "per-rank log-MAD"
    human = run("aggregate", *honest, mallory, "--screen", "-o", tmp_path / "human")
    assert "note: mallory was left out of the round" in human.stderr


def test_screen_refuse_refuses_the_round(honest, mallory, tmp_path):
    result = run("aggregate", *honest, mallory, "--screen-refuse", "-o", tmp_path / "out", code=2)
    assert result.stderr.startswith(f"Error: {mallory}: its update norm per unit of rank is") and len(result.stderr.splitlines()) == 1
    assert "(--screen-refuse)" in result.stderr and not (tmp_path / "out").exists()


def test_an_honest_high_rank_client_is_not_flagged(honest, tmp_path):
    report = run_json("aggregate", *honest, "--screen-refuse", "-o", tmp_path / "out")  # dave is r=64 among r=4..8
    assert report["screened"] == [] and all(c["screen_score"] < trust.SCREEN_THRESHOLD for c in report["clients"])


@pytest.mark.parametrize("power", [0.0, 0.5, 1.0])
def test_the_rule_does_not_flag_honest_clients_for_their_rank(power):
    """Honest update norms that do not grow with the rank, grow as sqrt(r), or grow as r: none is flagged."""
    ranks = [8, 8, 8, 8, 8, 8, 16, 32, 64, 128]
    norms = [r**power * (1 + 0.01 * i) for i, r in enumerate(ranks)]
    assert trust.screen(norms, ranks).flagged == []


@pytest.mark.parametrize("victim", [0, 9])  # a low-rank and the highest-rank client
def test_the_rule_flags_a_client_scaled_by_1000(victim):
    ranks = [8, 8, 8, 8, 8, 8, 16, 32, 64, 128]
    norms = [r**0.5 * (1 + 0.01 * i) for i, r in enumerate(ranks)]
    norms[victim] *= 1000
    screening = trust.screen(norms, ranks)
    assert screening.flagged == [victim]
    assert screening.ratio(victim) == pytest.approx(1000 * (1 + 0.01 * victim) / 1.03, rel=0.05)  # vs the median client


def test_the_rule_keeps_a_floor_under_the_spread():
    """Five identical clients (MAD 0) and one with twice their norm: not an outlier."""
    screening = trust.screen([1.0] * 5 + [2.0], [8] * 6)
    assert screening.flagged == [] and screening.scores[-1] == pytest.approx(1.0)  # ln 2 / ln 2
    assert trust.screen([1.0] * 5 + [12.0], [8] * 6).flagged == [5]  # 12x > 2^3.5


def test_the_rule_ignores_zero_updates_and_needs_three_clients():
    assert trust.screen([0.0, 1.0, 1.1, 1000.0], [4, 4, 4, 4]).flagged == [3]
    assert trust.screen([0.0, 0.0, 0.0], [4, 4, 4]).flagged == []
    with pytest.raises(ValueError, match="at least 3 clients"):
        trust.screen([1.0, 1000.0], [4, 4])
