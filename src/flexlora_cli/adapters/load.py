"""Reading and validating PEFT LoRA adapter folders, before any work is done."""

from __future__ import annotations

from pathlib import Path

import torch

from flexlora_cli.adapters.config import AdapterConfig, read_config
from flexlora_cli.adapters.files import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from flexlora_cli.adapters.model import (
    EMBEDDING_SUFFIXES,
    KEY_PREFIX,
    LINEAR_SUFFIXES,
    Adapter,
    LoraModule,
)
from flexlora_cli.adapters.tensors import TensorFile
from flexlora_cli.errors import AdapterError
from flexlora_cli.flexlora import lora_scaling

# Everything else in an adapter file is a plain tensor to average (modules_to_save, embeddings).
_DORA_MARKER = ".lora_magnitude_vector"
_LORA_BIAS_MARKER = ".lora_B.bias"


def load_adapter(source: str | Path, name: str | None = None) -> Adapter:
    """Validate a local PEFT LoRA adapter folder and index its modules (tensors stay on disk).

    Raises AdapterError naming the folder and the problem.
    """
    path = Path(source)
    if not path.exists():
        raise AdapterError(source, "no such file or folder")
    if not path.is_dir():
        raise AdapterError(source, "not a folder; expected a PEFT adapter folder with " + CONFIG_NAME)
    config = read_config(path)
    weights = TensorFile(_weights_file(path))
    modules, extra = _index_modules(weights.path, config, weights.shapes)
    weights.require_float([key for m in modules.values() for key in (m.a_key, m.b_key)])
    weights.require_float(extra, "non-LoRA tensors (modules_to_save)")
    dtype = _dominant_dtype([weights.index[m.a_key].torch_dtype for m in modules.values()])
    return Adapter(
        name=name or path.resolve().name,
        source=str(source),
        path=path,
        weights=weights,
        config=config,
        modules=modules,
        extra_keys=extra,
        dtype=dtype,
    )


# read_config (imported above) reads adapter_config.json; dense.py reads a --dense file's stored config with:
config_from_dict = AdapterConfig.from_dict


def module_rank_alpha(config: AdapterConfig, module: str) -> tuple[int, float]:
    """(r, alpha) for one module, with rank_pattern/alpha_pattern matched exactly as PEFT does."""
    return config.rank_alpha(module)


def _weights_file(folder: Path) -> Path:
    for filename in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME):
        if (folder / filename).is_file():
            return folder / filename
    raise AdapterError(folder, f"missing weights: neither {SAFETENSORS_WEIGHTS_NAME} nor {WEIGHTS_NAME}")


def _index_modules(
    path: Path, config: AdapterConfig, shapes: dict[str, tuple[int, ...]]
) -> tuple[dict[str, LoraModule], list[str]]:
    pairs: dict[str, dict[str, str]] = {}
    extra = []
    for key in shapes:
        if _DORA_MARKER in key:
            raise AdapterError(path, f"DoRA tensor {key} found; DoRA adapters cannot be merged as LoRA")
        if key.endswith(_LORA_BIAS_MARKER):
            raise AdapterError(path, f"LoRA bias tensor {key} found; lora_bias is not supported")
        for kind, suffixes in (("linear", LINEAR_SUFFIXES), ("embedding", EMBEDDING_SUFFIXES)):
            for side, suffix in zip("AB", suffixes):
                if key.endswith(suffix):
                    if not key.startswith(KEY_PREFIX):
                        raise AdapterError(path, f"unexpected tensor name {key} (no {KEY_PREFIX!r} prefix)")
                    name = key[len(KEY_PREFIX) : -len(suffix)]
                    pairs.setdefault(name, {"kind": kind})[side] = key
                    break
            else:
                continue
            break
        else:
            extra.append(key)
    if not pairs:
        raise AdapterError(path, "holds no LoRA tensors (lora_A/lora_B)")
    modules = {}
    for name, pair in pairs.items():
        modules[name] = _module_spec(path, config, name, pair, shapes)
    return modules, extra


def _module_spec(path, config, name, pair, shapes) -> LoraModule:
    missing = [side for side in "AB" if side not in pair]
    if missing:
        raise AdapterError(path, f"module {name} has no lora_{missing[0]} tensor")
    a_shape, b_shape = shapes[pair["A"]], shapes[pair["B"]]
    if len(a_shape) != 2 or len(b_shape) != 2:
        raise AdapterError(path, f"module {name}: LoRA factors must be matrices, got {a_shape} and {b_shape}")
    if a_shape[0] != b_shape[1]:
        raise AdapterError(path, f"module {name}: A is {a_shape} but B is {b_shape}; their ranks differ")
    rank, alpha = module_rank_alpha(config, name)
    if a_shape[0] != rank:
        raise AdapterError(
            path, f"module {name}: tensors have rank {a_shape[0]} but the config gives r={rank}"
        )
    return LoraModule(
        name=name,
        kind=pair["kind"],
        rank=rank,
        alpha=alpha,
        scaling=lora_scaling(alpha, rank, bool(config.use_rslora)),
        d_out=b_shape[0],
        d_in=a_shape[1],
    )


def _dominant_dtype(dtypes: list[torch.dtype]) -> torch.dtype:
    return max(set(dtypes), key=dtypes.count)
