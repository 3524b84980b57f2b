"""Reading and validating PEFT LoRA adapter folders, before any work is done."""

from __future__ import annotations

import json
import math
import warnings
import zipfile
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError, safe_open

from flexlora_cli.adapters.model import (
    EMBEDDING_SUFFIXES,
    KEY_PREFIX,
    LINEAR_SUFFIXES,
    Adapter,
    LoraModule,
)
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
    weights_path = _weights_file(path)
    shapes, dtypes = _tensor_index(weights_path)
    modules, extra = _index_modules(weights_path, config, shapes)
    floating = {d for d in dtypes.values() if d.is_floating_point}
    if len(floating) != len(set(dtypes.values())):
        raise AdapterError(weights_path, "holds non-floating-point tensors; expected LoRA weights")
    dtype = _dominant_dtype([dtypes[m.a_key] for m in modules.values()] or list(dtypes.values()))
    return Adapter(
        name=name or path.resolve().name,
        source=str(source),
        path=path,
        weights_path=weights_path,
        config=config,
        modules=modules,
        extra_keys=extra,
        dtype=dtype,
    )


def read_config(folder: Path) -> LoraConfig:
    """Parse adapter_config.json and refuse what cannot be merged faithfully."""
    config_path = folder / CONFIG_NAME
    if not config_path.exists() and not config_path.is_symlink():
        raise AdapterError(folder, f"missing {CONFIG_NAME}; is this a PEFT adapter folder?")
    if config_path.is_dir():
        raise AdapterError(config_path, "is a folder, not a JSON file")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise AdapterError(config_path, "cannot read: not UTF-8 text") from None
    except OSError as error:
        raise AdapterError(config_path, f"cannot read: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise AdapterError(config_path, f"invalid JSON: {error}") from None
    return config_from_dict(raw, config_path)


def config_from_dict(raw: object, config_path: Path) -> LoraConfig:
    """A LoraConfig from adapter_config.json's fields, refusing what cannot be merged faithfully."""
    if not isinstance(raw, dict):
        raise AdapterError(config_path, "expected a JSON object")
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(config_path, f"peft_type is {peft_type!r}; only LORA adapters can be merged")
    if raw.get("use_dora"):
        raise AdapterError(
            config_path, "DoRA adapters cannot be merged as LoRA (the magnitude vector is not linear)"
        )
    if raw.get("lora_bias"):
        raise AdapterError(config_path, "lora_bias=True is not supported")
    if raw.get("target_parameters"):
        raise AdapterError(config_path, "LoRA on target_parameters is not supported")
    _check_field_types(raw, config_path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fields from newer PEFT versions are ignored
            return LoraConfig.from_peft_type(**raw)
    except (TypeError, ValueError, AttributeError, KeyError) as error:  # PEFT's checks of field values
        raise AdapterError(config_path, f"not a valid LoRA config: {error}") from None


def _check_field_types(raw: dict, config_path: Path) -> None:
    """Types of the fields the merge relies on: PEFT does not check them, and a wrong one would
    surface later as a crash."""

    def refuse(field: str, expected: str):
        raise AdapterError(config_path, f"{field} must be {expected}, got {raw.get(field)!r}")

    if not _positive(raw.get("r"), integer=True):
        refuse("r", "a positive integer")
    if not _positive(raw.get("lora_alpha")):
        refuse("lora_alpha", "a positive number")
    for field, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = raw.get(field) or {}
        valid = isinstance(pattern, dict) and all(isinstance(k, str) and _positive(v, integer) for k, v in pattern.items())
        if not valid:
            refuse(field, f"an object mapping module names to positive {'integers' if integer else 'numbers'}")
    for field in ("fan_in_fan_out", "use_rslora"):
        if not isinstance(raw.get(field, False), bool):
            refuse(field, "true or false")
    for field in ("target_modules", "modules_to_save"):
        names = raw.get(field)
        listed = isinstance(names, list) and all(isinstance(n, str) for n in names)
        if not (names is None or isinstance(names, str) or listed):
            refuse(field, "a string or a list of strings")
    if not isinstance(raw.get("base_model_name_or_path") or "", str):
        refuse("base_model_name_or_path", "a string")


def _positive(value: object, integer: bool = False) -> bool:
    kinds = int if integer else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool) and value > 0 and math.isfinite(value)


def module_rank_alpha(config: LoraConfig, module: str) -> tuple[int, float]:
    """(r, alpha) for one module, with rank_pattern/alpha_pattern matched exactly as PEFT does."""
    rank_key = get_pattern_key(list(config.rank_pattern or {}), module)
    alpha_key = get_pattern_key(list(config.alpha_pattern or {}), module)
    rank = (config.rank_pattern or {}).get(rank_key, config.r)
    alpha = (config.alpha_pattern or {}).get(alpha_key, config.lora_alpha)
    return int(rank), float(alpha)


def read_tensor(adapter: Adapter, key: str) -> torch.Tensor:
    """One tensor from the adapter's weight file, checked to be finite."""
    path = adapter.weights_path
    if path.suffix == ".bin":
        tensor = _bin_state_dict(path)[key]
    else:
        try:
            with safe_open(path, framework="pt") as handle:
                tensor = handle.get_tensor(key)
        except (SafetensorError, OSError) as error:
            raise AdapterError(path, f"cannot read tensor {key}: {error}") from None
    if not bool(torch.isfinite(tensor).all()):
        raise AdapterError(path, f"tensor {key} contains NaN or Inf")
    return tensor


def _weights_file(folder: Path) -> Path:
    for filename in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME):
        if (folder / filename).is_file():
            return folder / filename
    raise AdapterError(folder, f"missing weights: neither {SAFETENSORS_WEIGHTS_NAME} nor {WEIGHTS_NAME}")


def _tensor_index(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.dtype]]:
    """Shapes and dtypes of every tensor, from the safetensors header alone."""
    if path.suffix == ".bin":
        state = _bin_state_dict(path)
        return {k: tuple(v.shape) for k, v in state.items()}, {k: v.dtype for k, v in state.items()}
    try:
        with safe_open(path, framework="pt") as handle:
            shapes, dtypes = {}, {}
            for key in handle.keys():
                slice_ = handle.get_slice(key)
                shapes[key] = tuple(slice_.get_shape())
                dtypes[key] = _SAFETENSORS_DTYPES.get(slice_.get_dtype(), torch.int64)
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterError(path, f"not a readable safetensors file (truncated or damaged): {error}") from None
    size = path.stat().st_size
    needed = sum(math.prod(s) * _itemsize(dtypes[k]) for k, s in shapes.items())
    if needed > size:
        raise AdapterError(path, f"truncated: header describes {needed} bytes of tensors, file has {size}")
    return shapes, dtypes


_BIN_CACHE: dict[tuple, dict[str, torch.Tensor]] = {}
_BIN_CACHE_SIZE = 64  # files; memory-mapped, so an evicted one is cheap to open again


def _bin_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A .bin state dict, loaded with weights_only=True: plain tensors only, never code."""
    stat = path.stat()
    key = (path.resolve(), stat.st_size, stat.st_mtime_ns)  # a rewritten file is read again
    if key not in _BIN_CACHE:
        try:
            # Memory-mapped (zip-format files): tensors are paged in only when a module is read,
            # so every client's .bin stays open without holding it all in memory.
            mmap = zipfile.is_zipfile(path)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch warns about odd pickles it then refuses
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as error:  # the unpickler raises many types; all mean "not plain tensors"
            raise AdapterError(
                path,
                f"not a plain tensor file, refused to unpickle it ({type(error).__name__})",
                hint=f"re-save it with safe_serialization=True to get {SAFETENSORS_WEIGHTS_NAME}",
            ) from None
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise AdapterError(path, "expected a dict of named tensors")
        if len(_BIN_CACHE) >= _BIN_CACHE_SIZE:  # long-running servers see new files every round
            _BIN_CACHE.pop(next(iter(_BIN_CACHE)))
        _BIN_CACHE[key] = state
    return _BIN_CACHE[key]


def _index_modules(
    path: Path, config: LoraConfig, shapes: dict[str, tuple[int, ...]]
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


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _dominant_dtype(dtypes: list[torch.dtype]) -> torch.dtype:
    return max(set(dtypes), key=dtypes.count)
