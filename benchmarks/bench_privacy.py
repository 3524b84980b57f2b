"""What trust and privacy cost on a Llama-2-7B-shaped layer (issue 14).

1. Writes the client set of bench_round.py (real PEFT folders, Llama-2-7B shapes, ranks 8x6,16,32,64,128)
   for `--layers` decoder layers (default 1: q,k,v,o,gate,up,down = 7 modules).
2. Times the norm pass every `flexlora aggregate` now makes before its first module (each client's
   ||dW||_F from its factors, flexlora_cli.clients.update_norms) with fp32 and with fp64 Gram matrices,
   and checks both against the dense fp64 norm on one module of each shape.
3. Times `flexlora aggregate` as a whole process without privacy and with `--clip --dp-noise` (the dense
   path: noise on the full-size update, then its SVD), uniform weights in both.

Tables go to stderr; `--json` prints one JSON document. Results and the machine: benchmarks/README.md.

    python benchmarks/bench_privacy.py                 # one 7B-shaped layer
    python benchmarks/bench_privacy.py --hidden-size 512 --intermediate-size 1376   # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_round  # noqa: E402  (the client set and the machine description)


def norm_pass(folders: list[Path]) -> dict:
    """Seconds of the norm pass with fp32 and fp64 Grams, and their worst relative error to dense fp64."""
    import torch

    from flexlora_cli.adapters.sources import open_adapters
    from flexlora_cli.clients import update_norms

    adapters = open_adapters([str(f) for f in folders])
    timings = {}
    norms = {}
    for label, dtype in (("fp32", torch.float32), ("fp64", torch.float64)):
        update_norms(adapters[:1], dtype)  # warm the page cache and the allocator
        start = time.perf_counter()
        norms[label] = update_norms(adapters, dtype)
        timings[label] = time.perf_counter() - start
    worst = {"fp32": 0.0, "fp64": 0.0}
    for adapter in adapters:
        seen = set()
        for name, module in adapter.modules.items():
            if (module.d_out, module.d_in) in seen:
                continue
            seen.add((module.d_out, module.d_in))
            B, A = adapter.factors(name)
            exact = float(torch.linalg.norm(module.scaling * B.double() @ A.double()))
            for label, dtype in (("fp32", torch.float32), ("fp64", torch.float64)):
                one = update_norms([_only(adapter, name)], dtype)[0]
                worst[label] = max(worst[label], abs(one - exact) / exact)
    return {"seconds": timings, "worst_relative_error": worst, "modules": len(adapters[0].modules), "clients": len(adapters)}


def _only(adapter, name):
    """The adapter restricted to one module (for the accuracy check)."""
    import copy

    one = copy.copy(adapter)
    one.modules = {name: adapter.modules[name]}
    return one


def timed_round(folders: list[Path], output: Path, extra: list[str]) -> dict:
    """`flexlora aggregate` as its own process: wall seconds and the child's peak RSS."""
    command = [sys.executable, "-c", "from flexlora_cli.cli.app import main; main()", "aggregate", *map(str, folders), "-o", str(output), "--json", *extra]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"flexlora aggregate failed: {done.stderr.strip()}")
    report = json.loads(done.stdout)
    return {"seconds": seconds, "report_epsilon": (report.get("privacy") or {}).get("epsilon")}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=1, help="Decoder layers of the client set (default 1).")
    parser.add_argument("--ranks", default=bench_round.DEFAULT_RANKS, help="Comma-separated client ranks.")
    parser.add_argument("--hidden-size", type=int, default=None)
    parser.add_argument("--intermediate-size", type=int, default=None)
    parser.add_argument("--clip", type=float, default=1.0, help="--clip of the private round (default 1).")
    parser.add_argument("--dp-noise", type=float, default=1.0, help="--dp-noise of the private round (default 1).")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="flexlora-bench-privacy-", dir=args.workdir))
    try:
        overrides = bench_round.shape_overrides(args, args.layers)
        ranks = [int(r) for r in args.ranks.split(",")]
        clients = bench_round.write_clients(workdir / "clients", bench_round.llama_config(overrides), ranks, "fp32", 0)
        folders = [c.path for c in clients]
        result = {
            "machine": bench_round.machine(), "layers": args.layers, "ranks": ranks,
            "norm_pass": norm_pass(folders),
            "plain_round": timed_round(folders, workdir / "plain", []),
            "private_round": timed_round(folders, workdir / "private", ["--clip", str(args.clip), "--dp-noise", str(args.dp_noise), "--seed", "0"]),
            "load_average": {"before": load_before, "after": os.getloadavg()},
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    _print(result)
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


def _print(result: dict) -> None:
    norms, plain, private = result["norm_pass"], result["plain_round"], result["private_round"]
    lines = [
        f"{result['layers']} layer(s), {norms['modules']} modules, {norms['clients']} clients, ranks {result['ranks']}",
        f"norm pass: fp32 Grams {norms['seconds']['fp32']:.2f} s (worst rel. error {norms['worst_relative_error']['fp32']:.1e}), "
        f"fp64 Grams {norms['seconds']['fp64']:.2f} s ({norms['worst_relative_error']['fp64']:.1e})",
        f"flexlora aggregate: {plain['seconds']:.1f} s; with --clip --dp-noise: {private['seconds']:.1f} s "
        f"({private['seconds'] / plain['seconds']:.1f}x)",
        f"load average before {result['load_average']['before']}, after {result['load_average']['after']}; "
        f"{result['machine']['cpus']} CPUs, {result['machine']['cpu']}",
    ]
    sys.stderr.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
