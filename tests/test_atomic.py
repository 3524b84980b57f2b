"""All-or-nothing outputs: real `flexlora` processes killed in the middle of writing.

FLEXLORA_TEST_PAUSE_WRITES makes the writer sleep after each file, so that a test can kill the
process while its output is half-written (in the temporary sibling). Afterwards the output path
holds either the old state or the complete new output, never a part; the inputs are unchanged.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import write_client
from flexlora_cli.adapters import output as output_module
from flexlora_cli.adapters import write
from flexlora_cli.cli.app import app

runner = CliRunner()
CLI = [sys.executable, "-c", "from flexlora_cli.cli.app import main; main()"]


@pytest.fixture(autouse=True)
def fixed_manifest_time(monkeypatch):
    """Outputs of equal runs are byte-identical, their manifest's time included (also in child processes)."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("atomic-inputs")
    return [
        write_client(root / "alice", 4, seed=1, target_modules=["q_proj", "v_proj"]),
        write_client(root / "bob", 8, seed=2, target_modules=["q_proj", "v_proj"]),
    ]


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def inputs_state(inputs: list[Path]) -> dict[str, dict[str, str]]:
    return {str(folder): snapshot(folder) for folder in inputs}


def leftovers(output: Path) -> list[str]:
    return sorted(p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}."))


def aggregate(inputs: list[Path], output: Path, *extra: str) -> None:
    result = runner.invoke(app, ["aggregate", *map(str, inputs), "-o", str(output), *extra])
    assert result.exit_code == 0, result.output


def start_and_kill(inputs: list[Path], output: Path, sig: int, *extra: str) -> subprocess.CompletedProcess:
    """Run `flexlora aggregate` slowed down, and send `sig` once it has written one client's weights."""
    env = {**os.environ, "FLEXLORA_TEST_PAUSE_WRITES": "2"}
    command = CLI + ["aggregate", *map(str, inputs), "-o", str(output), *extra]
    started = time.time()
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A shell runs background jobs with SIGINT ignored, and Python keeps an ignored SIGINT
        # ignored: restore the default so that the child gets its KeyboardInterrupt as a user would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120  # the child imports torch and peft first; the machine may be busy
    while not wrote_weights_since(output.parent, started):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run never started writing"
        time.sleep(0.05)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=60)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def wrote_weights_since(folder: Path, started: float) -> bool:
    """Has the run written a client's weights anywhere (temporary folder or not)? Then it is midway."""
    return any(path.stat().st_mtime >= started for path in folder.rglob("adapter_model.safetensors"))


@pytest.mark.parametrize(
    "sig, existing", [(signal.SIGTERM, False), (signal.SIGINT, True)], ids=["SIGTERM-new-output", "SIGINT-overwrite"]
)
def test_interrupted_run_leaves_the_old_state_and_no_temporary_folder(inputs, tmp_path, sig, existing):
    before = inputs_state(inputs)
    output = tmp_path / "round"
    if existing:
        aggregate(inputs, output, "--weights", "1,3")
    old = snapshot(output) if existing else None
    result = start_and_kill(inputs, output, sig, "--overwrite")
    assert result.returncode == 130, result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line == "Error: interrupted; nothing was written (outputs are all-or-nothing)"
    assert "Traceback" not in result.stderr
    assert (snapshot(output) if existing else output.exists()) == (old if existing else False)
    assert leftovers(output) == []
    assert inputs_state(inputs) == before


def test_killed_overwrite_keeps_the_old_output_and_the_next_run_cleans_up(inputs, tmp_path):
    before = inputs_state(inputs)
    output, expected = tmp_path / "round", tmp_path / "expected"
    aggregate(inputs, output, "--weights", "1,3")  # the old state
    old = snapshot(output)
    aggregate(inputs, expected)  # what the new run writes when it completes
    assert snapshot(expected) != old

    result = start_and_kill(inputs, output, signal.SIGKILL, "--overwrite")
    assert result.returncode == -signal.SIGKILL
    assert snapshot(output) == old  # the old state, whole
    # SIGKILL gives no chance to clean up: the staging folder and the (unlocked) lock file remain
    [partial, lock] = leftovers(output)
    assert partial.endswith(".partial") and lock == ".round.lock"

    aggregate(inputs, output, "--overwrite")
    assert snapshot(output) == snapshot(expected)  # the complete new output
    assert leftovers(output) == []  # the dead run's temporary folder is gone
    assert inputs_state(inputs) == before


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_overwrite_replaces_the_whole_folder(inputs, tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(output_module, "exchange", lambda first, second: False)
    output = tmp_path / "round"
    aggregate(inputs, output, "--weights", "1,3")
    (output / "stale.txt").write_text("from an older run")
    aggregate(inputs, output, "--overwrite")
    aggregate(inputs, tmp_path / "fresh")
    assert snapshot(output) == snapshot(tmp_path / "fresh")  # nothing of the old folder survives
    assert leftovers(output) == []
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(output.stat().st_mode) == 0o777 & ~umask  # a plain folder, not a private temp one


def test_full_disk_fails_cleanly_and_keeps_the_old_output(inputs, tmp_path, monkeypatch):
    output = tmp_path / "round"
    aggregate(inputs, output, "--weights", "1,3")
    old = snapshot(output)
    before = inputs_state(inputs)
    calls = []

    def full_disk(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # the second client's weights do not fit
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real_save_file(tensors, filename, metadata=metadata)

    real_save_file = write.save_file
    monkeypatch.setattr(write, "save_file", full_disk)
    result = runner.invoke(app, ["aggregate", *map(str, inputs), "-o", str(output), "--overwrite"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == f"Error: {output}: cannot write: No space left on device; nothing was written"
    assert snapshot(output) == old and leftovers(output) == []
    assert inputs_state(inputs) == before


def test_stale_folders_of_live_processes_and_other_outputs_are_kept(inputs, tmp_path):
    live = tmp_path / f".round.{os.getppid()}.abc123.partial"  # a running process (our parent)
    dead = tmp_path / ".round.999999999.abc123.partial"
    other = tmp_path / ".round.v2.1.abc123.partial"  # belongs to the output "round.v2"
    for folder in (live, dead, other):
        folder.mkdir()
    aggregate(inputs, tmp_path / "round")
    assert not dead.exists() and live.exists() and other.exists()


def test_a_refused_bin_runs_no_code_in_a_real_process(inputs, tmp_path):
    """Through a real process: one line on stderr (no warning from torch), exit 2, no payload run."""
    import shutil

    import torch

    from error_cases import _RunsCode

    client = tmp_path / "carol"
    shutil.copytree(inputs[1], client)
    (client / "adapter_model.safetensors").unlink()
    marker = tmp_path / "payload-ran"
    torch.save({"x": _RunsCode(str(marker))}, client / "adapter_model.bin")
    result = subprocess.run(
        CLI + ["merge", str(inputs[0]), str(client), "-o", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().startswith(f"Error: {client}/adapter_model.bin: not a plain tensor file, refused")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_no_command_modifies_its_inputs(inputs, tmp_path):
    binary = write_client(tmp_path / "carol", 2, seed=3, target_modules=["q_proj"], safe_serialization=False)
    clients = [*inputs, binary]
    before = inputs_state(clients)
    commands = [
        ["merge", *clients, "--dense", "-o", tmp_path / "merged"],
        ["aggregate", *clients, "--num-samples", "5,3,2", "-o", tmp_path / "round"],
        ["split", inputs[1], "--ranks", "2,4", "-o", tmp_path / "split"],
        ["inspect", *clients, "--spectrum", "2"],
    ]
    for command in commands:
        result = runner.invoke(app, [str(part) for part in command])
        assert result.exit_code == 0, result.output
        assert inputs_state(clients) == before, command
    dense = tmp_path / "merged" / "flexlora_delta.safetensors"
    dense_before = snapshot(dense.parent)
    assert runner.invoke(app, ["split", str(dense), "--ranks", "3", "-o", str(tmp_path / "from-dense")]).exit_code == 0
    assert snapshot(dense.parent) == dense_before
