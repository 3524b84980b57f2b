"""Memory of a round is bounded by one client's output, not by the round (issue 13), at small scale.

benchmarks/bench_memory.py runs as CI would run it: 40 clients (ranks 8 x 16, 16 x 12, 32 x 8,
64 x 4) on 16 narrow Llama layers, each command its own process, peak RSS from wait4. All outputs
together are about 13 times the largest one, so a round that held every output until the end (as
0.1.0 did), or kept each module at full rank instead of at the largest rank written, would exceed
the bound: peak RSS <= the RSS of `flexlora inspect` on the largest client + 5 x its output file.
A second run with 10 of those clients bounds the growth: 30 more clients may add at most two of the
largest outputs to the peak. The full-size numbers are in benchmarks/README.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_memory.py"
SMALL = ["--layers", "16", "--hidden-size", "256", "--intermediate-size", "688", "--repeat", "1", "--no-global", "--threads", "2"]  # 2 threads: per-thread buffers do not grow with the machine


def _measure(tmp_path, name: str, *extra: str) -> tuple[dict, dict]:
    report_file = tmp_path / f"{name}.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *SMALL, *extra, "--workdir", str(tmp_path / name), "--json", str(report_file)],
        capture_output=True, text=True, timeout=600,
    )
    assert report_file.exists(), done.stderr[-3000:]
    report = json.loads(report_file.read_text())
    assert list((tmp_path / name).iterdir()) == []  # generated clients and outputs are deleted
    return report, report["rounds"][0]


def test_peak_memory_is_bounded_by_the_largest_output_not_by_all_outputs(tmp_path):
    report, row = _measure(tmp_path, "clients40")
    assert report["clients"] == 40
    # The case must be able to tell streaming from holding everything.
    assert row["output_bytes"] > 10 * row["largest_output_bytes"]
    assert row["output_bytes"] > row["allowed_bytes"] - report["baseline"]["peak_rss_bytes"]
    assert row["target_met"], row
    # Growth with the number of clients: 10 clients of the same ranks (largest 64) against the 40.
    few_report, few = _measure(tmp_path, "clients10", "--ranks", "8,8,8,8,16,16,16,32,32,64")
    assert few["largest_output_bytes"] == row["largest_output_bytes"]
    added_outputs = row["output_bytes"] - few["output_bytes"]  # 30 more clients: about 3/4 of all outputs
    growth = row["peak_rss_bytes"] - few["peak_rss_bytes"]
    assert growth <= 2 * row["largest_output_bytes"] < added_outputs / 4, (growth, added_outputs)


def test_the_store_keeps_what_is_written_not_the_full_rank_update_it_was_sliced_from(tmp_path):
    """A kept update is a slice of the full-rank one (the first k rows of Vh are already contiguous):
    the store must hold k rows, not the whole matrix behind them, in memory and when spilled."""
    import torch

    from flexlora_cli import flexlora
    from flexlora_cli.methods.base import SvdUpdate
    from flexlora_cli.store import UpdateStore

    generator = torch.Generator().manual_seed(0)
    full = flexlora.factored_svd(torch.randn(300, 200, generator=generator), torch.randn(200, 400, generator=generator))
    kept = SvdUpdate(full).keep(8)
    for budget in (1 << 30, 0):  # in memory; spilled to the folder
        store = UpdateStore(tmp_path / f"spill-{budget}", budget=budget)
        store.put("module", kept)
        held = store.get("module").svd
        for tensor, shape in ((held.U, (300, 8)), (held.S, (8,)), (held.Vh, (8, 400))):
            assert tuple(tensor.shape) == shape
            assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        torch.testing.assert_close(held.dense(), flexlora.truncate(full, 8).dense(), rtol=0, atol=0)
        store.clear()
