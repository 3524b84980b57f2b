"""Smoke test of benchmarks/bench_round.py: every path runs and flexlora matches the dense fp64 truncation.

Correctness only, never speed. The benchmark runs as a separate process, as CI runs it, on a
2-layer client set with narrow layers (hidden 256, intermediate 688) so that the dense SVDs and
PEFT's merge take seconds; the full-size run is documented in benchmarks/README.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_round.py"
SMOKE = ["--layers", "2", "--hidden-size", "256", "--intermediate-size", "688", "--dense-sample", "3", "--peft-layers", "1"]


def test_smoke_run_matches_dense_fp64_truncation(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *SMOKE, "--workdir", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)  # stdout holds exactly one JSON document

    accuracy = report["accuracy"]
    assert accuracy["tolerance"] == 1e-5 and accuracy["ok"]
    assert len(accuracy["modules"]) == 3
    shapes = {tuple(check["shape"]) for check in accuracy["modules"]}
    assert shapes == {(256, 256), (688, 256), (256, 688)}  # one sampled module per distinct shape
    for check in accuracy["modules"]:
        assert check["min_relative_gap"] > 0.05  # the synthetic spectra make the truncations well defined
        assert check["differences"]["flexlora cpu"] <= 1e-5
        # PEFT loaded the generated folders (a wrong key would leave a zero adapter: difference ~1).
        assert check["differences"]["PEFT svd (rank 128)"] <= 1e-4
        assert check["differences"]["dense fp32 cpu"] <= 1e-4

    rows = {(row["path"], row["device"]): row for row in report["timings"]}
    ours = rows[("flexlora aggregate", "cpu")]
    assert ours["seconds"] > 0 and ours["peak_rss_bytes"] > 0
    assert rows[("dense SVD path (fp32)", "cpu")]["whole_model_seconds"] > 0
    assert rows[("PEFT add_weighted_adapter(svd)", "cpu")]["layers"] == 1
    if not torch.cuda.is_available():
        assert rows[("flexlora aggregate", "cuda")]["skipped"] == "no CUDA device"
    assert report["setup"]["modules"] == 14 and [c["rank"] for c in report["setup"]["clients"]] == [8] * 6 + [16, 32, 64, 128]
    assert list(tmp_path.iterdir()) == []  # generated clients and outputs are deleted without --keep
