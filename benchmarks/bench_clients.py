"""Benchmark: FlexLoRA rounds with hundreds to thousands of clients (issue 8).

Times every SVD path of `flexlora_cli.svd_paths` (and peak RSS, each path in its own process)
on synthetic clients with decaying spectra, and checks that the automatic choice is within
1.2x of the fastest path. Clients are generated on the fly, one at a time, from per-client
seeds, so no path ever holds more clients than it asks for and a pass can be replayed.

    python benchmarks/bench_clients.py                      # both cases of the issue
    python benchmarks/bench_clients.py --case module1000 --scale 0.25   # a quick look
    python benchmarks/bench_clients.py --crossover 2048     # stacked vs dense as R grows
    python benchmarks/bench_clients.py --calibrate          # rates for svd_paths.CPU_RATES
    python benchmarks/bench_clients.py --kernels --repeat 5 # Gram-QR vs Householder stacked SVD, 7B round

Cases (the issue's targets): `layer80` is 80 clients with the paper's heavy-tail rank mix (85% at
rank 8, 15% at rank 200: R = 2,944) on one Llama-2-7B layer (q/k/v/o 4096x4096, gate/up
11008x4096, down 4096x11008; each distinct shape is run once and counted as often as it occurs);
`module1000` is 1,000 such clients (R = 36,800) on one 4096x4096 module.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from flexlora_cli import flexlora, svd_paths

# (label, d_out, d_in, modules of this shape in the case)
CASES = {
    "layer80": (80, [("q/k/v/o_proj", 4096, 4096, 4), ("gate/up_proj", 11008, 4096, 2), ("down_proj", 4096, 11008, 1)]),
    "module1000": (1000, [("4096x4096", 4096, 4096, 1)]),
}
TOP_K = 200  # the largest rank the paper's clients ask back (randomized paths compute this many)
PATHS = (*svd_paths.EXACT_PATHS, *svd_paths.RANDOMIZED_PATHS)


def paper_ranks(count: int, scale: float = 1.0, seed: int = 0) -> list[int]:
    """The paper's heavy-tail rank mix: 85% of clients at rank 8, 15% at rank 200 (times `scale`), shuffled."""
    big = round(0.15 * count)
    ranks = [max(round(200 * scale), 1)] * big + [max(round(8 * scale), 1)] * (count - big)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    return [ranks[i] for i in order]


def decaying_clients(d_out: int, d_in: int, ranks: list[int], seed: int = 0, noise: float = 0.3):
    """A replayable source of client terms whose merged update has a decaying spectrum.

    Clients share a global low-rank direction set with power-law singular values 1/(1+j) (what
    they all learn), each seeing the top r_i of it, perturbed by client-specific directions of
    relative size `noise`: the sum has a fast-decaying head, a slow tail, and full rank R.
    Returns a function that yields the clients' LoraTerms one at a time, afresh per call.
    """
    generator = torch.Generator().manual_seed(seed)
    K = max(ranks)
    U = torch.randn(d_out, K, generator=generator) / math.sqrt(d_out)
    V = torch.randn(d_in, K, generator=generator) / math.sqrt(d_in)
    sigma = 1.0 / (1.0 + torch.arange(K, dtype=torch.float32))
    coeff = 2.0 / len(ranks)  # uniform weights times PEFT scaling alpha/r = 2

    def terms():
        for index, r in enumerate(ranks):
            own = torch.Generator().manual_seed(seed * 1_000_003 + index + 1)
            B = (U[:, :r] + noise * torch.randn(d_out, r, generator=own) / math.sqrt(d_out)) * sigma[:r]
            A = (V[:, :r] + noise * torch.randn(d_in, r, generator=own) / math.sqrt(d_in)).mT.contiguous()
            yield flexlora.LoraTerm(B, A, coeff)

    return terms


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_one(d_out: int, d_in: int, clients: int, scale: float, path: str, reference: str | None, repeat: int = 1) -> dict:
    """Time one path (in this process, so peak RSS is its own); optionally its error vs a saved exact truncation.

    The time is the best of `repeat` runs: on a shared machine the minimum is the least disturbed.
    """
    ranks, top_k = paper_ranks(clients, scale), max(round(TOP_K * scale), 1)
    terms = decaying_clients(d_out, d_in, ranks)
    plan = svd_paths.path_costs(d_out, d_in, ranks, top_k=top_k)[path]
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        svd = svd_paths.run_path(plan, terms, (d_out, d_in))
        times.append(time.perf_counter() - start)
    result = {"seconds": min(times), "times": times, "peak_rss": peak_rss_bytes(), "bound": plan.bound}
    top = flexlora.truncate(svd, top_k)
    if reference and Path(reference).exists():
        exact = torch.load(reference, weights_only=True)
        result["error"] = svd_paths.truncation_error(top, flexlora.LowRank(**exact), top_k)
    elif reference and plan.exact:
        torch.save({"U": top.U, "S": top.S, "Vh": top.Vh}, reference)
    return result


def bench_case(name: str, scale: float, skip_factor: float, max_bytes: int, timeout: int, repeat: int) -> list[dict]:
    clients, shapes = CASES[name]
    ranks, top_k = paper_ranks(clients, scale), max(round(TOP_K * scale), 1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-clients-") as scratch:
        for label, d_out, d_in, count in shapes:
            d_out, d_in = max(int(d_out * scale), 1), max(int(d_in * scale), 1)
            # The clients come from a generator here, not from files: give the cost model its speed.
            rates = dataclasses.replace(svd_paths.CPU_RATES, load=source_rate(d_out, d_in, ranks))
            plans = svd_paths.path_costs(d_out, d_in, ranks, top_k=top_k, rates=rates)
            auto_exact = svd_paths.choose_path(d_out, d_in, ranks, rates=rates).path
            auto_randomized = svd_paths.choose_path(d_out, d_in, ranks, svd="randomized", top_k=top_k, rates=rates).path
            fastest_exact = min(plans[path].seconds for path in svd_paths.EXACT_PATHS)
            reference = str(Path(scratch) / f"{label.replace('/', '_')}.pt")
            for path in PATHS:
                plan = plans[path]
                row = {
                    "case": name, "module": label, "shape": f"{d_out}x{d_in}", "count": count, "clients": clients,
                    "R": sum(ranks), "path": path, "predicted_s": plan.seconds, "predicted_bytes": plan.bytes,
                    "auto_exact": path == auto_exact, "auto_randomized": path == auto_randomized,
                }
                fastest = fastest_exact if plan.exact else min(plans[path].seconds for path in svd_paths.RANDOMIZED_PATHS)
                if path == "incremental" and plan.bound >= sum(ranks):
                    row["skipped"] = "= stacked (bound >= R: one fold)"
                elif plan.bytes > max_bytes:
                    row["skipped"] = f"predicted memory {plan.bytes / 2**30:.1f} GiB"
                elif plan.seconds > skip_factor * fastest and path not in (auto_exact, auto_randomized):
                    row["skipped"] = f"predicted {plan.seconds:.0f}s"
                else:
                    row.update(_subprocess(f"{d_out},{d_in},{clients},{scale},{path},{repeat}", reference, timeout))
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def source_rate(d_out: int, d_in: int, ranks: list[int], sample: int = 40) -> float:
    """Client-factor elements per second that `decaying_clients` delivers (one pass over a sample)."""
    terms = decaying_clients(d_out, d_in, ranks[:sample])
    start = time.perf_counter()
    count = sum(term.B.numel() + term.A.numel() for term in terms())
    return count / (time.perf_counter() - start)


def _subprocess(spec, reference, timeout) -> dict:
    command = [sys.executable, __file__, "--run-one", spec, "--reference", reference, "--threads", str(torch.get_num_threads())]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {timeout}s"}
    except subprocess.CalledProcessError as failure:
        return {"skipped": f"failed: {failure.stderr.strip().splitlines()[-1:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_clients(folder: Path, clients: int, d: int, scale: float = 1.0) -> list[Path]:
    """PEFT adapter folders of one d x d q_proj module each (the paper's rank mix), as clients upload them."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    key = "base_model.model.model.layers.0.self_attn.q_proj"
    folders = []
    for index, term in enumerate(decaying_clients(d, d, paper_ranks(clients, scale))()):
        rank = term.B.shape[1]
        out = folder / f"client-{index:04d}"
        # lora_alpha = 2r: PEFT's scaling 2 times the uniform weight 1/n is the generator's coefficient
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj"], base_model_name_or_path="bench/llama-like").save_pretrained(out)
        tensors = {f"{key}.lora_A.weight": term.A.contiguous(), f"{key}.lora_B.weight": term.B.contiguous()}
        save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        folders.append(out)
    return folders


def merge_from_disk(folders: list[Path], output: Path, svd: str, rank: int) -> dict:
    """`flexlora merge --rank` through the library, timing it and reading this process's peak RSS."""
    from flexlora_cli import api
    from flexlora_cli.engine import Compute

    start = time.perf_counter()
    report = api.merge(folders, output, rank=rank, compute=Compute(svd=svd), overwrite=True)
    return {
        "svd": svd, "seconds": time.perf_counter() - start, "peak_rss": peak_rss_bytes(),
        "paths": sorted({m["path"] for m in report["modules"]}), "randomized_error": report["randomized_error"],
        "energy_kept": report["energy_kept"],
    }


def disk_case(clients: int, d: int, timeout: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-clients-disk-") as scratch:
        start = time.perf_counter()
        folders = write_clients(Path(scratch) / "clients", clients, d)
        print(f"wrote {clients} client folders in {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
        listing = Path(scratch) / "clients.json"
        listing.write_text(json.dumps([str(f) for f in folders]))
        for svd in svd_paths.SVD_MODES:
            command = [sys.executable, __file__, "--merge-from", str(listing), "--svd", svd, "--threads", str(torch.get_num_threads())]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=True)
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            except (subprocess.TimeoutExpired, subprocess.CalledProcessError) as failure:
                rows.append({"svd": svd, "skipped": str(failure)[:200]})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def crossover(d: int, counts: list[int], repeat: int = 1) -> list[dict]:
    """Stacked vs dense exact paths on a d x d module as the client count (hence R) grows (best of `repeat`)."""
    rows = []
    for clients in counts:
        ranks = paper_ranks(clients)
        terms = decaying_clients(d, d, ranks)
        row = {"d": d, "clients": clients, "R": sum(ranks), "R/d": sum(ranks) / d,
               "auto": svd_paths.choose_path(d, d, ranks).path}
        plans = svd_paths.path_costs(d, d, ranks)
        held = list(terms())  # time the math, not the generator
        for path in ("stacked", "dense"):
            times = []
            for _ in range(repeat):
                start = time.perf_counter()
                svd_paths.run_path(plans[path], held, (d, d))
                times.append(time.perf_counter() - start)
            row[path] = min(times)
            row[f"{path}_predicted"] = plans[path].seconds
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def calibrate(d: int = 2048, device: str = "cpu") -> svd_paths.Rates:
    """Measured throughput of GEMM (fp32, fp64), QR, thin SVD and client generation on this machine
    (on `device`: svd_paths.CUDA_RATES comes from `--calibrate --device cuda`)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def best(call, repeat=3):
        call()
        sync()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            call()
            sync()
            times.append(time.perf_counter() - start)
        return min(times)

    X, Y = torch.randn(d, d // 2, device=device), torch.randn(d // 2, d, device=device)
    gemm = 2.0 * d * d * (d // 2) / best(lambda: X @ Y)
    F = torch.randn(2 * d, 288, dtype=torch.float64, device=device)  # a stacked factor of a 4096-wide module, R = 288: its Gram matrix
    gemm64 = 2.0 * F.shape[0] * F.shape[1] ** 2 / best(lambda: F.mT @ F)
    qr = (2.0 * d * (d // 2) ** 2 - 2.0 * (d // 2) ** 3 / 3) / best(lambda: torch.linalg.qr(X))
    S = torch.randn(d // 2, d // 2, device=device)
    svd = (d // 2) ** 3 / best(lambda: torch.linalg.svd(S, full_matrices=False))
    terms = decaying_clients(d, d, [8] * 50 + [200] * 10)  # generated and read on the CPU, then moved, as files are
    load = 2 * d * 2400 / best(lambda: [(t.B.to(device), t.A.to(device)) for t in terms()])
    return svd_paths.Rates(gemm=gemm, gemm64=gemm64, qr=qr, svd=svd, load=load)


def shared_a_clients(d_out: int, d_in: int, ranks: list[int], noise: float = 1e-3, seed: int = 0) -> list[flexlora.LoraTerm]:
    """Round-2 clients: the same A rows (the previous round's Vh) up to `noise`, B = the shared U diag(1/j) plus 5 %."""
    generator = torch.Generator().manual_seed(seed)
    K = max(ranks)
    U = torch.linalg.qr(torch.randn(d_out, K, generator=generator))[0]
    V = torch.linalg.qr(torch.randn(d_in, K, generator=generator))[0]
    sigma = 1.0 / (1.0 + torch.arange(K, dtype=torch.float32))
    terms = []
    for r in ranks:
        B = (U[:, :r] + 0.05 * torch.randn(d_out, r, generator=generator) / math.sqrt(d_out)) * sigma[:r]
        A = V[:, :r].mT + noise * torch.randn(r, d_in, generator=generator) / math.sqrt(d_in)
        terms.append(flexlora.LoraTerm(B, A, 2.0 / len(ranks)))
    return terms


# The Llama-2-7B round of bench_round.py: (d_out, d_in, modules of this shape), its clients' ranks.
ROUND_SHAPES = [(4096, 4096, 128), (11008, 4096, 64), (4096, 11008, 32)]
ROUND_RANKS = [8] * 6 + [16, 32, 64, 128]


def kernels(repeat: int) -> list[dict]:
    """flexlora.factored_svd (Gram QR) against Householder QR on the 7B round's stacks, alternating in this process.

    Per shape and client kind: the median wall and CPU seconds of each over `repeat` alternating
    runs (with --threads 1 the CPU seconds hardly depend on other jobs' load), and each one's worst
    relative difference to the fp64 truncation (Householder QR in fp64) at the clients' ranks where
    the spectrum has a gap (1 - s_{r+1}/s_r >= 0.1).
    """
    kernels_ = {"gram": flexlora.factored_svd, "householder": flexlora._householder_svd}
    rows = []
    for d_out, d_in, count in ROUND_SHAPES:
        kinds = {
            "random (5 % apart)": [t for t in decaying_clients(d_out, d_in, ROUND_RANKS, noise=0.05)()],
            "shared A (0.1 % apart)": shared_a_clients(d_out, d_in, ROUND_RANKS),
        }
        for kind, terms in kinds.items():
            B, A = flexlora.stack_terms(terms)
            times = {name: [] for name in kernels_}
            cpu = {name: [] for name in kernels_}
            for name, kernel in kernels_.items():
                kernel(B, A)  # warm up
            for _ in range(repeat):
                for name, kernel in kernels_.items():
                    start, start_cpu = time.perf_counter(), time.process_time()
                    kernel(B, A)
                    times[name].append(time.perf_counter() - start)
                    cpu[name].append(time.process_time() - start_cpu)
            exact = flexlora._householder_svd(B.double(), A.double())  # Householder in fp64: exact to 1e-15 here
            ranks = [r for r in sorted(set(ROUND_RANKS)) if exact.S[r] <= 0.9 * exact.S[r - 1]]
            row = {"shape": f"{d_out}x{d_in}", "count": count, "kind": kind, "gapped_ranks": ranks}
            for name, kernel in kernels_.items():
                row[f"{name}_s"] = statistics.median(times[name])
                row[f"{name}_best_s"] = min(times[name])
                row[f"{name}_cpu_s"] = statistics.median(cpu[name])
                row[f"{name}_error"] = max(svd_paths.truncation_error(kernel(B, A), exact, r) for r in ranks)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def print_kernels(rows: list[dict]) -> None:
    """The --kernels table, and the whole 7B round's math (modules x count) per client kind."""
    print("| module (count) | clients | Gram QR (s) | Householder (s) | speed-up | CPU s Gram / Householder | error Gram / Householder |")
    print("|---|---|---:|---:|---:|---|---|")
    for row in rows:
        print(
            f"| {row['shape']} (x{row['count']}) | {row['kind']} | {row['gram_s']:.3f} | {row['householder_s']:.3f} "
            f"| {row['householder_s'] / row['gram_s']:.2f}x | {row['gram_cpu_s']:.3f} / {row['householder_cpu_s']:.3f} "
            f"| {row['gram_error']:.1e} / {row['householder_error']:.1e} |"
        )
    for kind in sorted({row["kind"] for row in rows}):
        total = {key: sum(row[key] * row["count"] for row in rows if row["kind"] == kind) for key in rows[0] if key.endswith("_s")}
        print(
            f"whole 7B round (224 modules, math only), {kind}: Gram QR {total['gram_s']:.1f} s, Householder {total['householder_s']:.1f} s "
            f"(best runs {total['gram_best_s']:.1f} s / {total['householder_best_s']:.1f} s; CPU {total['gram_cpu_s']:.1f} s / {total['householder_cpu_s']:.1f} s)"
        )


def markdown(rows: list[dict]) -> str:
    lines = [
        "| case | module (shape, count) | R | path | time (s) | peak RSS (GiB) | predicted (s) | auto | error vs exact top-200 |",
        "|---|---|---:|---|---:|---:|---:|---|---:|",
    ]
    for row in rows:
        auto = ", ".join(kind for kind in ("exact", "randomized") if row[f"auto_{kind}"]) or ""
        measured = f"{row['seconds']:.1f}" if "seconds" in row else row.get("skipped", "-")
        rss = f"{row['peak_rss'] / 2**30:.2f}" if "peak_rss" in row else "-"
        error = f"{row['error']:.1e}" if "error" in row else "-"
        lines.append(
            f"| {row['case']} | {row['module']} {row['shape']} x{row['count']} | {row['R']} | {row['path']} | {measured} | {rss} "
            f"| {row['predicted_s']:.1f} | {auto} | {error} |"
        )
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[str]:
    """Auto's measured time vs the fastest measured path, per case and module shape, in both SVD modes."""
    out = []
    keys = sorted({(row["case"], row["module"]) for row in rows})
    for case, module in keys:
        group = [row for row in rows if (row["case"], row["module"]) == (case, module) and "seconds" in row]
        for kind, candidates in (("exact", svd_paths.EXACT_PATHS), ("randomized", PATHS)):
            timed = [row for row in group if row["path"] in candidates]
            auto = [row for row in timed if row[f"auto_{kind}"]]
            if not timed or not auto:
                out.append(f"{case} {module} {kind}: auto's path was not timed")
                continue
            fastest = min(timed, key=lambda row: row["seconds"])
            ratio = auto[0]["seconds"] / fastest["seconds"]
            out.append(
                f"{case} {module} --svd {kind}: auto={auto[0]['path']} {auto[0]['seconds']:.1f}s, fastest={fastest['path']} "
                f"{fastest['seconds']:.1f}s, ratio {ratio:.2f} ({'ok' if ratio <= 1.2 else 'OVER 1.2x'})"
            )
    for case in sorted({row["case"] for row in rows}):
        modules = {row["module"] for row in rows if row["case"] == case}
        totals = []
        for path in PATHS:
            timed = [row for row in rows if row["case"] == case and row["path"] == path and "seconds" in row]
            if len(timed) == len(modules):
                totals.append(f"{path} {sum(row['seconds'] * row['count'] for row in timed):.0f}s")
        auto = sum(row["seconds"] * row["count"] for row in rows if row["case"] == case and row["auto_exact"] and "seconds" in row)
        out.append(f"{case} whole case (modules x count): " + ", ".join(totals) + f"; auto (exact) {auto:.0f}s")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=sorted(CASES), action="append", help="Cases to run (default: all).")
    parser.add_argument("--scale", type=float, default=1.0, help="Shrink module dimensions, client ranks and k by this factor (keeps R/d; quick looks).")
    parser.add_argument("--skip-factor", type=float, default=6.0, help="Skip paths predicted this many times slower than the fastest (auto's are always run).")
    parser.add_argument("--max-gib", type=float, default=4.0, help="Skip paths predicted to need more memory than this.")
    parser.add_argument("--timeout", type=int, default=900, help="Seconds allowed per path.")
    parser.add_argument("--repeat", type=int, default=1, help="Runs per path; the best time counts (shared machines).")
    parser.add_argument("--crossover", type=int, metavar="D", help="Sweep client counts on a DxD module, stacked vs dense.")
    parser.add_argument("--counts", default="10,20,40,60,80,120", help="Client counts for --crossover.")
    parser.add_argument("--calibrate", action="store_true", help="Print measured rates for svd_paths.CPU_RATES (CUDA_RATES with --device cuda).")
    parser.add_argument("--device", default="cpu", help="Device for --calibrate (default: %(default)s).")
    parser.add_argument("--kernels", action="store_true", help="Gram-QR vs Householder stacked SVD on the 7B round's stacks, alternating (--repeat runs, medians).")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice); 1 is steadier on a shared machine.")
    parser.add_argument("--json", type=Path, help="Also write the rows to this file.")
    parser.add_argument("--disk", type=int, metavar="N", help="Write N one-module client folders and time `merge --rank 200` on them (exact, randomized).")
    parser.add_argument("--disk-dim", type=int, default=4096, help="Module size for --disk.")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    parser.add_argument("--merge-from", help=argparse.SUPPRESS)
    parser.add_argument("--svd", default="exact", help=argparse.SUPPRESS)
    parser.add_argument("--reference", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.merge_from:
        folders = [Path(f) for f in json.loads(Path(args.merge_from).read_text())]
        print(json.dumps(merge_from_disk(folders, Path(args.merge_from).parent / f"merged-{args.svd}", args.svd, TOP_K)))
        return
    if args.run_one:
        d_out, d_in, clients, scale, path, repeat = args.run_one.split(",")
        print(json.dumps(run_one(int(d_out), int(d_in), int(clients), float(scale), path, args.reference, int(repeat))))
        return
    header = (
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), load average {os.getloadavg()}"
    )
    print(header)
    if args.calibrate:
        print(calibrate(device=args.device))
        return
    if args.kernels:
        rows = kernels(max(args.repeat, 1))
        print_kernels(rows)
        print(f"load average at the end {os.getloadavg()}")
        return
    if args.disk:
        rows = disk_case(args.disk, args.disk_dim, args.timeout)
        print("| clients | --svd | paths | time (s) | peak RSS (GiB) | energy kept | randomized error |")
        print("|---:|---|---|---:|---:|---:|---:|")
        for row in rows:
            if "seconds" in row:
                error = "-" if row["randomized_error"] is None else f"{row['randomized_error']:.1e}"
                print(f"| {args.disk} | {row['svd']} | {','.join(row['paths'])} | {row['seconds']:.1f} | {row['peak_rss'] / 2**30:.2f} | {row['energy_kept']:.4f} | {error} |")
            else:
                print(f"| {args.disk} | {row['svd']} | - | {row['skipped']} | - | - | - |")
    elif args.crossover:
        rows = crossover(args.crossover, [int(c) for c in args.counts.split(",")], args.repeat)
        print("| clients | R | R/d | stacked (s) | dense (s) | predicted stacked/dense (s) | auto |")
        print("|---:|---:|---:|---:|---:|---:|---|")
        for row in rows:
            print(
                f"| {row['clients']} | {row['R']} | {row['R/d']:.2f} | {row['stacked']:.2f} | {row['dense']:.2f} "
                f"| {row['stacked_predicted']:.2f} / {row['dense_predicted']:.2f} | {row['auto']} |"
            )
    else:
        rows = []
        for case in args.case or sorted(CASES):
            rows += bench_case(case, args.scale, args.skip_factor, int(args.max_gib * 2**30), args.timeout, args.repeat)
        print(markdown(rows))
        print()
        for line in verdicts(rows):
            print(line)
    print(f"load average at the end {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
