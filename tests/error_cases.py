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


@case("--ranks with a negative rank", "must be a positive integer")
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


# --- tensors, weights, Hub (issue 11) ------------------------------------------------------------
# Dtypes are named as safetensors names them; tests/test_bad_inputs.py checks the table against every
# dtype safetensors can hold. Hub cases that need HF_ENDPOINT set are in tests/test_bad_inputs.py.

LORA_FLOATS = "LoRA factors must be float16, bfloat16, float32 or float64"
Q0_A = Q0 + ".lora_A.weight"


def raw_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's bytes as safetensors stores them (little-endian, row-major)."""
    return tensor.contiguous().flatten().view(torch.uint8).numpy().tobytes()


def write_raw_safetensors(path: Path, entries: dict[str, tuple[str, list[int], bytes]]) -> None:
    """A safetensors file written by hand (name -> (dtype, shape, data)): for dtypes torch cannot make."""
    header, data = {}, b""
    for key, (dtype, shape, raw) in entries.items():
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def replace_factor(dtype: torch.dtype) -> Callable[[dict], None]:
    """Q0's lora_A in another dtype, same logical shape (F4 packs two values per byte)."""

    def change(tensors):
        rows, cols = tensors[Q0_A].shape
        if dtype == torch.float4_e2m1fn_x2:
            tensors[Q0_A] = torch.zeros(rows, cols // 2, dtype=torch.uint8).view(dtype)
        else:
            tensors[Q0_A] = tensors[Q0_A].to(dtype)

    return change


@case("LoRA factors in F8_E4M3 (8-bit float)", "is F8_E4M3; " + LORA_FLOATS)
def float8_factors(cwd):
    edit_tensors(cwd / "bob", replace_factor(torch.float8_e4m3fn))
    return merge("alice", "bob")


@case("LoRA factors in F4 (4-bit float, two per byte)", "is F4; " + LORA_FLOATS)
def float4_factors(cwd):
    edit_tensors(cwd / "bob", replace_factor(torch.float4_e2m1fn_x2))
    return merge("alice", "bob")


@case("LoRA factors in F6_E3M2 (a dtype torch cannot load)", "is F6_E3M2; " + LORA_FLOATS)
def float6_factors(cwd):
    path = cwd / "bob" / WEIGHTS
    tensors = load_file(str(path))
    assert all(t.dtype == torch.float32 for t in tensors.values())
    entries = {key: ("F32", list(t.shape), raw_bytes(t)) for key, t in tensors.items()}
    rows, cols = tensors[Q0_A].shape
    entries[Q0_A] = ("F6_E3M2", [rows, cols], bytes(rows * cols * 6 // 8))
    write_raw_safetensors(path, entries)
    return merge("alice", "bob")


@case("LoRA factors in float8 in a .bin file (named as safetensors names it)", "is F8_E5M2; " + LORA_FLOATS)
def float8_factors_bin(cwd):
    tensors = load_file(str(cwd / "bob" / WEIGHTS))
    replace_factor(torch.float8_e5m2)(tensors)
    torch.save(tensors, cwd / "bob" / "adapter_model.bin")
    (cwd / "bob" / WEIGHTS).unlink()
    return merge("alice", "bob")


@case("a large int32 tensor (once reported as a truncated file)", "is I32 (non-floating-point)")
def large_int32_tensor(cwd):
    # 1.2 MB of int32: read as 8-byte items it would claim more bytes than the file has.
    edit_tensors(cwd / "bob", set_tensor("base_model.model.lm_head.weight", torch.zeros(80, 3840, dtype=torch.int32)))
    return merge("alice", "bob")


@case("input named like rich markup (printed literally)", "[/]nope: no such file or folder")
def markup_input_name(cwd):
    return merge("alice", "[/]nope")


@case("--push-to-hub while HF_HUB_OFFLINE=1 (as the tests run): refused before reading any tensor", "cannot push while HF_HUB_OFFLINE is set")
def push_while_offline(cwd):
    edit_tensors(cwd / "bob", poison(Q0_A, float("nan")))  # found only once tensors are read: must not come first
    return merge("alice", "bob", "--push-to-hub", "org/fed")


# --- config files (issue 11) ------------------------------------------------------------------


def config_literal(folder: Path, field: str, literal: str) -> None:
    """Set a config field to a JSON literal that Python's json cannot write (e.g. 5,000 digits)."""
    config = json.loads((folder / CONFIG).read_text())
    config[field] = "@"
    (folder / CONFIG).write_text(json.dumps(config).replace('"@"', literal))


@case("adapter_config.json is a FIFO (reading it would wait forever)", "is a named pipe (FIFO), not a regular file")
def config_is_a_fifo(cwd):
    (cwd / "bob" / CONFIG).unlink()
    os.mkfifo(cwd / "bob" / CONFIG)
    return merge("alice", "bob")


@case("adapter_config.json is a link to /dev/zero (endless)", "is a character device, not a regular file")
def config_is_dev_zero(cwd):
    (cwd / "bob" / CONFIG).unlink()
    os.symlink("/dev/zero", cwd / "bob" / CONFIG)
    return merge("alice", "bob")


@case("adapter_config.json of 100 MB", "expected a small JSON file (at most 16.0 MiB)")
def config_too_large(cwd):
    with open(cwd / "bob" / CONFIG, "r+b") as handle:
        handle.truncate(100 * 2**20)  # the config, then zeros (sparse)
    return merge("alice", "bob")


@case("adapter_config.json nested 100,000 deep", "JSON nested more than 64 levels deep")
def config_nested_deep(cwd):
    (cwd / "bob" / CONFIG).write_text('{"peft_type": "LORA", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    return merge("alice", "bob")


@case("r with 5,000 digits (beyond Python's int parsing limit)", "a number with more than 4300 digits")
def rank_5000_digits(cwd):
    config_literal(cwd / "bob", "r", "9" * 5000)
    return merge("alice", "bob")


@case("r with 4,000 digits", "r must be a positive integer below 2**31 (a LoRA rank), got a 4000-digit number")
def rank_4000_digits(cwd):
    config_literal(cwd / "bob", "r", "9" * 4000)
    return merge("alice", "bob")


@case("r beyond any tensor dimension", "below 2**31 (a LoRA rank), got 2147483648")
def rank_2_pow_31(cwd):
    edit_config(cwd / "bob", r=2**31)
    return merge("alice", "bob")


@case("lora_alpha 1e308 (its scaling would overflow)", "a LoRA scaling must lie between 1e-12 and 1e+12")
def alpha_1e308(cwd):
    edit_config(cwd / "bob", lora_alpha=1e308)
    return merge("alice", "bob")


@case("alpha_pattern value 1e300", "alpha_pattern['v_proj'] = 1e+300 with r = 8 gives scaling")
def alpha_pattern_1e300(cwd):
    edit_config(cwd / "bob", alpha_pattern={"v_proj": 1e300})
    return merge("alice", "bob")


@case("rank_pattern key that is not a regular expression (PEFT matches keys as regexes)", "is not a valid regular expression")
def rank_pattern_bad_regex(cwd):
    edit_config(cwd / "bob", rank_pattern={"(v_proj": 4})
    return merge("alice", "bob")


# --- output safety (issue 11) -----------------------------------------------------------------


@case("client name that leaves the output folder (..=PATH)", "client name '..' is not a safe folder name")
def client_name_parent(cwd):
    return ["aggregate", "..=alice", "bob", "-o", "out"]


@case("client name with a slash (x/y=PATH)", "client name 'x/y' is not a safe folder name")
def client_name_slash(cwd):
    return ["aggregate", "x/y=alice", "bob", "-o", "out"]


@case("client name with rich markup", "client name '[bold]x' is not a safe folder name")
def client_name_markup(cwd):
    return ["aggregate", "[bold]x=alice", "bob", "-o", "out"]


@case("client name longer than 96 characters", "client name is 97 characters long, more than 96")
def client_name_too_long(cwd):
    return ["aggregate", "a" * 97 + "=alice", "bob", "-o", "out"]


@case("client name 'global' (reserved for the global output)", "is reserved for the round's global output folder")
def client_name_global(cwd):
    return ["aggregate", "global=alice", "bob", "-o", "out"]


@case("two client names that differ only in letter case", "would share one output folder on case-insensitive")
def client_names_letter_case(cwd):
    return ["aggregate", "Alice=alice", "alice=bob", "-o", "out"]


@case("two client names for one folder (x and x/)", "client name 'x/' is not a safe folder name")
def client_names_one_folder(cwd):
    return ["aggregate", "x=alice", "x/=bob", "-o", "out"]


@case("--overwrite of a folder flexlora did not write", "exists and was not written by flexlora", outputs=())
def overwrite_foreign_folder(cwd):
    (cwd / "out").mkdir()
    (cwd / "out" / "notes.txt").write_text("precious")
    return [*merge("alice", "bob"), "--overwrite"]


@case("--overwrite with an input whose weight file is a symlink into the output", "contains the input", outputs=())
def input_linked_into_output(cwd):
    (cwd / "out" / "alice").mkdir(parents=True)
    (cwd / "out" / "flexlora_manifest.json").write_text(json.dumps({"written_by": "flexlora"}))
    (cwd / "alice" / WEIGHTS).rename(cwd / "out" / "alice" / WEIGHTS)
    (cwd / "alice" / WEIGHTS).symlink_to(Path("..", "out", "alice", WEIGHTS))
    return ["aggregate", "alice", "bob", "-o", "out", "--overwrite"]


@case("output is the current folder, which holds the inputs (-o .)", "contains the input", outputs=())
def output_current_folder(cwd):
    return ["merge", "alice", "bob", "-o", "."]


@case("output is the file-system root", "is the root of the file system", outputs=())
def output_root(cwd):
    return ["merge", "alice", "bob", "-o", "/"]


_HELD_LOCKS: list[int] = []  # lock files held by "another run" for the rest of the session


@case("another run is writing the output folder (its lock is held)", "another flexlora run is writing", outputs=())
def output_locked(cwd):
    import fcntl

    descriptor = os.open(cwd / ".out.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    _HELD_LOCKS.append(descriptor)
    return merge("alice", "bob")


# --- trust (issue 14) ------------------------------------------------------------------------------


def aggregate(*args) -> list[str]:
    return ["aggregate", *map(str, args), "-o", "out"]


def private(*args) -> list[str]:
    return aggregate("alice", "bob", "--clip", "1", "--dp-noise", "1", *args)


def ledger_file(path: Path, base_model: str, modules: str = "0" * 64) -> None:
    """A well-formed DP ledger (the format of flexlora_cli/adapters/ledger.py, checksum computed here)."""
    import hashlib

    body = {"format": "flexlora-dp-ledger", "version": 1, "federation": {"id": "f00d", "base_model": base_model, "modules": modules},
            "rounds": [{"noise_multiplier": 1.0, "sampling_rate": 1.0, "time": "2026-01-01T00:00:00Z"}]}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    path.write_text(json.dumps({**body, "sha256": digest}))


@case("--dp-noise without --clip", "--dp-noise: needs --clip C")
def dp_noise_without_clip(cwd):
    return aggregate("alice", "bob", "--dp-noise", "1")


@case("--clip that is not positive", "--clip: must be a positive number")
def clip_not_positive(cwd):
    return aggregate("alice", "bob", "--clip", "0")


@case("--dp-noise that is not positive", "--dp-noise: the noise multiplier must be positive")
def dp_noise_not_positive(cwd):
    return aggregate("alice", "bob", "--clip", "1", "--dp-noise", "-0.5")


@case("--dp-noise with --num-samples (sample counts are private data)", "--num-samples: cannot be used with --dp-noise")
def dp_noise_with_num_samples(cwd):
    return private("--num-samples", "10,20")


@case("--dp-noise with --screen (screening depends on the data)", "--screen: cannot be used with --dp-noise")
def dp_noise_with_screen(cwd):
    return private("--screen")


@case("--dp-noise with a method whose update is not a linear SVD (hetlora)", "--dp-noise: hetlora's global update is not a fixed linear")
def dp_noise_with_hetlora(cwd):
    return private("--method", "hetlora")


@case("--dp-noise with modules_to_save tensors", "has modules_to_save tensors")
def dp_noise_with_modules_to_save(cwd):
    from conftest import write_client

    write_client(cwd / "carol", 4, seed=3, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    return aggregate("alice", "carol", "--clip", "1", "--dp-noise", "1")


@case("--dp-noise with --push-to-hub to one repo (it would list the participants)", "--push-to-hub: with --dp-noise one repo would hold")
def dp_noise_push_one_repo(cwd):
    return private("--push-to-hub", "org/fed")


@case("--dp-delta outside (0, 1)", "--dp-delta: must be in (0, 1)")
def dp_delta_outside(cwd):
    return private("--dp-delta", "1.5")


@case("--dp-sampling-rate outside (0, 1]", "--dp-sampling-rate: must be in (0, 1]")
def dp_sampling_rate_outside(cwd):
    return private("--dp-sampling-rate", "0")


@case("--seed without --dp-noise", "--seed: only applies with --dp-noise")
def seed_without_dp_noise(cwd):
    return aggregate("alice", "bob", "--seed", "3")


@case("DP ledger of another federation (another base model)", "this ledger belongs to another federation")
def dp_ledger_other_federation(cwd):
    ledger_file(cwd / "rounds.json", "other-model")
    return private("--dp-ledger", "rounds.json")


@case("DP ledger edited (its checksum does not match)", "is corrupt: its checksum does not match its content")
def dp_ledger_edited(cwd):
    ledger_file(cwd / "rounds.json", "tiny-llama")
    document = json.loads((cwd / "rounds.json").read_text())
    document["rounds"] = []
    (cwd / "rounds.json").write_text(json.dumps(document))
    return private("--dp-ledger", "rounds.json")


@case("DP ledger that is not JSON", "rounds.json: invalid JSON")
def dp_ledger_not_json(cwd):
    (cwd / "rounds.json").write_text("rounds: 3\n")
    return private("--dp-ledger", "rounds.json")


@case("DP ledger inside the output folder (replaced every round)", "is inside the output folder")
def dp_ledger_inside_output(cwd):
    return private("--dp-ledger", "out/rounds.json")


@case("--screen with fewer than 3 clients", "--screen: screening compares each client with the median")
def screen_two_clients(cwd):
    return aggregate("alice", "bob", "--screen")


@case("--screen-threshold without --screen", "--screen-threshold: only applies with --screen")
def screen_threshold_alone(cwd):
    return aggregate("alice", "bob", "--screen-threshold", "3")


@case("--screen-refuse with a client whose B is 1000x too large", "the round was refused (--screen-refuse)")
def screen_refuse_poisoned(cwd):
    import shutil

    shutil.copytree(cwd / "alice", cwd / "carol")
    shutil.copytree(cwd / "alice", cwd / "mallory")
    edit_tensors(cwd / "mallory", lambda tensors: tensors.update({k: v * 1000 for k, v in tensors.items() if ".lora_B." in k}))
    return aggregate("alice", "bob", "carol", "mallory", "--screen-refuse")
