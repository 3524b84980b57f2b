"""Benchmark: how long a `flexlora` command takes to start, beside `python -c "import torch"` (issue 13).

Every command is its own process, and the commands are run in turns (one of each, then again), so that
a shared machine's load falls on all of them alike; the table shows medians and the ratio of each median
to that of `import torch`, the floor of any command that touches a tensor.

Targets (issue 13): `flexlora inspect` on a small adapter <= 1.6 x `import torch`; `flexlora --help` and
`flexlora --version` under 1 s.

    python benchmarks/bench_startup.py                      # 7 turns
    python benchmarks/bench_startup.py --compare-src OLD/src --compare-label "0.1.0"   # also an older checkout

`--compare-src` runs the same `inspect` with another checkout's `flexlora_cli` first on sys.path (for
example one made with `git worktree add /tmp/old v0.1.0`), in the same turns. The parent never imports
torch; the small adapter is written with safetensors' numpy API.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_INSPECT = 1.6  # x `import torch`
TARGET_HELP_SECONDS = 1.0


def write_adapter(folder: Path, rank: int = 8, width: int = 64, layers: int = 2) -> Path:
    """A small PEFT LoRA folder (q_proj and v_proj of `layers` layers), about 60 KB like the issue's."""
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    generator = np.random.default_rng(0)
    tensors = {}
    for layer in range(layers):
        for module in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = generator.standard_normal((rank, width), dtype=np.float32)
            tensors[f"{prefix}.lora_B.weight"] = generator.standard_normal((width, rank), dtype=np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "tiny-llama", "r": rank,
        "lora_alpha": 2 * rank, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


def cli(src: Path | None = None) -> list[str]:
    """The installed entry point, or the CLI of another checkout's src folder."""
    if src is not None:
        code = f"import sys; sys.path.insert(0, {str(src)!r}); sys.argv[0] = 'flexlora'; from flexlora_cli.cli.app import main; sys.exit(main())"
        return [sys.executable, "-c", code]
    script = Path(sys.executable).with_name("flexlora")
    if script.exists():
        return [sys.executable, str(script)]
    return [sys.executable, "-c", "import sys; sys.argv[0] = 'flexlora'; from flexlora_cli.cli.app import main; sys.exit(main())"]


def commands(adapter: Path, compare: Path | None, label: str) -> dict[str, list[str]]:
    table = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -c \"import torch\"": [sys.executable, "-c", "import torch"],
        "flexlora --version": [*cli(), "--version"],
        "flexlora --help": [*cli(), "--help"],
        "flexlora inspect ADAPTER": [*cli(), "inspect", str(adapter)],
        "flexlora inspect ADAPTER --json": [*cli(), "inspect", str(adapter), "--json"],
    }
    if compare is not None:
        table[f"flexlora inspect ADAPTER ({label})"] = [*cli(compare), "inspect", str(adapter)]
    return table


def run_once(command: list[str]) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed ({done.returncode}):\n{done.stderr.decode(errors='replace')[-2000:]}")
    return seconds


def measure(table: dict[str, list[str]], turns: int) -> dict[str, list[float]]:
    for command in table.values():  # warm the page cache once; not timed
        run_once(command)
    times: dict[str, list[float]] = {name: [] for name in table}
    for turn in range(turns):
        for name, command in table.items():
            times[name].append(run_once(command))
        print(f"[bench_startup] turn {turn + 1}/{turns}", file=sys.stderr, flush=True)
    return times


def markdown(times: dict[str, list[float]], load_before, load_after) -> str:
    torch_median = statistics.median(times["python -c \"import torch\""])
    lines = [
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {os.cpu_count()} CPUs ({_cpu()}), python {platform.python_version()}; "
        f"{len(next(iter(times.values())))} turns; load average {_load(load_before)} before, {_load(load_after)} after",
        "",
        "| command | median (s) | min (s) | max (s) | x import torch | target |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, values in times.items():
        median = statistics.median(values)
        target = ""
        if name in ("flexlora --version", "flexlora --help"):
            target = f"< {TARGET_HELP_SECONDS:.0f} s: {'met' if median < TARGET_HELP_SECONDS else 'NOT met'}"
        elif name.startswith("flexlora inspect ADAPTER") and "(" not in name:
            target = f"<= {TARGET_INSPECT} x: {'met' if median <= TARGET_INSPECT * torch_median else 'NOT met'}"
        lines.append(f"| `{name}` | {median:.2f} | {min(values):.2f} | {max(values):.2f} | {median / torch_median:.2f} | {target} |")
    return "\n".join(lines)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _load(values) -> str:
    return "/".join(f"{v:.1f}" for v in values)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_startup.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=7, help="Runs of each command, in turns (default: %(default)s).")
    parser.add_argument("--compare-src", type=Path, default=None, metavar="SRC", help="Also time `inspect` from this src folder of another checkout.")
    parser.add_argument("--compare-label", default="compare", help="Name of the --compare-src version (default: %(default)s).")
    parser.add_argument("--json", type=Path, default=None, help="Also write every time to this file.")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="flexlora-startup-") as tmp:
        adapter = write_adapter(Path(tmp) / "adapter")
        size = sum(f.stat().st_size for f in adapter.iterdir())
        print(f"[bench_startup] adapter of {size / 1024:.0f} KB at {adapter}", file=sys.stderr, flush=True)
        load_before = os.getloadavg()
        times = measure(commands(adapter, args.compare_src, args.compare_label), args.turns)
        load_after = os.getloadavg()
    table = markdown(times, load_before, load_after)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"times": times, "load_before": load_before, "load_after": load_after}, indent=1))
    torch_median = statistics.median(times["python -c \"import torch\""])
    met = statistics.median(times["flexlora inspect ADAPTER"]) <= TARGET_INSPECT * torch_median and all(
        statistics.median(times[name]) < TARGET_HELP_SECONDS for name in ("flexlora --version", "flexlora --help"))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
