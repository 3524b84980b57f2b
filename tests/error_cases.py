"""Every bad input the CLI handles, as one list: tests/test_errors.py runs each through the CLI,
and docs/errors.md is the table of their messages (regenerate it with
`FLEXLORA_WRITE_DOCS=1 python -m pytest tests/test_errors.py`).

Each case builds its inputs in a fresh working folder that already holds two valid clients,
`alice/` (r=4) and `bob/` (r=8), and returns the command line, with relative paths as a user
would type them. Every command writes to `out/`, which must not appear.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
MARKER = "flexlora-pwned"  # a .bin that runs code on unpickling would create this file


@dataclass(frozen=True)
class Case:
    id: str
    bad_input: str  # what the user got wrong, as the table names it
    expect: str  # what the one-line message must contain
    build: Callable[[Path], list[str]]  # (working folder) -> command line
    outputs: tuple[str, ...] = ("out",)  # folders that must not be written


CASES: list[Case] = []


def case(bad_input: str, expect: str, outputs: tuple[str, ...] = ("out",)):
    def register(build):
        CASES.append(Case(build.__name__, bad_input, expect, build, outputs))
        return build

    return register


# --- helpers that damage a client in place (each case works on its own copy) ----------------


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / CONFIG).read_text())
    config.update(changes)
    (folder / CONFIG).write_text(json.dumps(config))


def edit_tensors(folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(folder / WEIGHTS))
    change(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS), metadata={"format": "pt"})


def set_tensor(key: str, value: torch.Tensor) -> Callable[[dict], None]:
    return lambda tensors: tensors.__setitem__(key, value)


def poison(key: str, value: float) -> Callable[[dict], None]:
    def change(tensors):
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] = value

    return change


def merge(*args) -> list[str]:
    return ["merge", *map(str, args), "-o", "out"]


# --- the input folder and its config --------------------------------------------------------


@case("input folder does not exist", "no such file or folder")
def missing_folder(cwd):
    return merge("alice", "nope")


@case("input is a file, not a folder", "not a folder")
def input_is_a_file(cwd):
    (cwd / "notes.txt").write_text("hello")
    return merge("alice", "notes.txt")


@case("adapter_config.json missing", "missing adapter_config.json")
def missing_config(cwd):
    (cwd / "bob" / CONFIG).unlink()
    return merge("alice", "bob")


@case("adapter_config.json unreadable (here: a symlink loop)", "cannot read")
def unreadable_config(cwd):
    (cwd / "bob" / CONFIG).unlink()
    os.symlink(CONFIG, cwd / "bob" / CONFIG)
    return merge("alice", "bob")


@case("adapter_config.json is a folder", "is a folder")
def config_is_a_folder(cwd):
    (cwd / "bob" / CONFIG).unlink()
    (cwd / "bob" / CONFIG).mkdir()
    return merge("alice", "bob")


@case("adapter_config.json is not UTF-8 text", "not UTF-8 text")
def config_not_text(cwd):
    (cwd / "bob" / CONFIG).write_bytes(b"\xff\xfe\x00garbage")
    return merge("alice", "bob")


@case("adapter_config.json is invalid JSON", "invalid JSON")
def invalid_json(cwd):
    (cwd / "bob" / CONFIG).write_text('{"peft_type": "LORA", "r": 8,')
    return merge("alice", "bob")


@case("adapter_config.json is JSON but not an object", "expected a JSON object")
def config_not_object(cwd):
    (cwd / "bob" / CONFIG).write_text("[1, 2]")
    return merge("alice", "bob")


@case("peft_type is not LORA", "only LORA adapters can be merged")
def not_lora(cwd):
    edit_config(cwd / "bob", peft_type="IA3")
    return merge("alice", "bob")


@case("DoRA adapter (use_dora in the config)", "DoRA adapters cannot be merged")
def dora_config(cwd):
    edit_config(cwd / "bob", use_dora=True)
    return merge("alice", "bob")


@case("DoRA magnitude tensors in the weights", "DoRA adapters cannot be merged")
def dora_tensor(cwd):
    edit_tensors(cwd / "bob", set_tensor(Q0 + ".lora_magnitude_vector", torch.ones(96)))
    return merge("alice", "bob")


@case("lora_bias adapter", "lora_bias")
def lora_bias(cwd):
    edit_config(cwd / "bob", lora_bias=True)
    return merge("alice", "bob")


@case("r not a positive integer", "r must be a positive integer")
def zero_rank_config(cwd):
    edit_config(cwd / "bob", r=0)
    return merge("alice", "bob")


@case("config field of the wrong type", "rank_pattern must be an object")
def config_wrong_type(cwd):
    edit_config(cwd / "bob", rank_pattern=[1, 2])
    return merge("alice", "bob")


# --- the weight file ----------------------------------------------------------------------


@case("weight file missing", "missing weights")
def missing_weights(cwd):
    (cwd / "bob" / WEIGHTS).unlink()
    return merge("alice", "bob")


@case("safetensors file truncated", "truncated")
def truncated_weights(cwd):
    path = cwd / "bob" / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    return merge("alice", "bob")


@case("safetensors file empty", "not a readable safetensors file")
def empty_weights(cwd):
    (cwd / "bob" / WEIGHTS).write_bytes(b"")
    return merge("alice", "bob")


@case("safetensors header corrupt", "not a readable safetensors file")
def corrupt_header(cwd):
    path = cwd / "bob" / WEIGHTS
    data = bytearray(path.read_bytes())
    data[8:24] = b"#" * 16
    path.write_bytes(bytes(data))
    return merge("alice", "bob")


@case("safetensors header length impossible", "not a readable safetensors file")
def huge_header_length(cwd):
    path = cwd / "bob" / WEIGHTS
    data = bytearray(path.read_bytes())
    data[:8] = (2**62).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    return merge("alice", "bob")


@case(".bin that would run code when unpickled (refused, never executed)", "refused to unpickle")
def bin_with_code(cwd):
    (cwd / "bob" / WEIGHTS).unlink()
    torch.save({"x": _RunsCode(str(cwd / MARKER))}, cwd / "bob" / "adapter_model.bin")
    return merge("alice", "bob")


@case(".bin that is a raw pickle, not a torch file", "refused to unpickle")
def bin_raw_pickle(cwd):
    (cwd / "bob" / WEIGHTS).unlink()
    (cwd / "bob" / "adapter_model.bin").write_bytes(pickle.dumps(_RunsCode(str(cwd / MARKER))))
    return merge("alice", "bob")


@case(".bin that is not a dict of tensors", "expected a dict of named tensors")
def bin_not_dict(cwd):
    (cwd / "bob" / WEIGHTS).unlink()
    torch.save([torch.zeros(2)], cwd / "bob" / "adapter_model.bin")
    return merge("alice", "bob")


class _RunsCode:
    """Pickles as a call to Path.touch: loading it with plain pickle would create a file."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


@case("no LoRA tensors in the weight file", "holds no LoRA tensors")
def no_lora_tensors(cwd):
    save_file({"something.weight": torch.zeros(2, 2)}, str(cwd / "bob" / WEIGHTS))
    return merge("alice", "bob")


@case("lora_A without its lora_B", "has no lora_B tensor")
def missing_b(cwd):
    edit_tensors(cwd / "bob", lambda tensors: tensors.pop(Q0 + ".lora_B.weight"))
    return merge("alice", "bob")


@case("A/B shape mismatch inside one adapter", "their ranks differ")
def ab_mismatch(cwd):
    edit_tensors(cwd / "bob", set_tensor(Q0 + ".lora_B.weight", torch.zeros(96, 7)))
    return merge("alice", "bob")


@case("LoRA factor that is not a matrix", "must be matrices")
def factor_not_matrix(cwd):
    edit_tensors(cwd / "bob", set_tensor(Q0 + ".lora_A.weight", torch.zeros(8, 96, 1)))
    return merge("alice", "bob")


@case("rank in the tensors differs from r in the config", "but the config gives r=6")
def rank_differs_from_config(cwd):
    edit_config(cwd / "bob", r=6)
    return merge("alice", "bob")


@case("integer tensors in the weight file", "non-floating-point")
def integer_tensor(cwd):
    edit_tensors(cwd / "bob", set_tensor("base_model.model.lm_head.weight", torch.zeros(3, dtype=torch.int32)))
    return merge("alice", "bob")


@case("NaN in a tensor", "contains NaN or Inf")
def nan_tensor(cwd):
    edit_tensors(cwd / "bob", poison("base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight", float("nan")))
    return merge("alice", "bob")


@case("Inf in a tensor", "contains NaN or Inf")
def inf_tensor(cwd):
    edit_tensors(cwd / "bob", poison(Q0 + ".lora_B.weight", float("inf")))
    return merge("alice", "bob")


# --- clients that cannot be combined -------------------------------------------------------


@case("same module with different d_in/d_out across clients", "is linear 96x50 here but linear 96x96")
def shape_mismatch(cwd):
    def narrow(tensors):
        tensors[Q0 + ".lora_A.weight"] = tensors[Q0 + ".lora_A.weight"][:, :50]

    edit_tensors(cwd / "bob", narrow)
    return merge("alice", "bob")


@case("fan_in_fan_out differs across clients", "fan_in_fan_out=True but")
def fan_in_fan_out_mismatch(cwd):
    edit_config(cwd / "bob", fan_in_fan_out=True)
    return merge("alice", "bob")


@case("different base models", "differs from")
def base_mismatch(cwd):
    edit_config(cwd / "bob", base_model_name_or_path="other-model")
    return merge("alice", "bob")


@case("no module in common", "shares no adapted module")
def nothing_in_common(cwd):
    edit_tensors(cwd / "bob", lambda t: [t.__setitem__(k.replace("self_attn", "attn"), t.pop(k)) for k in list(t)])
    return merge("alice", "bob")


@case("the same folder twice", "given twice")
def same_folder_twice(cwd):
    return merge("alice", "bob", "./alice")


@case("two clients with the same name", "is already used by")
def duplicate_names(cwd):
    return merge("x=alice", "x=bob")


@case("two folders with the same name (different parents)", "is already used by")
def duplicate_folder_names(cwd):
    (cwd / "round-2").mkdir()
    (cwd / "bob").rename(cwd / "round-2" / "alice")
    return merge("alice", "round-2/alice")


@case("modules_to_save tensor with different shapes across clients", "different shapes across clients")
def extra_shape_mismatch(cwd):
    edit_tensors(cwd / "alice", set_tensor("base_model.model.lm_head.weight", torch.zeros(3, 4)))
    edit_tensors(cwd / "bob", set_tensor("base_model.model.lm_head.weight", torch.zeros(4, 4)))
    return merge("alice", "bob")


# --- weights and sample counts ---------------------------------------------------------------


@case("negative weight", "must not be negative")
def negative_weight(cwd):
    return merge("alice", "bob", "--weights=1,-1")


@case("weights that sum to zero", "must not sum to zero")
def zero_sum_weights(cwd):
    return merge("alice", "bob", "--weights", "0,0")


@case("NaN weight", "must be finite")
def nan_weight(cwd):
    return merge("alice", "bob", "--weights", "1,nan")


@case("wrong number of weights", "got 3 weights for 2 clients")
def wrong_weight_count(cwd):
    return merge("alice", "bob", "--weights", "1,2,3")


@case("weights that do not parse", "expected comma-separated numbers")
def unparsable_weights(cwd):
    return merge("alice", "bob", "--weights", "1,two")


@case("negative sample count", "--num-samples")
def negative_samples(cwd):
    return merge("alice", "bob", "--num-samples=100,-5")


@case("both --weights and --num-samples", "not both")
def weights_and_samples(cwd):
    return merge("alice", "bob", "--weights", "1,1", "--num-samples", "1,1")


# --- ranks the user asks for ----------------------------------------------------------------


@case("--rank 0", "must be a positive integer")
def zero_rank(cwd):
    return merge("alice", "bob", "--rank", "0")


@case("--rank larger than min(d_out, d_in) of a module", "does not fit module")
def rank_too_large(cwd):
    return merge("alice", "bob", "--rank", "64")


@case("--ranks larger than min(d_out, d_in) (aggregate)", "does not fit module")
def ranks_too_large(cwd):
    return ["aggregate", "alice", "bob", "--ranks", "4,49", "-o", "out"]


@case("--ranks with the wrong count (aggregate)", "one per client")
def ranks_wrong_count(cwd):
    return ["aggregate", "alice", "bob", "--ranks", "4,8,16", "-o", "out"]


@case("--ranks that does not parse", "expected comma-separated integers")
def ranks_unparsable(cwd):
    return ["split", "alice", "--ranks", "8,x", "-o", "out"]


@case("--ranks with a negative rank", "must be positive integers")
def ranks_negative(cwd):
    return ["split", "alice", "--ranks=8,-2", "-o", "out"]


@case("--alpha not positive (split)", "--alpha")
def alpha_not_positive(cwd):
    return ["split", "alice", "--ranks", "2", "--alpha", "0", "-o", "out"]


# --- split sources ----------------------------------------------------------------------------


@case("split of a file that is not .safetensors", "expected an adapter folder or a flexlora --dense")
def split_other_file(cwd):
    (cwd / "notes.txt").write_text("hello")
    return ["split", "notes.txt", "--ranks", "2", "-o", "out"]


@case("split of a .safetensors that is not a --dense file", "not a flexlora --dense file")
def split_plain_safetensors(cwd):
    return ["split", "alice/" + WEIGHTS, "--ranks", "2", "-o", "out"]


# --- compute options ---------------------------------------------------------------------------


@case("unknown --precision", "--precision")
def bad_precision(cwd):
    return merge("alice", "bob", "--precision", "fp8")


@case("unknown --dtype", "--dtype")
def bad_dtype(cwd):
    return merge("alice", "bob", "--dtype", "int8")


@case("unknown --device", "--device")
def bad_device(cwd):
    return merge("alice", "bob", "--device", "tpu")


# --- the output location -------------------------------------------------------------------------


@case("output folder exists and is not empty", "exists and is not empty", outputs=())
def output_not_empty(cwd):
    (cwd / "out").mkdir()
    (cwd / "out" / "keep.txt").write_text("precious")
    return merge("alice", "bob")


@case("output is an existing file", "exists and is not a folder", outputs=())
def output_is_file(cwd):
    (cwd / "out").write_text("precious")
    return merge("alice", "bob")


@case("output inside an input folder", "inputs are never modified", outputs=("alice/out",))
def output_inside_input(cwd):
    return ["merge", "alice", "bob", "-o", "alice/out", "--overwrite"]


@case("output folder contains an input", "contains the input", outputs=())
def output_contains_input(cwd):
    (cwd / "round").mkdir()
    (cwd / "bob").rename(cwd / "round" / "bob")
    return ["merge", "alice", "round/bob", "-o", "round", "--overwrite"]


@case("output location cannot be created (a file is in the way)", "cannot write", outputs=("blocker/out",))
def output_under_file(cwd):
    (cwd / "blocker").write_text("a file, not a folder")
    return ["merge", "alice", "bob", "-o", "blocker/out"]
