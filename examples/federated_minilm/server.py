"""The server side, and how each client starts a round: every step is a file exchange through flexlora.

One round of the server is `flexlora aggregate --method M --global`, called in-process through
`flexlora_cli.api.aggregate` (the sweep would otherwise spend most of its time starting processes) or
as the CLI (`cli=True`; the CI smoke test runs its first round that way). It writes OUT/<client>/ for
every participant (FLoRA: none) and OUT/global/, the method's global result. A sampled client starts
the next round, per method, from (flexlora_cli.methods.registry's `client_step`):

- flexlora, raflora: OUT/<client>/ if it took part, else `flexlora split OUT/global --ranks r` (alpha 2r);
- hetlora, lora-fair, fedavg: OUT/<client>/ if it took part, else the first r columns of B and rows of A
  of OUT/global/ (rows the global lacks, when no participant had the client's rank, are the seed's
  initial A rows with B = 0, so they can still learn);
- flora: a fresh LoRA on the base into which every round's OUT/global/ was folded (`flexlora fold`);
  one evolving base serves every client, which is what "fold every round it missed" amounts to.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import client

GLOBAL = "global"
BASE_FOLDER = "all-MiniLM-L6-v2"  # a folded base keeps the model's name, so `fold` knows it is the same model


def aggregate(
    method: str,
    uploads: list[tuple[str, Path]],
    num_samples: list[int] | None,
    out: Path,
    *,
    balanced: bool = False,
    privacy: dict | None = None,
    cli: bool = False,
) -> dict:
    """One server round: OUT/<client>/ (per-client methods) and OUT/global/. Returns the report.

    `num_samples` weights the clients (None: uniform); `privacy` is {clip, noise, sampling_rate, ledger, delta, seed}.
    """
    if cli:
        return _aggregate_cli(method, uploads, num_samples, out, balanced, privacy)
    from flexlora_cli import api
    from flexlora_cli.compute import Compute

    trust = {}
    if privacy:
        from flexlora_cli.privacy import Privacy

        trust = {"clip": privacy["clip"], "privacy": Privacy(noise=privacy["noise"], sampling_rate=privacy["sampling_rate"],
                                                             ledger=privacy["ledger"], seed=privacy["seed"], delta=privacy["delta"])}  # fmt: skip
    return api.aggregate([f"{name}={path}" for name, path in uploads], out, num_samples=num_samples, method=method,
                         global_=True, compute=Compute(balanced=balanced), **trust)  # fmt: skip


def _aggregate_cli(method, uploads, num_samples, out, balanced, privacy) -> dict:
    flags = ["--num-samples", ",".join(map(str, num_samples))] if num_samples else []
    if privacy:
        flags += ["--clip", str(privacy["clip"]), "--dp-noise", str(privacy["noise"]), "--dp-sampling-rate", str(privacy["sampling_rate"]),
                  "--dp-ledger", str(privacy["ledger"]), "--dp-delta", str(privacy["delta"]), "--seed", str(privacy["seed"])]  # fmt: skip
    command = [*flexlora_command(), "aggregate", *(f"{name}={path}" for name, path in uploads), "--method", method,
               "--global", "-o", str(out), "--json", *(["--balanced"] if balanced else []), *flags]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"flexlora aggregate failed ({done.returncode}):\n{' '.join(command)}\n{done.stderr}")
    report = json.loads(done.stdout)
    report["via_cli"] = True
    return report


def flexlora_command() -> list[str]:
    installed = Path(sys.executable).with_name("flexlora")
    return [str(installed)] if installed.exists() else [sys.executable, "-c", "from flexlora_cli.cli.app import main; main()"]


def split_to(global_folder: Path, rank: int, out: Path, *, balanced: bool = False) -> Path:
    """`flexlora split OUT/global --ranks r --alpha 2r`: a client that missed the round, at its rank and scaling."""
    from flexlora_cli import api
    from flexlora_cli.compute import Compute

    api.split(global_folder, [rank], out, alpha=2 * rank, compute=Compute(balanced=balanced))
    return out / f"rank-{rank}"


def first_columns(encoder: client.Encoder, global_folder: Path, rank: int, initial: dict, out: Path) -> Path:
    """The first `rank` columns of B and rows of A of a raw-factor method's global adapter, as a PEFT folder.

    Ranks the global does not hold (no participant reached them) start as the seed's initial A rows, B = 0.
    """
    _, factors = client.read_factors(global_folder)
    taken = {}
    for name, (B, A) in factors.items():
        B0, A0 = initial[name]
        kept = min(rank, A.shape[0])
        A_out = A0[:rank].clone()
        B_out = torch.zeros(B.shape[0], rank)
        A_out[:kept], B_out[:, :kept] = A[:kept], B[:, :kept]
        taken[name] = (B_out, A_out)
    client.write_adapter(encoder, out, rank, taken)
    return out


def write_base(encoder: client.Encoder, folder: Path) -> Path:
    """The pretrained model as a two-shard transformers folder: the adapted layers in their own small shard,
    so that `fold` rewrites 2 MB a round and copies the rest."""
    source = client.model_dir()
    folder = folder / BASE_FOLDER
    folder.mkdir(parents=True)
    small, large = {}, {}
    with safe_open(str(source / "model.safetensors"), framework="pt") as handle:
        for key in handle.keys():
            (small if encoder._is_top(key) else large)[key] = handle.get_tensor(key)
    names = {"model-00001-of-00002.safetensors": large, "model-00002-of-00002.safetensors": small}
    weight_map = {}
    for name, tensors in names.items():
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    (folder / "config.json").write_text((source / "config.json").read_text())
    return folder


def fold(base: Path, global_folder: Path, out: Path) -> Path:
    """`flexlora fold BASE OUT/global -o NEW_BASE` (FLoRA); returns the new base folder."""
    from flexlora_cli.fold import fold as fold_

    target = out / BASE_FOLDER
    fold_(base, global_folder, target)
    return target


def load_base(encoder: client.Encoder, base: Path) -> None:
    """Put a folded base's adapted-layer weights into the in-memory model."""
    with safe_open(str(base / "model-00002-of-00002.safetensors"), framework="pt") as handle:
        encoder.load_top({key: handle.get_tensor(key) for key in handle.keys()})


def energy_share(adapter: Path, rank: int) -> float:
    """The share of the adapter's update energy (squared singular values, all modules) in its top `rank`
    components per module: `flexlora inspect --spectrum rank`, overall."""
    from flexlora_cli import api

    return float(api.inspect([adapter], spectrum=[rank])[0]["spectrum"]["overall"][str(rank)])
