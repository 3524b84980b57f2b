"""Randomly damaged adapter files (truncated, bit-flipped, wrong header) through the CLI.

Whatever the damage, the command either succeeds on what is still a valid adapter or stops with
one clean `Error:` line and exit code 2, writing nothing: never a traceback. Where the damage is
certainly detectable (truncation, a broken header, a flipped bit that makes a number NaN/Inf),
the error is required. Seeds are fixed, so every run checks the same damaged files.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import write_client
from flexlora_cli.cli.app import app

runner = CliRunner()
WEIGHTS, BIN, CONFIG = "adapter_model.safetensors", "adapter_model.bin", "adapter_config.json"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    for name, seed, safe in (("good", 1, True), ("victim", 2, True), ("binary", 3, False)):
        write_client(root / name, 2, seed=seed, target_modules=["q_proj"], safe_serialization=safe)
    # Scale the victim's numbers to about 1, where one flipped exponent bit can make Inf or NaN.
    tensors = load_file(str(root / "victim" / WEIGHTS))
    save_file({k: v * 10 for k, v in tensors.items()}, str(root / "victim" / WEIGHTS), metadata={"format": "pt"})
    return root


def run_damaged(pristine: Path, work: Path, filename: str, damaged: bytes, client: str = "victim") -> int:
    """Merge a copy of `client` whose `filename` holds `damaged` with a good client; return the exit code."""
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(pristine / client, work / client)
    (work / client / filename).write_bytes(damaged)
    output = work / "out"
    result = runner.invoke(app, ["merge", str(pristine / "good"), str(work / client), "-o", str(output)])
    assert result.exit_code in (0, 2), (result.exit_code, result.exception, result.output)
    assert isinstance(result.exception, (SystemExit, type(None))), result.exception
    if result.exit_code == 2:
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"Error: {work / client}"), result.stderr
        assert not output.exists()
        assert [p.name for p in work.iterdir()] == [client]  # no temporary sibling either
    else:
        assert (output / WEIGHTS).is_file()
    return result.exit_code


def header_end(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


def flip(data: bytes, position: int, bit: int) -> bytes:
    damaged = bytearray(data)
    damaged[position] ^= 1 << bit
    return bytes(damaged)


def test_truncated_safetensors_always_fail_cleanly(pristine, tmp_path):
    data = (pristine / "victim" / WEIGHTS).read_bytes()
    rng = random.Random(0)
    lengths = [0, 1, 7, 8, header_end(data) - 1, header_end(data), len(data) - 1]
    lengths += rng.sample(range(len(data)), 25)
    for length in lengths:
        assert run_damaged(pristine, tmp_path / "w", WEIGHTS, data[:length]) == 2, length


def test_bit_flips_in_the_safetensors_header_never_crash(pristine, tmp_path):
    data = (pristine / "victim" / WEIGHTS).read_bytes()
    rng = random.Random(1)
    codes = [
        run_damaged(pristine, tmp_path / "w", WEIGHTS, flip(data, rng.randrange(header_end(data)), rng.randrange(8)))
        for _ in range(40)
    ]
    assert codes.count(2) >= 20, codes  # most header damage is caught; the rest still parses as valid


def test_bit_flips_in_tensor_data_fail_exactly_when_a_number_becomes_nan_or_inf(pristine, tmp_path):
    data = (pristine / "victim" / WEIGHTS).read_bytes()
    start = header_end(data)
    rng = random.Random(2)
    values = torch.frombuffer(bytearray(data[start:]), dtype=torch.float32)  # every tensor here is float32
    positions = [(rng.randrange(start, len(data)), rng.randrange(8)) for _ in range(20)]
    # For numbers in [1, 2) the float32 exponent is 0b01111111: flipping its top bit (bit 6 of the
    # last byte) makes it all ones, i.e. Inf or NaN.
    near_one = [i for i, v in enumerate(values.tolist()) if 1 <= abs(v) < 2]
    positions += [(start + 4 * i + 3, 6) for i in rng.sample(near_one, 10)]
    codes = []
    for position, bit in positions:
        damaged = flip(data, position, bit)
        word = start + (position - start) // 4 * 4
        value = struct.unpack("<f", damaged[word : word + 4])[0]
        expected = 0 if math.isfinite(value) else 2
        codes.append(run_damaged(pristine, tmp_path / "w", WEIGHTS, damaged))
        assert codes[-1] == expected, (position, bit, value)
    assert codes.count(2) >= 10 and codes.count(0) >= 10, codes


def safetensors_bytes(header: object, body: bytes) -> bytes:
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return len(text).to_bytes(8, "little") + text + body


def wrong_headers(data: bytes) -> dict[str, bytes]:
    """Files whose header is wrong in ways a random flip rarely finds."""
    header = json.loads(data[8 : header_end(data)])
    body = data[header_end(data) :]
    key = next(k for k in header if k.endswith("lora_A.weight"))

    def with_entry(**changes) -> bytes:
        return safetensors_bytes({**header, key: {**header[key], **changes}}, body)

    first, last = header[key]["data_offsets"]
    return {
        "length beyond the file": (len(data) * 2).to_bytes(8, "little") + data[8:],
        "length zero": (0).to_bytes(8, "little") + data[8:],
        "not JSON": safetensors_bytes(b"\x00\x01not json at all", body),
        "not UTF-8": safetensors_bytes(b'{"\xff\xfe": 1}', body),
        "a list": safetensors_bytes([1, 2, 3], body),
        "only metadata": safetensors_bytes({"__metadata__": {"format": "pt"}}, b""),
        "unknown dtype": with_entry(dtype="Q7"),
        "integer dtype": with_entry(dtype="I32"),
        "offsets past the end": with_entry(data_offsets=[first, len(body) + 64]),
        "offsets reversed": with_entry(data_offsets=[last, first]),
        "shape not matching offsets": with_entry(shape=[3, 3]),
        "negative shape": with_entry(shape=[-2, 96]),
        "shape not a list": with_entry(shape="2x96"),
        "metadata not strings": safetensors_bytes({**header, "__metadata__": {"format": 1}}, body),
        "body padded with junk": data + b"\x00" * 16,
    }


def test_wrong_headers_fail_cleanly(pristine, tmp_path):
    data = (pristine / "victim" / WEIGHTS).read_bytes()
    for label, damaged in wrong_headers(data).items():
        assert run_damaged(pristine, tmp_path / "w", WEIGHTS, damaged) == 2, label


def test_damaged_bin_files_never_crash_and_truncation_always_fails(pristine, tmp_path):
    data = (pristine / "binary" / BIN).read_bytes()
    rng = random.Random(3)
    for length in [0, 10, len(data) // 2, len(data) - 1] + rng.sample(range(len(data)), 8):
        assert run_damaged(pristine, tmp_path / "w", BIN, data[:length], client="binary") == 2, length
    for _ in range(15):
        damaged = flip(data, rng.randrange(len(data)), rng.randrange(8))
        run_damaged(pristine, tmp_path / "w", BIN, damaged, client="binary")


def test_damaged_configs_never_crash_and_truncation_always_fails(pristine, tmp_path):
    data = (pristine / "victim" / CONFIG).read_bytes()
    rng = random.Random(4)
    for length in rng.sample(range(len(data) - 1), 10):  # a cut JSON object is never valid JSON
        assert run_damaged(pristine, tmp_path / "w", CONFIG, data[:length]) == 2, length
    for _ in range(30):
        run_damaged(pristine, tmp_path / "w", CONFIG, flip(data, rng.randrange(len(data)), rng.randrange(8)))


def test_damaged_dense_files_never_crash_and_truncation_always_fails(pristine, tmp_path):
    """`split` also reads `merge --dense` files, whose header carries the config and layout."""
    merged = tmp_path / "merged"
    assert runner.invoke(app, ["merge", str(pristine / "good"), "-o", str(merged), "--dense"]).exit_code == 0
    data = (merged / "flexlora_delta.safetensors").read_bytes()
    rng = random.Random(5)
    damaged = [(data[:length], True) for length in rng.sample(range(len(data)), 10)]
    damaged += [(flip(data, rng.randrange(header_end(data)), rng.randrange(8)), False) for _ in range(30)]
    for index, (content, must_fail) in enumerate(damaged):
        source, output = tmp_path / f"delta-{index}.safetensors", tmp_path / f"out-{index}"
        source.write_bytes(content)
        result = runner.invoke(app, ["split", str(source), "--ranks", "2", "-o", str(output)])
        assert result.exit_code in ((2,) if must_fail else (0, 2)), (index, result.exception, result.output)
        assert isinstance(result.exception, (SystemExit, type(None))), result.exception
        if result.exit_code == 2:
            assert result.stderr.startswith(f"Error: {source}:") and len(result.stderr.splitlines()) == 1
            assert not output.exists()
