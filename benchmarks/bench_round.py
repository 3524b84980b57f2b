"""Benchmark one FlexLoRA server round on a Llama-2-7B-shaped client set, beside the dense-SVD path and PEFT.

What it does, in order:

1. Writes a synthetic client set as real PEFT adapter folders (adapter_config.json from
   `peft.LoraConfig`, adapter_model.safetensors with PEFT's key names): the seven projections of
   every decoder layer, with shapes from `transformers.LlamaConfig()` (hidden 4096, intermediate
   11008, 32 layers; nothing is downloaded), ten clients with a heavy-tail rank mix. The factors
   share a decaying spectrum (as trained LoRA updates do), so the merged update has clear spectral
   gaps at the clients' ranks and the accuracy check below is meaningful.
2. Times `flexlora aggregate` end to end as its own process (read, merge, split back to every
   client's rank, write) on each device asked for, with the process's peak RSS (and peak GPU
   memory), and times a process that merely reads the same inputs.
3. Times the dense path (build dW densely, torch.linalg.svd, truncate to each client's rank, as the
   paper's reference code does) on a sample of modules, and PEFT's
   `add_weighted_adapter(combination_type="svd")` on a model with `--peft-layers` layers of the same
   shapes; extrapolates both to the whole model and prints the ratios.
4. Checks flexlora's written outputs against the dense fp64 truncation on the sampled modules
   (relative Frobenius difference) and exits 1 if any exceeds the tolerance.

Tables go to stderr; `--json` prints one JSON document on stdout, `--markdown` the tables as markdown.
Examples:

    python benchmarks/bench_round.py --layers 2                      # every path, 2 layers
    python benchmarks/bench_round.py --dtype bf16 --json > round.json  # the whole 7B shape
    python benchmarks/bench_round.py --layers 2 --hidden-size 256 --intermediate-size 688  # seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# The client set: six clients at rank 8 and a heavy tail up to 128, as in the paper's
# heavy-tail resource distributions.
DEFAULT_RANKS = "8,8,8,8,8,8,16,32,64,128"
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
BASE_MODEL = "meta-llama/Llama-2-7b-hf"  # recorded in the configs only; never downloaded
KEY_PREFIX = "base_model.model."
TOLERANCES = {"fp32": 1e-5, "bf16": 2e-2}  # bf16 outputs are rounded to 8 significant bits
ALPHA_PER_RANK = 2  # lora_alpha = 2r, a common choice
NOISE = 0.05  # client-specific deviation from the shared update, relative to each factor column
# --model: what differs from transformers' LlamaConfig defaults (Llama-2-7B); 70B has grouped-query
# attention (8 KV heads of 128: k_proj and v_proj are 8192 -> 1024).
MODELS = {
    "llama-2-7b": {},
    "llama-2-70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64, "num_key_value_heads": 8, "num_hidden_layers": 80},
}
CHILD = "--child"  # private mode: this script re-run as the measured process


@dataclass(frozen=True)
class Client:
    name: str
    path: Path
    rank: int
    num_samples: int


# ---------------------------------------------------------------- client set


def shape_overrides(args, layers: int) -> dict:
    """What differs from transformers' LlamaConfig defaults (Llama-2-7B) in this run."""
    overrides = {**MODELS[getattr(args, "model", "llama-2-7b")], "num_hidden_layers": layers, "vocab_size": 256}  # the vocabulary is never adapted
    if args.hidden_size:
        overrides["hidden_size"] = args.hidden_size
    if args.intermediate_size:
        overrides["intermediate_size"] = args.intermediate_size
    return overrides


def llama_config(overrides: dict):
    from transformers import LlamaConfig

    return LlamaConfig(**overrides)


def module_shapes(config) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every adapted projection of one decoder layer."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = (config.num_key_value_heads or config.num_attention_heads) * head_dim
    h, i = config.hidden_size, config.intermediate_size
    return dict(zip(PROJECTIONS, [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]))


def model_modules(config) -> dict[str, tuple[int, int]]:
    """Every adapted module of the model, by PEFT module name, with its shape."""
    return {
        f"model.layers.{layer}.{projection}": shape
        for layer in range(config.num_hidden_layers)
        for projection, shape in module_shapes(config).items()
    }


def write_clients(root: Path, config, ranks: list[int], dtype: str, seed: int, shared_a: float | None = None) -> list[Client]:
    """Real PEFT adapter folders, one per client, whose updates share a decaying spectrum.

    Per module, a shared update U diag(sigma) V^T (orthonormal U, V; sigma_k = 1/k) stands for
    what every client learns; client i holds its rank-r_i part, perturbed by NOISE. The merged
    update then has gaps at the clients' ranks, where the weight of the clients still present drops.
    With `shared_a`, the round after a FlexLoRA round: every client's A is the same V^T rows (what
    the server handed out) up to `shared_a` relative noise, and B = (U + NOISE) diag(sigma).
    """
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    counts = torch.randint(50, 1000, (len(ranks),), generator=generator).tolist()
    clients = [Client(f"client_{i:02d}", root / f"client_{i:02d}", r, n) for i, (r, n) in enumerate(zip(ranks, counts))]
    tensors = {client.name: {} for client in clients}
    top = max(ranks)
    sigma = 1.0 / torch.arange(1, top + 1, dtype=torch.float32)
    for name, (d_out, d_in) in model_modules(config).items():
        U = torch.linalg.qr(torch.randn(d_out, top, generator=generator))[0]
        V = torch.linalg.qr(torch.randn(d_in, top, generator=generator))[0]
        for client in clients:
            r, root_s = client.rank, sigma[: client.rank].sqrt()
            B = (U[:, :r] + NOISE * torch.randn(d_out, r, generator=generator) / math.sqrt(d_out)) * root_s
            A = root_s[:, None] * (V[:, :r].T + NOISE * torch.randn(r, d_in, generator=generator) / math.sqrt(d_in))
            if shared_a is not None:
                B, A = B * root_s, V[:, :r].T + shared_a * torch.randn(r, d_in, generator=generator) / math.sqrt(d_in)
            out = tensors[client.name]
            out[f"{KEY_PREFIX}{name}.lora_B.weight"] = (B / ALPHA_PER_RANK).to(_torch_dtype(dtype))  # PEFT scales by alpha / r
            out[f"{KEY_PREFIX}{name}.lora_A.weight"] = A.to(_torch_dtype(dtype))
    for client in clients:
        lora = LoraConfig(
            r=client.rank, lora_alpha=ALPHA_PER_RANK * client.rank, target_modules=[p.split(".")[1] for p in PROJECTIONS],
            lora_dropout=0.05, task_type="CAUSAL_LM", base_model_name_or_path=BASE_MODEL,
        )
        lora.save_pretrained(str(client.path))  # adapter_config.json, as PEFT writes it
        weights = {key: tensor.contiguous() for key, tensor in tensors.pop(client.name).items()}
        save_file(weights, str(client.path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return clients


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def read_module(folder: Path, name: str):
    """(B, A, scaling) of one module in fp64, straight from the files (independent of flexlora's reader)."""
    from safetensors import safe_open

    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{folder}: this benchmark writes and reads adapters without rank/alpha patterns")
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
        B = handle.get_tensor(f"{KEY_PREFIX}{name}.lora_B.weight").double()
        A = handle.get_tensor(f"{KEY_PREFIX}{name}.lora_A.weight").double()
    return B, A, scaling


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


# ---------------------------------------------------------------- measured processes


def run_measured(mode: str, args: list[str], workdir: Path, source: Path | None = None, threads: int | None = None) -> dict:
    """Run this script in CHILD mode as its own process: its wall time and what it reports of itself.

    `source`: a `src` folder of another flexlora checkout to import flexlora_cli from instead;
    `threads`: the process's OpenMP/MKL threads (default: the library's choice, all cores).
    """
    stats = workdir / f"stats-{mode}-{time.monotonic_ns()}.json"
    out, err = stats.with_suffix(".out"), stats.with_suffix(".err")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), os.environ.get("PYTHONPATH")]))
    with out.open("wb") as stdout, err.open("wb") as stderr:
        start = time.perf_counter()
        process = subprocess.Popen([sys.executable, __file__, CHILD, mode, str(stats), *args], stdout=stdout, stderr=stderr, env=env)
        code = process.wait()
        seconds = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"{mode} process failed ({code}):\n{err.read_text()[-3000:]}")
    result = json.loads(stats.read_text())
    result.update(seconds=seconds, stdout=out)
    return result


def peak_rss() -> int:
    """This process's peak resident memory in bytes.

    VmHWM, where Linux has it: getrusage's ru_maxrss also counts the parent's memory image that a
    spawned child held until its exec, which would report the benchmark's own size as the child's.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def child_main(argv: list[str]) -> int:
    """A separate process: `flexlora aggregate ...`, only reading the inputs, or writing the clients.

    (Writing the clients in a child keeps the parent small: the allocator keeps what it freed.)
    """
    mode, stats_path, *rest = argv
    import torch  # imported before the clock starts, like any CLI start-up; the wall time covers it

    device = rest[rest.index("--device") + 1] if mode == "aggregate" else rest[0] if mode == "read" else "cpu"
    start = time.perf_counter()
    code, stats = 0, {}
    if mode == "aggregate":
        from flexlora_cli.cli.app import app

        try:
            app(args=["aggregate", *rest], prog_name="flexlora")
        except SystemExit as exit_:
            code = exit_.code or 0
    elif mode == "read":
        read_inputs([Path(p) for p in rest[1:]], device)
    else:
        spec = json.loads(rest[0])
        clients = write_clients(Path(spec["root"]), llama_config(spec["overrides"]), spec["ranks"], spec["dtype"], spec["seed"], spec["shared_a"])
        stats["clients"] = [[c.name, str(c.path), c.rank, c.num_samples] for c in clients]
    stats["in_process_seconds"] = time.perf_counter() - start
    stats["peak_gpu_bytes"] = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    stats["peak_rss_bytes"] = peak_rss()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    stats["cpu_seconds"] = usage.ru_utime + usage.ru_stime  # less sensitive than wall time to other jobs' load
    Path(stats_path).write_text(json.dumps(stats))
    return int(code)


def read_inputs(folders: list[Path], device: str) -> None:
    """The lower bound of a round: load every tensor of every client onto the device, nothing else."""
    import torch
    from safetensors import safe_open

    for folder in folders:
        with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
            for key in handle.keys():
                handle.get_tensor(key).to(device, copy=True)  # a copy touches every byte, even of a memory map
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------- dense path, reference, PEFT


def sample_modules(config, count: int) -> list[str]:
    """`count` modules, cycling through the distinct shapes first, then through the layers."""
    by_shape: dict[tuple[int, int], list[str]] = {}
    for projection, shape in module_shapes(config).items():
        by_shape.setdefault(shape, []).append(projection)
    groups = list(by_shape.values())
    picks = []
    for index in range(min(count, len(model_modules(config)))):
        group = groups[index % len(groups)]
        turn = index // len(groups)
        projection = group[turn % len(group)]
        picks.append(f"model.layers.{(turn // len(group)) % config.num_hidden_layers}.{projection}")
    return picks


def time_dense(factors, weights, ranks, device: str):
    """The dense path on one module: dW = sum_i w_i s_i B_i A_i in fp32, full SVD, truncate per rank.

    Returns its seconds and its truncations {r: (B, A)} (on the CPU, for the accuracy table).
    """
    import torch

    moved = [(B.float().to(device), A.float().to(device), s) for B, A, s in factors]
    _sync(device)
    start = time.perf_counter()
    delta = sum(w * s * (B @ A) for (B, A, s), w in zip(moved, weights))
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    truncations = {r: ((U[:, :r] * S[:r]).contiguous(), Vh[:r].contiguous()) for r in sorted(set(ranks))}
    _sync(device)
    seconds = time.perf_counter() - start
    return seconds, {r: (B.cpu(), A.cpu()) for r, (B, A) in truncations.items()}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Reference:
    """The dense fp64 truncations of one module's merged update: the yardstick of every path.

    dW is built densely in fp64 and its singular vectors come from the eigendecomposition of the
    small-side Gram matrix (dW^T dW or dW dW^T): the same truncations as a dense fp64 SVD (to
    ~1e-10 here, where the spectral gaps are wide), at a third of its cost on a CPU.
    """

    def __init__(self, factors, weights, top: int):
        import torch

        delta = sum(w * s * (B @ A) for (B, A, s), w in zip(factors, weights))
        tall = delta.shape[0] >= delta.shape[1]
        eigenvalues, vectors = torch.linalg.eigh(delta.mT @ delta if tall else delta @ delta.mT)
        vectors = vectors.flip(1)[:, :top]  # descending
        self.shape, self.S = tuple(delta.shape), eigenvalues.flip(0).clamp_min(0).sqrt()
        # T_r = (dW V_r) V_r^T for a tall dW, U_r (U_r^T dW) for a wide one.
        self.left, self.right = (delta @ vectors, vectors.mT) if tall else (vectors, vectors.mT @ delta)
        self._cache = {}

    def truncation(self, rank: int):
        if rank not in self._cache:
            self._cache[rank] = self.left[:, :rank] @ self.right[:rank]
        return self._cache[rank]

    def difference(self, rank: int, actual) -> float:
        """Relative Frobenius difference of a (dense) update to the rank-`rank` truncation."""
        import torch

        expected = self.truncation(rank)
        actual = actual.double()
        return float(torch.linalg.norm(actual - expected) / max(float(torch.linalg.norm(expected)), 1e-300))

    def min_relative_gap(self, ranks) -> float | None:
        """Smallest 1 - s_{r+1} / s_r over the clients' ranks: how well defined the truncations are."""
        gaps = [1.0 - float(self.S[r] / self.S[r - 1]) for r in set(ranks) if r < self.S.numel()]
        return min(gaps) if gaps else None


def time_peft(args, clients, weights, references: dict[str, Reference]) -> dict:
    """PEFT add_weighted_adapter(svd) on a model with `--peft-layers` layers of the same shapes."""
    import torch
    from peft import LoraConfig, PeftModel, set_peft_model_state_dict
    from safetensors import safe_open
    from transformers import LlamaForCausalLM

    layers = args.peft_layers
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(llama_config(shape_overrides(args, layers))).eval()  # random init: no download
    names = [client.name for client in clients]
    peft_model = PeftModel(model, LoraConfig.from_pretrained(str(clients[0].path)), adapter_name=names[0])
    wanted = tuple(f"{KEY_PREFIX}model.layers.{i}." for i in range(layers))
    for client in clients:
        if client.name != names[0]:
            peft_model.add_adapter(client.name, LoraConfig.from_pretrained(str(client.path)))
        with safe_open(str(client.path / "adapter_model.safetensors"), framework="pt") as handle:
            state = {k: handle.get_tensor(k) for k in handle.keys() if k.startswith(wanted)}
        set_peft_model_state_dict(peft_model, state, adapter_name=client.name)
    top = max(client.rank for client in clients)
    start = time.perf_counter()
    with torch.no_grad():
        peft_model.add_weighted_adapter(names, list(weights), "merged", combination_type="svd", svd_rank=top)
    seconds = time.perf_counter() - start
    differences = {}
    for name, reference in references.items():
        if int(name.split(".")[2]) < layers:
            module = peft_model.base_model.model.get_submodule(name)
            differences[name] = reference.difference(top, module.get_delta_weight("merged"))
    return {"seconds": seconds, "layers": layers, "svd_rank": top, "differences": differences}


# ---------------------------------------------------------------- the benchmark


def svd_cost(shape) -> float:
    m, n = shape
    return m * n * min(m, n)


def extrapolate_dense(sampled: dict[str, float], modules: dict[str, tuple[int, int]]) -> tuple[float, list]:
    """Whole-model dense seconds: the mean measured time per shape; unmeasured shapes scaled by m*n*min(m,n)."""
    per_shape: dict[tuple[int, int], list[float]] = {}
    for name, seconds in sampled.items():
        per_shape.setdefault(modules[name], []).append(seconds)
    rate = sum(sum(t) for t in per_shape.values()) / sum(svd_cost(s) * len(t) for s, t in per_shape.items())
    total, estimated = 0.0, set()
    for shape in modules.values():
        if shape in per_shape:
            total += sum(per_shape[shape]) / len(per_shape[shape])
        else:
            total += rate * svd_cost(shape)
            estimated.add(shape)
    return total, sorted(list(s) for s in estimated)


def machine() -> dict:
    import peft
    import torch
    import transformers

    lscpu = shutil.which("lscpu")
    model = platform.processor()
    if lscpu:
        lines = subprocess.run([lscpu], capture_output=True, text=True).stdout.splitlines()
        model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), model)
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpus": os.cpu_count(), "cpu": model, "python": platform.python_version(), "torch": torch.__version__,
        "peft": peft.__version__, "transformers": transformers.__version__, "cuda_device": cuda,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def benchmark(args, workdir: Path) -> dict:
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)  # the dense path, timed in this process
    ranks = args.ranks
    config = llama_config(shape_overrides(args, args.layers))
    modules = model_modules(config)
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    available = [d for d in devices if not d.startswith("cuda") or torch.cuda.is_available()]
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(), "load_average_before": os.getloadavg()}
    _say(f"writing {len(ranks)} clients x {len(modules)} modules ({args.dtype}) under {workdir}")
    spec = {
        "root": str(workdir / "clients"), "overrides": shape_overrides(args, args.layers), "ranks": ranks, "dtype": args.dtype,
        "seed": args.seed, "shared_a": args.shared_a,
    }
    generated = run_measured("generate", [json.dumps(spec)], workdir)
    clients = [Client(name, Path(path), rank, count) for name, path, rank, count in generated["clients"]]
    total = sum(c.num_samples for c in clients)
    weights = [c.num_samples / total for c in clients]
    report["setup"] = {
        "layers": args.layers, "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "modules": len(modules), "dtype": args.dtype, "clients": [{"name": c.name, "rank": c.rank, "num_samples": c.num_samples} for c in clients],
        "input_bytes": folder_bytes(workdir / "clients"), "generate_seconds": generated["seconds"],
        "shared_a": args.shared_a, "repeat": args.repeat, "compare_src": str(args.compare_src) if args.compare_src else None,
        "threads": args.threads,
    }
    rows, outputs = measure_rounds(args, clients, devices, available, workdir)
    report["output_bytes"] = {device: folder_bytes(path) for device, path in outputs.items()}
    checks, references = dense_and_accuracy(args, config, clients, weights, outputs, available, rows)
    rows.append(peft_row(args, clients, weights, references, checks))
    _add_ratios(rows)
    ours = [v for check in checks for label, v in check["differences"].items() if label.startswith("flexlora")]
    worst = max(ours, default=0.0)
    report.update(
        timings=rows,
        accuracy={"tolerance": args.tolerance, "max_relative_difference": worst, "ok": worst <= args.tolerance, "modules": checks},
        load_average_after=os.getloadavg(),
    )
    return report


def measure_rounds(args, clients, devices, available, workdir):
    """`flexlora aggregate` and the read-only floor, each as its own process, per device."""
    rows, outputs = [], {}
    folders = [str(c.path) for c in clients]
    for device in devices:
        if device not in available:
            rows.append({"path": "flexlora aggregate", "device": device, "skipped": "no CUDA device"})
            rows.append({"path": "read inputs only", "device": device, "skipped": "no CUDA device"})
            continue
        samples = ",".join(str(c.num_samples) for c in clients)
        versions = {"flexlora aggregate": (None, device)}
        if args.compare_src:
            versions[f"flexlora aggregate ({args.compare_label})"] = (args.compare_src, f"{device} {args.compare_label}")
        runs = {label: [] for label in versions}
        for attempt in range(args.repeat):  # the versions alternate, so a change in the machine's load hits both
            for label, (source, key) in versions.items():
                output = workdir / f"round-{key.replace(':', '-').replace(' ', '-')}"
                _say(f"{label} --device {device} (run {attempt + 1}/{args.repeat})")
                command = [*folders, "-o", str(output), "--num-samples", samples, "--device", device, "--json", "--overwrite"]
                run = run_measured("aggregate", command, workdir, source, args.threads)
                cli_report = json.loads(run.pop("stdout").read_text())  # the CLI's own report: one JSON document
                run["svd_paths"] = dict(Counter(module.get("path", "stacked") for module in cli_report["modules"]))
                outputs[key] = output
                runs[label].append(run)
                _say(f"  {run['seconds']:.2f} s ({run['in_process_seconds']:.2f} s in process), peak RSS {_size(run['peak_rss_bytes'])}, SVD paths {run['svd_paths']}")
        for label, measured in runs.items():
            rows.append({"path": label, "device": device, "scope": f"whole round, {_layers(args.layers)}", **_median_run(measured)})
        _say(f"read inputs only --device {device}")
        read = run_measured("read", [device, *folders], workdir, threads=args.threads)
        read.pop("stdout")
        rows.append({"path": "read inputs only", "device": device, "scope": f"whole round, {_layers(args.layers)}", **read})
        _say(f"  {read['seconds']:.2f} s")
    return rows, outputs


def _median_run(runs: list[dict]) -> dict:
    """One row from repeated runs: median times, the largest peak memory, every run's times kept."""
    row = {key: statistics.median(run[key] for run in runs) for key in ("seconds", "in_process_seconds", "cpu_seconds")}
    row["peak_rss_bytes"] = max(run["peak_rss_bytes"] for run in runs)
    gpu = [run["peak_gpu_bytes"] for run in runs if run.get("peak_gpu_bytes") is not None]
    row["peak_gpu_bytes"] = max(gpu) if gpu else None
    row["svd_paths"] = runs[-1]["svd_paths"]
    row["runs"] = [{key: run[key] for key in ("seconds", "in_process_seconds", "cpu_seconds")} for run in runs]
    return row


def dense_and_accuracy(args, config, clients, weights, outputs, available, rows):
    """Time the dense path on the sampled modules (rows appended) and measure every path's accuracy."""
    modules, ranks = model_modules(config), args.ranks
    sample = sample_modules(config, args.dense_sample)
    checks, dense_times, references = [], {d: {} for d in available}, {}
    for index, name in enumerate(sample):
        _say(f"dense path + fp64 reference {index + 1}/{len(sample)}: {name} {modules[name]}")
        factors = [read_module(client.path, name) for client in clients]
        reference = references[name] = Reference(factors, weights, max(ranks))
        check = {"module": name, "shape": list(reference.shape), "min_relative_gap": reference.min_relative_gap(ranks), "differences": {}}
        for device, root in outputs.items():
            check["differences"][f"flexlora {device}"] = max(
                reference.difference(client.rank, scaling * (B @ A))
                for client in clients
                for B, A, scaling in [read_module(root / client.name, name)]
            )
        for device in available:
            dense_times[device][name], truncations = time_dense(factors, weights, ranks, device)
            check["differences"][f"dense fp32 {device}"] = max(reference.difference(r, B @ A) for r, (B, A) in truncations.items())
            _say(f"  dense path on {device}: {dense_times[device][name]:.2f} s")
        checks.append(check)
        _say(f"  relative differences {check['differences']}, spectral gap {check['min_relative_gap']}")
    for device in available if sample else []:
        whole, estimated = extrapolate_dense(dense_times[device], modules)
        rows.append({
            "path": "dense SVD path (fp32)", "device": device, "scope": f"{len(sample)} modules sampled",
            "seconds": sum(dense_times[device].values()), "whole_model_seconds": whole, "estimated_shapes": estimated,
            "per_module_seconds": dense_times[device],
        })
    return checks, references


def peft_row(args, clients, weights, references, checks) -> dict:
    """PEFT's timing row; its accuracy joins the sampled modules' checks."""
    if args.peft_layers == 0:
        return {"path": "PEFT add_weighted_adapter(svd)", "device": "cpu", "skipped": "--peft-layers 0"}
    _say(f"PEFT add_weighted_adapter(svd) on {_layers(args.peft_layers)}")
    peft = time_peft(args, clients, weights, references)
    _say(f"  {peft['seconds']:.2f} s")
    for check in checks:
        if check["module"] in peft["differences"]:
            check["differences"][f"PEFT svd (rank {peft['svd_rank']})"] = peft["differences"][check["module"]]
    return {
        "path": "PEFT add_weighted_adapter(svd)", "device": "cpu", "scope": _layers(peft["layers"]),
        **peft, "whole_model_seconds": peft["seconds"] * args.layers / peft["layers"],
    }


def _add_ratios(rows: list[dict]) -> None:
    """Whole-model seconds of each path over flexlora's on the same device (PEFT: over CPU)."""
    flexlora = {row["device"]: row["seconds"] for row in rows if row["path"] == "flexlora aggregate" and "seconds" in row}
    for row in rows:
        if "seconds" in row:
            row.setdefault("whole_model_seconds", row["seconds"])
            if row["device"] in flexlora:
                row["x_flexlora"] = row["whole_model_seconds"] / flexlora[row["device"]]


# ---------------------------------------------------------------- output


def timing_rows(report: dict) -> list[list[str]]:
    """The timing table as text cells; the first row is the header."""
    rows = [["path", "device", "measured on", "seconds", "in process (s)", "whole model (s)", "x flexlora", "peak RSS", "peak GPU"]]
    for row in report["timings"]:
        if "skipped" in row:
            rows.append([row["path"], row["device"], row["skipped"], *["-"] * 6])
            continue
        in_process = _secs(row["in_process_seconds"]) if "in_process_seconds" in row else "-"
        rows.append([
            row["path"], row["device"], row["scope"], _secs(row["seconds"]), in_process, _secs(row["whole_model_seconds"]),
            f"{row['x_flexlora']:.2f}x" if "x_flexlora" in row else "-",
            _size(row["peak_rss_bytes"]) if "peak_rss_bytes" in row else "-",
            _size(row["peak_gpu_bytes"]) if row.get("peak_gpu_bytes") is not None else "-",
        ])
    return rows


def accuracy_rows(report: dict) -> list[list[str]]:
    checks = report["accuracy"]["modules"]
    order = ("flexlora", "dense", "PEFT")
    labels = sorted({label for check in checks for label in check["differences"]}, key=lambda label: (order.index(label.split()[0]), label))
    rows = [["module", "shape", "min spectral gap", *labels]]
    for check in checks:
        gap = check["min_relative_gap"]
        rows.append([
            check["module"], "x".join(map(str, check["shape"])), "-" if gap is None else f"{gap:.2f}",
            *[f"{check['differences'][label]:.1e}" if label in check["differences"] else "-" for label in labels],
        ])
    return rows


def summary_lines(report: dict) -> list[str]:
    setup, m = report["setup"], report["machine"]
    ranks = ",".join(str(c["rank"]) for c in setup["clients"])
    accuracy = report["accuracy"]
    return [
        f"{report['date']}: {m['cpus']} CPUs ({m['cpu']}), {m['memory_gb']} GB RAM, CUDA: {m['cuda_device'] or 'none'}; "
        f"python {m['python']}, torch {m['torch']}, peft {m['peft']}, transformers {m['transformers']}; "
        f"load average {_load(report['load_average_before'])} before, {_load(report['load_average_after'])} after",
        f"{len(setup['clients'])} clients (ranks {ranks}), {setup['layers']} layers x 7 projections = {setup['modules']} modules "
        f"(hidden {setup['hidden_size']}, intermediate {setup['intermediate_size']}), {setup['dtype']}; "
        f"inputs {_size(setup['input_bytes'])}"
        + (f"; clients share A up to {setup['shared_a']:g}" if setup.get("shared_a") is not None else "")
        + (f"; medians of {setup['repeat']} runs" if setup.get("repeat", 1) > 1 else "")
        + (f"; {setup['threads']} thread(s)" if setup.get("threads") else ""),
        ("OK" if accuracy["ok"] else "FAILED") + f": worst flexlora difference {accuracy['max_relative_difference']:.1e} "
        f"(tolerance {accuracy['tolerance']:g}) to the dense fp64 truncation at each client's rank"
        if accuracy["modules"] else "accuracy not checked (--dense-sample 0)",
    ]


def print_tables(report: dict) -> None:
    """Rich tables on stderr."""
    from rich.console import Console
    from rich.table import Table

    out = Console(stderr=True, width=None if sys.stderr.isatty() else 170)
    lines = summary_lines(report)
    for line in lines[:2]:
        out.print(line, highlight=False)
    tables = (("One aggregation round", timing_rows(report), 3), ("Relative difference to the dense fp64 truncation", accuracy_rows(report), 1))
    for title, rows, text_columns in tables:
        if len(rows) == 1:
            continue
        table = Table(title=title)
        for index, header in enumerate(rows[0]):
            table.add_column(header, justify="left" if index < text_columns else "right")
        for row in rows[1:]:
            table.add_row(*row)
        out.print(table)
    out.print(lines[2], style="green" if report["accuracy"]["ok"] else "red", highlight=False)


def markdown(report: dict) -> str:
    """The same tables as GitHub markdown, for the README."""
    parts = ["\n\n".join(summary_lines(report))]
    for rows in (timing_rows(report), accuracy_rows(report)):
        if len(rows) == 1:
            continue
        lines = ["| " + " | ".join(row) + " |" for row in rows]
        lines.insert(1, "|" + "---|" * len(rows[0]))
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _secs(value: float) -> str:
    return f"{value:,.2f}" if value < 100 else f"{value:,.0f}"


def _size(count: int) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.0f} MiB"


def _load(values) -> str:
    return "/".join(f"{v:.1f}" for v in values)


def _layers(count: int) -> str:
    return f"{count} layer" + ("s" if count != 1 else "")


def _say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench_round.py",
        description=__doc__,
        epilog="Timings are wall-clock seconds; 'whole model' extrapolates sampled paths to all --layers layers. See benchmarks/README.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="llama-2-7b", help="Model shape of the client set (default: %(default)s).")
    parser.add_argument("--layers", type=int, default=None, help="Decoder layers of the client set (default: the --model's: 32 for 7B, 80 for 70B).")
    parser.add_argument("--ranks", default=DEFAULT_RANKS, help="Comma-separated LoRA rank of each client, one client per entry (default: %(default)s).")
    parser.add_argument("--dtype", choices=sorted(TOLERANCES), default="fp32", help="dtype of the client adapters, and so of the outputs (default: %(default)s).")
    parser.add_argument("--devices", default="cpu,cuda", help="Devices to run `flexlora aggregate` and the dense path on; cuda is skipped when absent (default: %(default)s).")
    parser.add_argument("--dense-sample", type=int, default=3, help="Modules on which to time the dense path and check accuracy, one per distinct shape first (default: %(default)s).")
    parser.add_argument("--peft-layers", type=int, default=1, help="Layers of the model for PEFT's add_weighted_adapter(svd); 0 skips PEFT (default: %(default)s).")
    parser.add_argument("--hidden-size", type=int, default=None, help="Override LlamaConfig's hidden_size (4096), e.g. for a quick run.")
    parser.add_argument("--intermediate-size", type=int, default=None, help="Override LlamaConfig's intermediate_size (11008).")
    parser.add_argument("--tolerance", type=float, default=None, help="Largest accepted relative difference (default: 1e-5 for fp32, 2e-2 for bf16).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the synthetic client set (default: %(default)s).")
    parser.add_argument("--shared-a", type=float, default=None, metavar="NOISE", help="A round after a FlexLoRA round: every client's A is the same rows up to this relative noise (e.g. 1e-3), B carries the spectrum.")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of every measured process and of the dense path (default: torch's choice, all cores); 1 is steadier on a shared machine.")
    parser.add_argument("--repeat", type=int, default=1, help="Runs of `flexlora aggregate` per device; the tables show medians (default: %(default)s).")
    parser.add_argument("--compare-src", type=Path, default=None, metavar="SRC", help="Also time `flexlora aggregate` imported from this src folder of another checkout, alternating with this one.")
    parser.add_argument("--compare-label", default="compare", help="Name of the --compare-src version in the tables (default: %(default)s).")
    parser.add_argument("--workdir", type=Path, default=None, help="Folder in which to create the run's own temporary folder (default: the system's).")
    parser.add_argument("--keep", action="store_true", help="Keep the generated clients and outputs instead of deleting them.")
    emit = parser.add_mutually_exclusive_group()
    emit.add_argument("--json", dest="json_", action="store_true", help="Print one JSON document on stdout (tables still go to stderr).")
    emit.add_argument("--markdown", action="store_true", help="Print the tables as GitHub markdown on stdout (for the README).")
    args = parser.parse_args(argv)
    if args.layers is None:
        from transformers import LlamaConfig

        args.layers = MODELS[args.model].get("num_hidden_layers", LlamaConfig().num_hidden_layers)
    if args.layers <= 0 or args.dense_sample < 0 or args.peft_layers < 0 or args.repeat <= 0:
        parser.error("--layers and --repeat must be positive; --dense-sample and --peft-layers must not be negative")
    if args.threads is not None and args.threads <= 0:
        parser.error("--threads must be positive")
    if args.compare_src is not None and not (args.compare_src / "flexlora_cli").is_dir():
        parser.error(f"--compare-src: {args.compare_src} has no flexlora_cli package (give a checkout's src folder)")
    try:
        args.ranks = [int(r) for r in args.ranks.split(",")]
    except ValueError:
        parser.error(f"--ranks: expected comma-separated integers, got {args.ranks!r}")
    smallest = min(min(shape) for shape in module_shapes(llama_config(shape_overrides(args, 1))).values())
    if not 0 < min(args.ranks) <= max(args.ranks) <= smallest:
        parser.error(f"--ranks must lie between 1 and the smallest module dimension, {smallest}")
    args.peft_layers = min(args.peft_layers, args.layers)
    if args.tolerance is None:
        args.tolerance = TOLERANCES[args.dtype]
    return args


@contextlib.contextmanager
def scratch_folder(parent: Path | None, prefix: str, keep: bool = False):
    """A new temporary folder (in `parent`, created if needed), deleted afterwards unless `keep`: the
    benchmarks never delete a folder they did not create."""
    if parent:
        parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield folder
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str]) -> int:
    if argv[:1] == [CHILD]:
        return child_main(argv[1:])
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up the generated data when killed
    with scratch_folder(args.workdir, "flexlora-bench-", keep=args.keep) as workdir:
        report = benchmark(args, workdir)
    print_tables(report)
    if args.json_:
        print(json.dumps(report, indent=2, sort_keys=True, default=str))
    elif args.markdown:
        print(markdown(report))
    return 0 if report["accuracy"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
