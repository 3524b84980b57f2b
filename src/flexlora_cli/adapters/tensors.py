"""An adapter's weight file: an index of its tensors (names, shapes, dtypes) and lazy, checked reads.

Safetensors files are indexed from the header alone and read one tensor at a time with `safe_open`;
.bin files are loaded with `torch.load(weights_only=True)`, memory-mapped, and cached per file.
Dtypes are named as safetensors names them ("F8_E4M3", "I32"), also for .bin files, so that a
refusal names the dtype the same way whatever the file format.
"""

from __future__ import annotations

import math
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from flexlora_cli.adapters.files import SAFETENSORS_WEIGHTS_NAME
from flexlora_cli.errors import AdapterError

# Every dtype safetensors 0.8 can hold: its name -> (bits per element, torch dtype or None if torch has none).
# Sub-byte dtypes (F4, F6_*) are packed; a tensor of n elements takes ceil(n * bits / 8) bytes.
SAFETENSORS_DTYPES: dict[str, tuple[int, torch.dtype | None]] = {
    name: (bits, getattr(torch, torch_name or "", None))
    for name, bits, torch_name in (
        ("BOOL", 8, "bool"),
        ("U8", 8, "uint8"),
        ("I8", 8, "int8"),
        ("U16", 16, "uint16"),
        ("I16", 16, "int16"),
        ("U32", 32, "uint32"),
        ("I32", 32, "int32"),
        ("U64", 64, "uint64"),
        ("I64", 64, "int64"),
        ("F4", 4, "float4_e2m1fn_x2"),
        ("F6_E2M3", 6, None),
        ("F6_E3M2", 6, None),
        ("F8_E4M3", 8, "float8_e4m3fn"),
        ("F8_E5M2", 8, "float8_e5m2"),
        ("F8_E8M0", 8, "float8_e8m0fnu"),
        ("F8_E4M3FNUZ", 8, "float8_e4m3fnuz"),
        ("F8_E5M2FNUZ", 8, "float8_e5m2fnuz"),
        ("F16", 16, "float16"),
        ("BF16", 16, "bfloat16"),
        ("F32", 32, "float32"),
        ("F64", 64, "float64"),
        ("C64", 64, "complex64"),
    )
}
# What a LoRA factor (or a modules_to_save tensor, which is averaged) may be.
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
FLOAT_DTYPES_TEXT = "float16, bfloat16, float32 or float64"
_NAMES = {torch_dtype: name for name, (_, torch_dtype) in SAFETENSORS_DTYPES.items() if torch_dtype is not None}


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry is finite. NaN and Inf propagate through a sum, so a finite sum settles it in one
    fast reduction (60x faster than an elementwise check on a 11008 x 128 factor); a non-finite sum (a
    non-finite entry, or the sum overflowing) is decided entry by entry."""
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def dtype_name(dtype: torch.dtype) -> str:
    """A torch dtype as safetensors names it (str(dtype) for the few it cannot hold, e.g. complex128)."""
    return _NAMES.get(dtype, str(dtype).removeprefix("torch."))


def byte_size(shape: tuple[int, ...], dtype: str) -> int:
    """Bytes a tensor of this shape and safetensors dtype takes in a file."""
    bits = SAFETENSORS_DTYPES[dtype][0]
    return -(-math.prod(shape) * bits // 8)


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # as safetensors names it

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return SAFETENSORS_DTYPES[self.dtype][1] if self.dtype in SAFETENSORS_DTYPES else None


class TensorFile:
    """One weight file (.safetensors or .bin), indexed on opening; tensors stay on disk until read.

    Raises AdapterError naming the file when it cannot be indexed (damaged, truncated, pickled code).
    """

    def __init__(self, path: Path):
        self.path = path
        self.index: dict[str, TensorInfo] = _bin_index(path) if path.suffix == ".bin" else _safetensors_index(path)

    def __repr__(self) -> str:
        return f"TensorFile({str(self.path)!r}, {len(self.index)} tensors)"

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: info.shape for key, info in self.index.items()}

    def read(self, key: str) -> torch.Tensor:
        """One tensor, checked to be finite."""
        if self.path.suffix == ".bin":
            tensor = _bin_state_dict(self.path)[key]
        else:
            try:
                with safe_open(self.path, framework="pt") as handle:
                    tensor = handle.get_tensor(key)
            except (SafetensorError, OSError) as error:
                raise AdapterError(self.path, f"cannot read tensor {key}: {error}") from None
        if not all_finite(tensor):
            raise AdapterError(self.path, f"tensor {key} contains NaN or Inf")
        return tensor

    def require_float(self, keys, what: str = "LoRA factors") -> None:
        """Refuse any of `keys` whose dtype is not one the merge computes with (F8, F4, integers, ...)."""
        for key in keys:
            name = self.index[key].dtype
            if name not in FLOAT_DTYPES:
                note = "" if name.startswith(("F", "BF")) else " (non-floating-point)"
                raise AdapterError(self.path, f"tensor {key} is {name}{note}; {what} must be {FLOAT_DTYPES_TEXT}")


def _safetensors_index(path: Path) -> dict[str, TensorInfo]:
    """Shapes and dtypes of every tensor, from the safetensors header alone."""
    try:
        with safe_open(path, framework="pt") as handle:
            index = {}
            for key in handle.keys():
                slice_ = handle.get_slice(key)
                index[key] = TensorInfo(tuple(slice_.get_shape()), slice_.get_dtype())
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterError(path, f"not a readable safetensors file (truncated or damaged): {error}") from None
    unknown = sorted({info.dtype for info in index.values()} - set(SAFETENSORS_DTYPES))
    if unknown:  # a newer safetensors than this table knows
        key = next(k for k, info in index.items() if info.dtype == unknown[0])
        raise AdapterError(path, f"tensor {key} is {unknown[0]}; LoRA factors must be {FLOAT_DTYPES_TEXT}")
    # safetensors checks this itself on opening; kept so that an older safetensors cannot read past the end.
    size = path.stat().st_size
    needed = sum(byte_size(info.shape, info.dtype) for info in index.values())
    if needed > size:
        raise AdapterError(path, f"truncated: header describes {needed} bytes of tensors, file has {size}")
    return index


def _bin_index(path: Path) -> dict[str, TensorInfo]:
    return {key: TensorInfo(tuple(t.shape), dtype_name(t.dtype)) for key, t in _bin_state_dict(path).items()}


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
