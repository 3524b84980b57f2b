"""`fold`: a base model with an adapter's update added to its weights, as PEFT's merge_and_unload leaves it.

This is how FLoRA clients start each round (they fold the stacked global adapter into their base and
train a fresh LoRA) and how a round's global model is served. Every adapted weight W becomes
W + s * B @ A in W's own layout, computed in fp64 and rounded once to W's dtype; tensors that the
adapter saves whole (modules_to_save, saved embedding layers) replace the base's. Streams one shard at
a time; shard files, the index and every other file of the base keep their names and layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flexlora_cli.adapters.base_model import BaseModel, ShardProgress, open_base_model, write_base_model
from flexlora_cli.adapters.model import KEY_PREFIX, Adapter
from flexlora_cli.adapters.sources import open_adapter
from flexlora_cli.adapters.tensors import FLOAT_DTYPES, FLOAT_DTYPES_TEXT
from flexlora_cli.adapters.output import OutputFolder
from flexlora_cli.errors import AdapterError, IncompatibleAdaptersError

# PEFT saves an adapted embedding's own weight as "<module>.base_layer.weight" (save_embedding_layers).
_BASE_LAYER = ".base_layer."
_TRAINABLE_TOKENS = ".trainable_tokens_"
_FP64_BLOCK = 1 << 20  # elements per fp64 block (8 MiB): bounds the temporaries of one weight's update


def fold(
    base: str | Path,
    adapter: str | Path | Adapter,
    output: str | Path,
    *,
    overwrite: bool = False,
    allow_base_mismatch: bool = False,
    progress: ShardProgress | None = None,
) -> dict[str, Any]:
    """Write OUTPUT: the base model with the adapter folded into its weights.

    Args:
        base: a transformers model folder (model.safetensors, or shards and model.safetensors.index.json),
            or a Hub reference (org/name[@revision], hf://org/name@revision/folder).
        adapter: a PEFT LoRA adapter folder or Hub reference (or a loaded Adapter).
        output: the folder to write; replaced atomically, and only with --overwrite if not empty.
        allow_base_mismatch: fold even if the adapter records another base model.
        progress: called after each shard is written with (shards done, shards in all, file name).

    Returns:
        A JSON-ready report: base, adapter, output, shards, folded modules, replaced tensors, copied and
        skipped files.

    Raises:
        AdapterError: an input is missing or malformed, or the adapter does not fit the base (a module's
            weight is missing, its shape differs, or it is quantized).
        IncompatibleAdaptersError: the adapter records another base model.
        OutputError: the output cannot be written.
    """
    lora = open_adapter(adapter)  # first: the base may be a long download
    model = open_base_model(base)
    _check_same_model(model, lora, allow_base_mismatch)
    plan = FoldPlan.make(model, lora)
    output = Path(output)
    with OutputFolder(output, [model.folder, lora.path, lora.weights_path], overwrite=overwrite, command="fold") as out:
        shards = write_base_model(model, out.staging, plan.apply, plan.keys, progress)
        out.commit({"base": model.source, "base_provenance": model.provenance or None, "adapter": lora.source,
                    "adapter_provenance": lora.provenance or None, "modules": sorted(plan.steps)})
    return {
        "command": "fold",
        "base": model.source,
        "base_provenance": model.provenance or None,
        "adapter": lora.source,
        "adapter_provenance": lora.provenance or None,
        "output": str(output),
        "shards": shards,
        "modules": [step.report() for step in plan.steps.values()],
        "modules_to_save": [{"tensor": tensor, "weight": key} for key, tensor in plan.replacements.items()],
        "copied": model.other_files,
        "skipped": model.skipped,
    }


def add_low_rank(weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """weight += left @ right, in place: the sum in fp64, rounded once to weight's dtype.

    Row block by row block, so the fp64 temporaries stay small whatever the weight's size.
    """
    if weight.shape != (left.shape[0], right.shape[1]) or left.shape[1] != right.shape[0]:
        raise ValueError(f"cannot add {tuple(left.shape)} @ {tuple(right.shape)} to a {tuple(weight.shape)} weight")
    left, right = left.double(), right.double()
    rows = max(1, _FP64_BLOCK // max(1, weight.shape[1]))
    for start in range(0, weight.shape[0], rows):
        block = weight[start : start + rows]
        block.copy_(round_once(block.double() + left[start : start + rows] @ right, weight.dtype))
    return weight


def round_once(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating-point values rounded to the nearest `dtype` value (ties to even), in one rounding; a new tensor.

    torch casts fp64 to bf16/fp16 through fp32, rounding twice (1 + 2^-8 + 2^-30 becomes 1 in bf16,
    not 1 + 2^-7). Rounding to fp32 *to odd* first keeps the sticky bit, so the second rounding
    is exact (fp32 has more than two bits beyond bf16's and fp16's precision).
    """
    if values.dtype != torch.float64 or dtype in (torch.float64, torch.float32):
        return values.to(dtype, copy=True)  # one rounding (or none)
    nearest = values.float()
    widened = nearest.double()
    # IEEE floats are sign-magnitude: one less in the bit pattern is one step toward zero.
    bits = nearest.view(torch.int32) - (widened.abs() > values.abs()).int()
    bits = bits | (widened != values).int()  # inexact: the last bit set, the result odd
    return bits.view(torch.float32).to(dtype)


@dataclass(frozen=True)
class FoldStep:
    """One adapted module: the base weight it goes into and that weight's layout."""

    module: str
    key: str
    kind: str
    transposed: bool  # Conv1D (fan_in_fan_out) and embeddings store the weight as (d_in, d_out)
    rank: int
    scaling: float

    def report(self) -> dict[str, Any]:
        return {
            "name": self.module, "weight": self.key, "kind": self.kind, "transposed": self.transposed,
            "rank": self.rank, "scaling": self.scaling,
        }


@dataclass
class FoldPlan:
    """What to change in which base tensor, checked against the checkpoint's headers before any work."""

    adapter: Adapter
    steps: dict[str, FoldStep]  # base key -> update
    replacements: dict[str, str]  # base key -> the adapter tensor that replaces it

    @property
    def keys(self) -> set[str]:
        return set(self.steps) | set(self.replacements)

    @classmethod
    def make(cls, model: BaseModel, adapter: Adapter) -> FoldPlan:
        """Match every adapted module and saved tensor to a base weight; AdapterError for any that does not fit."""
        steps: dict[str, FoldStep] = {}
        for name in sorted(adapter.modules):
            spec = adapter.modules[name]
            key = _weight_key(model, adapter, name + ".weight", f"module {name}")
            transposed = spec.kind == "embedding" or adapter.fan_in_fan_out
            shape = (spec.d_in, spec.d_out) if transposed else (spec.d_out, spec.d_in)
            _check_tensor(model, adapter, key, shape, f"module {name}: its update is {_dims(shape)}")
            if key in steps:
                raise AdapterError(adapter.source, f"modules {steps[key].module} and {name} both adapt {key}")
            steps[key] = FoldStep(name, key, spec.kind, transposed, spec.rank, spec.scaling)
        replacements: dict[str, str] = {}
        for tensor in adapter.extra_keys:
            if _TRAINABLE_TOKENS in tensor:
                raise AdapterError(adapter.source, f"tensor {tensor}: trainable-token deltas cannot be folded yet")
            if not tensor.startswith(KEY_PREFIX):
                raise AdapterError(adapter.source, f"tensor {tensor}: expected a name starting with {KEY_PREFIX!r}")
            parameter = tensor[len(KEY_PREFIX) :].replace(_BASE_LAYER, ".")
            key = _weight_key(model, adapter, parameter, f"tensor {tensor}")
            shape = adapter.weights.index[tensor].shape
            _check_tensor(model, adapter, key, shape, f"tensor {tensor} is {_dims(shape)}")
            if key in replacements:
                raise AdapterError(adapter.source, f"tensors {replacements[key]} and {tensor} both replace {key}")
            replacements[key] = tensor
        return cls(adapter, steps, replacements)

    def apply(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        """The new value of one base tensor: the adapter's saved tensor, plus the module's update."""
        if key in self.replacements:
            # As PEFT loads it into the base. A copy: the adapter's tensor may be a cached one.
            weight = round_once(self.adapter.tensor(self.replacements[key]), weight.dtype)
        step = self.steps.get(key)
        if step is not None:
            B, A = self.adapter.factors(step.module)
            B = B.double() * step.scaling
            left, right = (A.double().T, B.T) if step.transposed else (B, A.double())
            weight = add_low_rank(weight, left, right)  # in place: the shard's tensors are fresh copies
        return weight


def _weight_key(model: BaseModel, adapter: Adapter, parameter: str, what: str) -> str:
    key = model.find(parameter)
    if key is not None:
        return key
    tied = ""
    if model.ties_embeddings and parameter.rsplit(".", 2)[-2:] == ["lm_head", "weight"]:
        tied = " (it is tied to the input embeddings, tie_word_embeddings=true, so it is not stored on its own)"
    raise AdapterError(
        adapter.source,
        f"{what}: the base model {model.source} has no weight {parameter}{tied}",
        hint=None if tied else "is the adapter for another model?",
    )


def _check_tensor(model: BaseModel, adapter: Adapter, key: str, shape: tuple[int, ...], what: str) -> None:
    info = model.tensors[key]
    if info.shape != tuple(shape):
        raise AdapterError(
            adapter.source,
            f"{what} but the base weight {key} is {_dims(info.shape)} in {model.source}",
            hint="is the adapter for another model?",
        )
    if info.dtype not in FLOAT_DTYPES:  # quantized checkpoints (int8, fp8 with scales) cannot take an update
        raise AdapterError(model.source, f"weight {key} is {info.dtype}; fold needs {FLOAT_DTYPES_TEXT} weights")


def _check_same_model(model: BaseModel, adapter: Adapter, allow_base_mismatch: bool) -> None:
    """Refuse an adapter that records another base model (by name: a local copy keeps the repo's name)."""
    recorded = adapter.base_model
    if allow_base_mismatch or not recorded or _model_name(recorded) == _model_name(model.name):
        return
    raise IncompatibleAdaptersError(
        adapter.source,
        f"was trained on {recorded!r}, not on the base model {model.source}",
        hint="pass --allow-base-mismatch if it is the same model",
    )


def _model_name(text: str) -> str:
    """'org/Name@rev', '/models/Name/' and a Hub cache's '.../models--org--Name/snapshots/<commit>' -> 'name'."""
    parts = text.replace("\\", "/").rstrip("/").split("/")
    for part in parts:
        if part.startswith("models--"):
            return part.rsplit("--", 1)[-1].lower()
    return parts[-1].split("@", 1)[0].lower()


def _dims(shape) -> str:
    return "x".join(str(d) for d in shape)
