"""Benchmark: peak memory of `flexlora aggregate` against the size of one client's output (issue 13).

A round's outputs are written one client at a time (round.py, store.py), so the process should need
its own start-up (torch, the CLI) plus about one client's output, however many clients the round has.
This script measures that on real PEFT client folders, each command as its own process:

1. Writes the client set with bench_round.py's generator (real PEFT folders, Llama-shaped modules).
2. The baseline: the peak RSS of `flexlora inspect` on the largest client, in the same run.
3. `flexlora aggregate` on all clients, then with `--global` (the round then keeps every module at
   its full rank, spilled to the staging folder past the store's 1 GiB budget): wall time, peak RSS
   (`wait4`'s ru_maxrss of the child), RSS and spilled bytes sampled while it runs, output sizes.
4. Checks peak RSS <= baseline + 5 x the largest client's output file (the issue's target).

Cases (`--case`):
    clients40     40 clients (16 at rank 8, 12 at 16, 8 at 32, 4 at 64) on 4 Llama-2-7B layers, fp32
    llama-2-70b   10 clients (ranks 8 x 6, 16, 32, 64, 128) on all 80 Llama-2-70B layers, bf16 (~7.4 GB of inputs)
    layer80       80 clients (the paper's mix) on one Llama-2-7B layer (7 modules), fp32
    clients1000   1,000 clients (the paper's mix: 85 % rank 8, 15 % rank 200) on one 4096x4096 module,
                  beside bench_clients.py's svd_paths-only run of the same case (no files, no CLI)

    python benchmarks/bench_memory.py                           # clients40, with and without --global
    python benchmarks/bench_memory.py --case llama-2-70b --no-global --workdir /work/tmp
    python benchmarks/bench_memory.py --case clients1000 --no-global
    python benchmarks/bench_memory.py --layers 1 --hidden-size 1024 --intermediate-size 2752   # seconds

The parent process never imports torch, so that the children's ru_maxrss (which counts the
parent's image a child holds until its exec) is theirs alone. Tables on stdout; `--json FILE`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_round  # noqa: E402  (the client set: shapes, generator, child processes)

SPILL_FOLDER = ".flexlora-spill"  # flexlora_cli.api.SPILL_FOLDER (not imported: the parent stays small)
WEIGHTS = "adapter_model.safetensors"
TARGET_OUTPUTS = 5  # the target: peak RSS <= baseline + 5 x the largest client's output


@dataclass(frozen=True)
class Case:
    model: str  # a key of bench_round.MODELS
    layers: int
    ranks: list[int]
    dtype: str
    about: str


def paper_mix(count: int) -> list[int]:
    """bench_clients.paper_ranks without importing torch: 85 % at rank 8, 15 % at rank 200 (order irrelevant here)."""
    big = round(0.15 * count)
    return [200] * big + [8] * (count - big)


CASES = {
    "clients40": Case("llama-2-7b", 4, [8] * 16 + [16] * 12 + [32] * 8 + [64] * 4, "fp32",
                      "40 clients (16 x r8, 12 x r16, 8 x r32, 4 x r64) on 4 Llama-2-7B layers, fp32"),
    "llama-2-70b": Case("llama-2-70b", 80, [8] * 6 + [16, 32, 64, 128], "bf16",
                        "10 clients (r8 x 6, 16, 32, 64, 128) on 80 Llama-2-70B layers, bf16"),
    "layer80": Case("llama-2-7b", 1, paper_mix(80), "fp32",
                    "80 clients (68 x r8, 12 x r200) on one Llama-2-7B layer, fp32"),
    "clients1000": Case("module4096", 1, paper_mix(1000), "fp32",
                        "1,000 clients (850 x r8, 150 x r200) on one 4096x4096 q_proj, fp32"),
}


# ---------------------------------------------------------------- measured processes


@dataclass
class Measured:
    """One command run as its own process."""

    label: str
    command: list[str]
    returncode: int
    seconds: float
    peak_rss_bytes: int  # ru_maxrss from wait4: this child only
    cpu_seconds: float
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (seconds, RSS bytes, spilled bytes)
    stdout: str = ""
    stderr: str = ""

    @property
    def max_spilled_bytes(self) -> int:
        return max((spilled for _, _, spilled in self.samples), default=0)


def flexlora_command() -> list[str]:
    """How to start the CLI from this interpreter: the installed entry point, else the same import."""
    script = Path(sys.executable).with_name("flexlora")
    if script.exists():
        return [sys.executable, str(script)]
    return [sys.executable, "-c", "import sys; from flexlora_cli.cli.app import main; sys.argv[0] = 'flexlora'; sys.exit(main())"]


def measure(label: str, command: list[str], workdir: Path, env: dict | None = None, watch: Path | None = None,
            interval: float = 0.2) -> Measured:
    """Run `command`, sampling its RSS (and the bytes spilled under `watch`'s staging siblings) every `interval` s.

    stdout and stderr go to files (a 1,000-client report would fill a pipe).
    """
    out, err = workdir / f"{label}.stdout", workdir / f"{label}.stderr"
    samples: list[tuple[float, int, int]] = []
    done = threading.Event()
    with out.open("wb") as stdout, err.open("wb") as stderr:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, env={**os.environ, **(env or {})})

        def sample() -> None:
            while not done.wait(interval):
                samples.append((time.perf_counter() - start, _rss(process.pid), _spilled(watch) if watch else 0))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    return Measured(
        label, command, process.returncode, seconds, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime, samples,
        out.read_text(errors="replace"), err.read_text(errors="replace"),
    )


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _spilled(output: Path) -> int:
    """Bytes in the spill folders of OUT's hidden staging siblings right now."""
    total = 0
    for folder in output.parent.glob(f".{output.name}*/{SPILL_FOLDER}"):
        for file in list(folder.glob("*")):
            try:
                total += file.stat().st_size
            except OSError:  # removed while we looked
                pass
    return total


def check(run: Measured) -> Measured:
    if run.returncode != 0:
        raise RuntimeError(f"{run.label} failed ({run.returncode}): {' '.join(run.command[:4])} ...\n{run.stderr[-3000:]}")
    return run


# ---------------------------------------------------------------- the client sets


def write_case(case: Case, root: Path, workdir: Path, overrides: dict) -> list[bench_round.Client]:
    """The clients as real PEFT folders, written by a child process (the parent never holds tensors)."""
    if case.model == "module4096":
        code = (
            "import json, sys; from pathlib import Path; import bench_clients; "
            "folders = bench_clients.write_clients(Path(sys.argv[1]), int(sys.argv[2]), 4096); "
            "print(json.dumps([str(f) for f in folders]))"
        )
        done = subprocess.run([sys.executable, "-c", code, str(root), str(len(case.ranks))], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))})
        if done.returncode:
            raise RuntimeError(f"writing the clients failed:\n{done.stderr[-3000:]}")
        folders = [Path(f) for f in json.loads(done.stdout.strip().splitlines()[-1])]
        ranks = [json.loads((f / "adapter_config.json").read_text())["r"] for f in folders]
        return [bench_round.Client(f.name, f, r, 1) for f, r in zip(folders, ranks)]
    spec = {"root": str(root), "overrides": overrides, "ranks": case.ranks, "dtype": case.dtype, "seed": 0, "shared_a": None}
    generated = bench_round.run_measured("generate", [json.dumps(spec)], workdir)
    return [bench_round.Client(name, Path(path), rank, count) for name, path, rank, count in generated["clients"]]


def case_overrides(case: Case, args) -> dict:
    if case.model == "module4096":
        return {}
    overrides = {**bench_round.MODELS[case.model], "num_hidden_layers": args.layers or case.layers, "vocab_size": 256}
    if args.hidden_size:
        overrides["hidden_size"] = args.hidden_size
    if args.intermediate_size:
        overrides["intermediate_size"] = args.intermediate_size
    return overrides


# ---------------------------------------------------------------- the benchmark


def benchmark(args, workdir: Path) -> dict:
    case = CASES[args.case]
    if args.ranks:
        ranks = [int(r) for r in args.ranks.split(",")]
        case = Case(case.model, case.layers, ranks, case.dtype, f"{len(ranks)} clients (ranks {args.ranks}) on {case.about.split(' on ', 1)[1]}")
    overrides = case_overrides(case, args)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(), "case": args.case,
        "about": case.about, "overrides": overrides, "device": args.device or "auto", "load_average_before": os.getloadavg(), "disk_free_before": _disk_free(workdir),
    }
    say(f"writing {case.about} under {workdir}")
    start = time.perf_counter()
    clients = write_case(case, workdir / "clients", workdir, overrides)
    report["generate_seconds"] = time.perf_counter() - start
    report["input_bytes"] = bench_round.folder_bytes(workdir / "clients")
    report["clients"] = len(clients)
    say(f"  {len(clients)} clients, {_size(report['input_bytes'])} of inputs in {report['generate_seconds']:.0f} s")
    cli = flexlora_command()
    env = {"HF_HUB_OFFLINE": "1", **({"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)} if args.threads else {})}
    largest = max(clients, key=lambda c: c.rank)
    runs = []
    for repeat in range(args.repeat):
        say(f"baseline: flexlora inspect {largest.name} (run {repeat + 1}/{args.repeat})")
        runs.append(check(measure(f"inspect-{repeat}", [*cli, "inspect", str(largest.path), "--json"], workdir, env)))
        say(f"  {runs[-1].seconds:.2f} s, peak RSS {_size(runs[-1].peak_rss_bytes)}")
    baseline = max(run.peak_rss_bytes for run in runs)
    report["baseline"] = {"command": "flexlora inspect (largest client)", "peak_rss_bytes": baseline,
                          "runs": [{"seconds": r.seconds, "peak_rss_bytes": r.peak_rss_bytes} for r in runs]}
    folders = [str(c.path) for c in clients]
    samples = ",".join(str(c.num_samples) for c in clients)
    rounds = []
    for global_ in [False, True] if args.global_ else [False]:
        output = workdir / ("round-global" if global_ else "round")
        command = [*cli, "aggregate", *folders, "-o", str(output), "--num-samples", samples, "--json", "--overwrite",
                   *(["--global"] if global_ else []), *(["--device", args.device] if args.device else [])]
        label = "aggregate --global" if global_ else "aggregate"
        say(f"{label}: {len(clients)} clients")
        run = check(measure(label.replace(" ", ""), command, workdir, env, watch=output))
        rounds.append(round_row(label, run, output, clients, baseline))
        say(f"  {run.seconds:.1f} s, peak RSS {_size(run.peak_rss_bytes)}, largest output {_size(rounds[-1]['largest_output_bytes'])}, "
            f"spilled at most {_size(run.max_spilled_bytes)}")
        if not args.keep:
            shutil.rmtree(output, ignore_errors=True)
    report["rounds"] = rounds
    if args.case == "clients1000" and args.svd_paths:
        report["svd_paths_only"] = svd_paths_only(len(clients), workdir, env)
    report["load_average_after"] = os.getloadavg()
    return report


def round_row(label: str, run: Measured, output: Path, clients, baseline: int) -> dict:
    """What one aggregate run measured, and the target it is held to."""
    sizes = {c.name: (output / c.name / WEIGHTS).stat().st_size for c in clients}
    global_file = output / "global" / WEIGHTS
    largest = max(sizes.values())
    allowed = baseline + TARGET_OUTPUTS * largest
    cli_report = json.loads(run.stdout)
    paths = {}
    for module in cli_report.get("modules", []):
        paths[module.get("path")] = paths.get(module.get("path"), 0) + 1
    return {
        "label": label, "seconds": run.seconds, "cpu_seconds": run.cpu_seconds, "peak_rss_bytes": run.peak_rss_bytes,
        "sampled_peak_rss_bytes": max((rss for _, rss, _ in run.samples), default=0),
        "above_baseline_bytes": run.peak_rss_bytes - baseline, "largest_output_bytes": largest,
        "output_bytes": sum(sizes.values()), "global_output_bytes": global_file.stat().st_size if global_file.exists() else None,
        "allowed_bytes": allowed, "target_met": run.peak_rss_bytes <= allowed, "max_spilled_bytes": run.max_spilled_bytes,
        "svd_paths": paths, "rss_timeline": _timeline(run.samples),
    }


def svd_paths_only(clients: int, workdir: Path, env: dict) -> dict:
    """bench_clients.py's run of the same case through svd_paths alone (generated clients, no files, no CLI)."""
    plan = subprocess.run(
        [sys.executable, "-c", "import json, sys; import bench_clients as b; from flexlora_cli import svd_paths; "
         "ranks = b.paper_ranks(int(sys.argv[1])); print(svd_paths.choose_path(4096, 4096, ranks).path)", str(clients)],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(HERE)},
    ).stdout.strip()
    say(f"svd_paths only: path {plan}, {clients} generated clients (bench_clients.py --run-one)")
    command = [sys.executable, str(HERE / "bench_clients.py"), "--run-one", f"4096,4096,{clients},1.0,{plan},1",
               "--reference", str(workdir / "reference.pt")]
    run = check(measure("svd-paths-only", command, workdir, env))
    result = json.loads(run.stdout.strip().splitlines()[-1])
    say(f"  {run.seconds:.1f} s whole process, {result['seconds']:.1f} s in the path, peak RSS {_size(run.peak_rss_bytes)}")
    return {"path": plan, "process_seconds": run.seconds, "path_seconds": result["seconds"], "peak_rss_bytes": run.peak_rss_bytes,
            "cpu_seconds": run.cpu_seconds}


def _timeline(samples, points: int = 12) -> list[list[float]]:
    """A few (seconds, RSS GiB, spilled GiB) points of the sampled run, for the JSON."""
    if not samples:
        return []
    step = max(len(samples) // points, 1)
    return [[round(t, 1), round(rss / 2**30, 3), round(spilled / 2**30, 3)] for t, rss, spilled in samples[::step]]


def machine() -> dict:
    """The machine, without importing torch in this process."""
    lscpu = shutil.which("lscpu")
    model = platform.processor()
    if lscpu:
        lines = subprocess.run([lscpu], capture_output=True, text=True).stdout.splitlines()
        model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), model)
    versions = {}
    for package in ("torch", "safetensors"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"cpus": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1), **versions}


def _disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


# ---------------------------------------------------------------- output


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"{report['date']}: {m['cpus']} CPUs ({m['cpu']}), {m['memory_gb']} GB RAM; python {m['python']}, torch {m['torch']}, "
        f"safetensors {m['safetensors']}; load average {_load(report['load_average_before'])} before, "
        f"{_load(report['load_average_after'])} after",
        f"{report['about']}: {report['clients']} clients, inputs {_size(report['input_bytes'])}; baseline (`flexlora inspect` on the "
        f"largest client) {_size(report['baseline']['peak_rss_bytes'])}",
        "",
        "| run | seconds | peak RSS | above baseline | outputs (all clients) | largest output | allowed (baseline + 5 x largest) "
        "| target | spilled (max) | SVD paths |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for row in report["rounds"]:
        outputs = _size(row["output_bytes"]) + (f" + global {_size(row['global_output_bytes'])}" if row["global_output_bytes"] else "")
        lines.append(
            f"| {row['label']} | {row['seconds']:.1f} | {_size(row['peak_rss_bytes'])} | {_size(row['above_baseline_bytes'])} "
            f"| {outputs} | {_size(row['largest_output_bytes'])} | {_size(row['allowed_bytes'])} "
            f"| {'met' if row['target_met'] else 'NOT met'} | {_size(row['max_spilled_bytes'])} "
            f"| {', '.join(f'{k} {v}' for k, v in row['svd_paths'].items())} |"
        )
    if "svd_paths_only" in report:
        only = report["svd_paths_only"]
        lines.append(f"| svd_paths only ({only['path']}, generated clients) | {only['process_seconds']:.1f} "
                     f"({only['path_seconds']:.1f} in the path) | {_size(only['peak_rss_bytes'])} | | | | | | | |")
    return "\n".join(lines)


def _size(count: int | None) -> str:
    if count is None:
        return "-"
    return f"{count / 2**30:.2f} GiB" if abs(count) >= 2**30 else f"{count / 2**20:.0f} MiB"


def _load(values) -> str:
    return "/".join(f"{v:.1f}" for v in values)


def say(message: str) -> None:
    print(f"[bench_memory] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_memory.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=sorted(CASES), default="clients40", help="Client set (default: %(default)s).")
    parser.add_argument("--ranks", default=None, help="Comma-separated client ranks instead of the case's (not for clients1000).")
    parser.add_argument("--layers", type=int, default=None, help="Decoder layers (default: the case's).")
    parser.add_argument("--hidden-size", type=int, default=None, help="Override the model's hidden size (a quick run).")
    parser.add_argument("--intermediate-size", type=int, default=None, help="Override the model's intermediate size.")
    parser.add_argument("--no-global", dest="global_", action="store_false", help="Skip the `--global` run.")
    parser.add_argument("--no-svd-paths", dest="svd_paths", action="store_false",
                        help="clients1000: skip the svd_paths-only run beside the whole process.")
    parser.add_argument("--repeat", type=int, default=2, help="Runs of the baseline `inspect` (the largest peak counts; default: %(default)s).")
    parser.add_argument("--device", default=None, help="`--device` of the measured `flexlora aggregate` (default: its own, auto).")
    parser.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of the measured processes (default: all cores).")
    parser.add_argument("--workdir", type=Path, default=None, help="Folder for the run's temporary folder (default: the system's).")
    parser.add_argument("--keep", action="store_true", help="Keep the generated clients and outputs.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the report to this file.")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    with bench_round.scratch_folder(args.workdir, "flexlora-memory-", keep=args.keep) as workdir:
        report = benchmark(args, workdir)
    print(markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0 if all(row["target_met"] for row in report["rounds"] if row["label"] == "aggregate") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
