"""Output safety (issue 11): client names never escape OUT; --overwrite replaces only what flexlora
wrote; one run per OUT at a time; the final move never replaces what appeared meanwhile; inputs stay
read-only (symlinks resolved); every exit says truthfully what is on disk.

Library tests drive adapters/output.py (OutputFolder) directly. Where timing matters, real `flexlora`
processes are held at an exact point by a gate file: FLEXLORA_TEST_PAUSE_WRITES (after each file
written) or FLEXLORA_TEST_PAUSE_AFTER_MOVE (right after the final move) set to a path makes the run
wait there while that file exists.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import write_client
from flexlora_cli.adapters import output as output_module
from flexlora_cli.adapters import write
from flexlora_cli.adapters.names import check_client_name, check_distinct, name_from
from flexlora_cli.adapters.output import MANIFEST_NAME, OutputFolder, committing, read_manifest
from flexlora_cli.cli.app import app
from flexlora_cli.errors import AdapterError, IncompatibleAdaptersError, OptionError, OutputError

runner = CliRunner()
CLI = [sys.executable, "-c", "from flexlora_cli.cli.app import main; main()"]
EPOCH = "1700000000"  # 2023-11-14T22:13:20Z
WAIT = 240  # seconds a child may take to import torch and reach the gate on a busy machine


@pytest.fixture(autouse=True)
def fixed_time(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("safety-inputs")
    return [
        write_client(root / "alice", 4, seed=1, target_modules=["q_proj", "v_proj"]),
        write_client(root / "bob", 8, seed=2, target_modules=["q_proj", "v_proj"]),
    ]


@pytest.fixture
def workdir(inputs, tmp_path, monkeypatch) -> Path:
    """A working folder holding copies of alice/ and bob/, as the current folder."""
    work = tmp_path / "work"
    work.mkdir()
    for client in inputs:
        shutil.copytree(client, work / client.name)
    monkeypatch.chdir(work)
    return work


# --- helpers ---------------------------------------------------------------------------------------


def tree(root: Path) -> dict[str, str]:
    """Everything under root, hidden entries included: file hashes, folders, symlink targets."""
    state = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            state[key] = "-> " + os.readlink(path)
        elif path.is_dir():
            state[key] = "dir"
        else:
            state[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def snapshot(folder: Path) -> dict[str, str]:
    return {k: v for k, v in tree(folder).items() if v != "dir"}


def leftovers(output: Path) -> list[str]:
    stem = output_module._sibling_stem(output.name)
    return sorted(p.name for p in output.parent.iterdir() if p.name.startswith(f".{stem}."))


def cli(*args) -> object:
    return runner.invoke(app, [str(arg) for arg in args])


def ok(*args) -> None:
    result = cli(*args)
    assert result.exit_code == 0, result.output


def refused(*args) -> str:
    """Run the CLI; assert one line `Error: ...`, exit 2; return the line."""
    result = cli(*args)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def spawn(*args, **env) -> subprocess.Popen:
    return subprocess.Popen(
        CLI + [str(arg) for arg in args], env={**os.environ, **env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A background shell job has SIGINT ignored, and Python keeps it so: restore the default.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for(condition, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run never reached the gate"
        time.sleep(0.02)


def staged(output: Path) -> bool:
    """Has a run on `output` written a client's config into its staging folder?"""
    return any(output.parent.glob(f".{output.name}.*.partial/*/adapter_config.json"))


def gate(tmp_path: Path, name: str = "gate") -> Path:
    path = tmp_path / name
    path.write_text("the run waits while this file exists")
    return path


def make_output(target: Path, text: str = "old", **manifest) -> None:
    """A flexlora output (library level): data.txt plus the manifest."""
    with OutputFolder(target, overwrite=True, command="test") as out:
        (out.staging / "data.txt").write_text(text)
        out.commit(manifest)


def locked_by_someone(path: Path) -> bool:
    descriptor = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(descriptor)
    return False


# --- client names ----------------------------------------------------------------------------------

NAME_CASES = {
    "absolute-path-name": (lambda w: [f"{w.parent / 'victim'}=alice", "bob"], "is not a safe folder name"),
    "dotdot": (lambda w: ["..=alice", "bob"], "is not a safe folder name"),
    "dot": (lambda w: [".=alice", "bob"], "is not a safe folder name"),
    "subfolder": (lambda w: ["x/y=alice", "bob"], "is not a safe folder name"),
    "rich-markup-close": (lambda w: ["[/]=alice", "bob"], "is not a safe folder name"),
    "rich-markup": (lambda w: ["[bold]x=alice", "bob"], "is not a safe folder name"),
    "hidden": (lambda w: [".x=alice", "bob"], "is not a safe folder name"),
    "non-ascii": (lambda w: ["ålice=alice", "bob"], "is not a safe folder name"),
    "97-characters": (lambda w: ["a" * 97 + "=alice", "bob"], "97 characters long, more than 96"),
    "global": (lambda w: ["global=alice", "bob"], "reserved for the round's global output folder"),
    "Global": (lambda w: ["Global=alice", "bob"], "reserved for the round's global output folder"),
    "letter-case": (lambda w: ["Alice=alice", "alice=bob"], "case-insensitive file systems"),
    "trailing-slash": (lambda w: ["x=alice", "x/=bob"], "is not a safe folder name"),
    "dot-slash": (lambda w: ["x=alice", "./x=bob"], "is not a safe folder name"),
}


@pytest.mark.parametrize("case", NAME_CASES, ids=list(NAME_CASES))
def test_unsafe_or_colliding_client_names_are_refused_and_nothing_is_written(case, workdir, tmp_path):
    build, expect = NAME_CASES[case]
    victim = tmp_path / "victim"  # what `/abs/path=client` used to overwrite
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    args = build(workdir)
    before = tree(tmp_path)
    line = refused("aggregate", *args, "--num-samples", "1,2", "-o", "out")
    assert expect in line, line
    assert "NAME=PATH" in line
    assert tree(tmp_path) == before  # nothing written anywhere, no lock or staging left


@pytest.mark.parametrize("folder", ["[b]x", "global", "my client"])
def test_unsafe_default_names_from_folders_are_refused_by_aggregate(folder, workdir, tmp_path):
    shutil.copytree(workdir / "alice", workdir / folder)
    before = tree(tmp_path)
    line = refused("aggregate", folder, "bob", "-o", "out")
    assert "NAME=PATH" in line
    assert tree(tmp_path) == before


def test_explicit_names_name_the_output_folders(workdir):
    ok("aggregate", "client.v2-A_1=alice", "b=bob", "-o", "out")
    assert sorted(p.name for p in (workdir / "out").iterdir()) == ["b", "client.v2-A_1", MANIFEST_NAME]


@pytest.mark.parametrize("name", ["alice", "a", "A-1_b.c", "1", "x" * 96, "client.", "global-2", "glob"])
def test_safe_names_pass(name):
    assert check_client_name(name, "src") == name


@pytest.mark.parametrize(
    "name", ["", ".", "..", ".x", "x/y", "x\\y", "a b", "[b]", "x" * 97, "ålice", "global", "GLOBAL", "x\n", "c:"]
)
def test_unsafe_names_fail(name):
    with pytest.raises(AdapterError) as caught:
        check_client_name(name, "src")
    assert caught.value.source == "src" and "\n" not in caught.value.message


def test_default_names_from_folders(tmp_path, monkeypatch):
    (tmp_path / "alice").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "alice")
    (tmp_path / "a b").mkdir()
    monkeypatch.chdir(tmp_path)
    for reference in ["alice", "alice/", "alice/.", "link", tmp_path / "alice", "alice/../alice"]:
        assert name_from(reference) == "alice", reference
    with pytest.raises(AdapterError, match="NAME=PATH"):
        name_from("a b")
    with pytest.raises(AdapterError):
        name_from("/")


def test_default_names_from_hub_references():
    from flexlora_cli.adapters.hub import HubRef

    assert name_from("org/fed") == "fed"
    assert name_from("hf://org/fed@main/round-1/alice") == "alice"
    assert name_from("hf://org/fed/sub/..") == "fed"  # not '..'
    assert name_from(HubRef("org/fed", None, "bob/.")) == "bob"
    for escaping in ["hf://org/fed/sub/../..", HubRef("org/fed", None, "../x")]:
        with pytest.raises(AdapterError):
            name_from(escaping)


def test_distinct_names_ignore_letter_case():
    check_distinct([("alice", "a"), ("bob", "b")])
    with pytest.raises(IncompatibleAdaptersError, match="case-insensitive"):
        check_distinct([("alice", "a"), ("Alice", "b")])
    with pytest.raises(IncompatibleAdaptersError, match="is already used by a"):
        check_distinct([("alice", "a"), ("alice", "b")])


# --- ownership: --overwrite replaces only flexlora's outputs ----------------------------------------


@pytest.mark.parametrize("manifest", [None, "{damaged", '{"written_by": "someone else"}', "symlink"])
def test_overwrite_refuses_a_folder_flexlora_did_not_write(manifest, workdir, tmp_path):
    out = workdir / "out"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    if manifest == "symlink":  # a link to a real manifest elsewhere does not make the folder ours
        make_output(tmp_path / "real")
        (out / MANIFEST_NAME).symlink_to(tmp_path / "real" / MANIFEST_NAME)
    elif manifest is not None:
        (out / MANIFEST_NAME).write_text(manifest)
    before = tree(tmp_path)
    line = refused("aggregate", "alice", "bob", "-o", "out", "--overwrite")
    assert line == (
        "Error: out: exists and was not written by flexlora (no flexlora_manifest.json) "
        "(hint: choose another output folder or empty it)"
    )
    assert tree(tmp_path) == before


def test_overwrite_replaces_a_flexlora_output_and_nothing_else_is_needed(workdir):
    ok("aggregate", "alice", "bob", "--weights", "1,3", "-o", "out")
    (workdir / "out" / "stale.txt").write_text("written inside a flexlora output")
    assert refused("aggregate", "alice", "bob", "-o", "out") == (
        "Error: out: exists and is not empty (hint: pass --overwrite to replace it)"
    )
    ok("aggregate", "alice", "bob", "-o", "out", "--overwrite")
    ok("aggregate", "alice", "bob", "-o", "fresh")
    assert snapshot(workdir / "out") == snapshot(workdir / "fresh")
    assert leftovers(workdir / "out") == []


def test_without_overwrite_a_foreign_folder_is_refused_with_the_right_hint(workdir):
    (workdir / "out").mkdir()
    (workdir / "out" / "notes.txt").write_text("precious")
    assert refused("merge", "alice", "bob", "-o", "out") == (
        "Error: out: exists and is not empty (hint: choose another output folder or empty it)"
    )


def test_an_empty_folder_is_written_without_overwrite(workdir):
    (workdir / "out").mkdir()
    ok("merge", "alice", "bob", "-o", "out")
    assert (workdir / "out" / "adapter_model.safetensors").is_file()


def test_manifest_content_and_format(workdir):
    ok("aggregate", "alice", "bob", "--num-samples", "1,3", "-o", "out")
    text = (workdir / "out" / MANIFEST_NAME).read_text()
    manifest = json.loads(text)
    assert text == json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    from flexlora_cli import __version__

    assert manifest["written_by"] == "flexlora" and manifest["version"] == __version__
    assert manifest["command"] == "aggregate"
    assert manifest["time"] == "2023-11-14T22:13:20Z"  # SOURCE_DATE_EPOCH=1700000000
    assert read_manifest(workdir / "out") == manifest
    assert read_manifest(workdir / "alice") is None


def test_reruns_write_identical_adapters_and_only_the_manifest_time_differs(workdir, monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    ok("aggregate", "alice", "bob", "-o", "one")
    ok("aggregate", "alice", "bob", "-o", "two")
    one, two = snapshot(workdir / "one"), snapshot(workdir / "two")
    assert {k: v for k, v in one.items() if k != MANIFEST_NAME} == {k: v for k, v in two.items() if k != MANIFEST_NAME}
    first, second = read_manifest(workdir / "one"), read_manifest(workdir / "two")
    assert first["time"] != second["time"] and first["time"].endswith("Z")
    assert {k: v for k, v in first.items() if k != "time"} == {k: v for k, v in second.items() if k != "time"}


@pytest.mark.parametrize("value", ["yesterday", "-5", "1e9", "9" * 30])
def test_a_malformed_source_date_epoch_fails_before_any_work(value, workdir, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", value)
    before = tree(tmp_path)
    line = refused("merge", "alice", "bob", "-o", "out")
    assert line.startswith("Error: SOURCE_DATE_EPOCH: must be a whole number of seconds"), line
    assert tree(tmp_path) == before


def test_read_manifest_is_bounded_and_refuses_what_is_not_ours(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    assert read_manifest(folder) is None
    (folder / MANIFEST_NAME).write_text(json.dumps({"written_by": "flexlora", "pad": "x" * 2**20}))
    assert read_manifest(folder) is None  # larger than 1 MiB
    (folder / MANIFEST_NAME).unlink()
    os.mkfifo(folder / MANIFEST_NAME)  # would block a plain read
    assert read_manifest(folder) is None
    (folder / MANIFEST_NAME).unlink()
    (folder / MANIFEST_NAME).write_text('["written_by", "flexlora"]')
    assert read_manifest(folder) is None


# --- one run per OUT: the lock ---------------------------------------------------------------------


def test_a_second_output_folder_on_the_same_target_fails_at_once(tmp_path):
    target = tmp_path / "out"
    with OutputFolder(target, command="test") as first:
        with pytest.raises(OutputError) as caught:
            with OutputFolder(tmp_path / "x" / ".." / "out"):  # another spelling of the same folder
                pass
        assert caught.value.message == (
            f"{tmp_path}/x/../out: another flexlora run is writing this output folder (pid {os.getpid()}) "
            "(hint: wait for it to finish, or choose another output folder)"
        )
        (first.staging / "data.txt").write_text("first")
        first.commit()
    assert (target / "data.txt").read_text() == "first"
    assert leftovers(target) == []  # the lock file is removed when done


def test_a_lock_file_replaced_between_open_and_lock_is_not_trusted(tmp_path, monkeypatch):
    """A finishing run removes the lock file after we opened it: we must lock the path's new file."""
    import filelock

    swapped = []

    class RacingLock(filelock.FileLock):
        def acquire(self, *args, **kwargs):
            result = super().acquire(*args, **kwargs)
            if not swapped:  # the holder we waited for removes the file; a newcomer creates a new one
                swapped.append(True)
                os.unlink(self.lock_file)
                Path(self.lock_file).write_text("")
            return result

    monkeypatch.setattr(filelock, "FileLock", RacingLock)
    target = tmp_path / "out"
    with OutputFolder(target):
        assert swapped
        assert locked_by_someone(tmp_path / ".out.lock")  # the file at the path is the one we hold
    assert leftovers(target) == []


def test_a_lock_file_someone_else_holds_is_never_deleted(tmp_path):
    target = tmp_path / "out"
    lock_path = tmp_path / ".out.lock"
    with OutputFolder(target):
        os.unlink(lock_path)  # e.g. removed by hand; another run then creates and holds a new one
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT)
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        assert lock_path.exists() and locked_by_someone(lock_path)
    finally:
        os.close(descriptor)


def test_a_stale_lock_file_of_a_killed_run_is_reused_and_removed(tmp_path):
    (tmp_path / ".out.lock").write_text("999999999\n")  # nobody holds it
    make_output(tmp_path / "out")
    assert leftovers(tmp_path / "out") == []


def test_two_concurrent_runs_the_second_fails_at_once_and_the_first_completes(inputs, tmp_path):
    output, expected = tmp_path / "round", tmp_path / "expected"
    hold_first, hold_second = gate(tmp_path, "first"), gate(tmp_path, "second")
    first = spawn("aggregate", *inputs, "--weights", "1,3", "-o", output, FLEXLORA_TEST_PAUSE_WRITES=str(hold_first))
    try:
        wait_for(lambda: staged(output), first)
        # Were the second run to reach writing, it would wait at its own gate and time out here.
        second = subprocess.run(
            CLI + ["aggregate", *map(str, inputs), "-o", str(output)], capture_output=True, text=True, timeout=WAIT,
            env={**os.environ, "FLEXLORA_TEST_PAUSE_WRITES": str(hold_second)},
        )
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip() == (
            f"Error: {output}: another flexlora run is writing this output folder (pid {first.pid}) "
            "(hint: wait for it to finish, or choose another output folder)"
        )
        assert first.poll() is None  # the first is still held at its gate
    finally:
        hold_first.unlink()
    stdout, stderr = first.communicate(timeout=WAIT)
    assert first.returncode == 0, stderr
    ok("aggregate", *inputs, "--weights", "1,3", "-o", expected)
    assert snapshot(output) == snapshot(expected)  # the first run's output, whole
    assert leftovers(output) == []


# --- the final move never replaces what appeared meanwhile ------------------------------------------


def no_renameat2(monkeypatch) -> None:
    """Where renameat2 is missing: mkdir placeholder + rename, and two renames instead of an exchange."""
    monkeypatch.setattr(output_module, "renameat2", lambda first, second, flags: False)


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "fallback"])
@pytest.mark.parametrize("filled", [False, True], ids=["empty-folder", "folder-with-a-file"])
@pytest.mark.parametrize("when", ["during-the-work", "just-before-the-move"])
def test_a_folder_created_at_out_during_the_run_is_left_untouched(when, renameat2, filled, tmp_path, monkeypatch):
    if not renameat2:
        no_renameat2(monkeypatch)
    monkeypatch.setattr(output_module, "_committing", False)
    target, pushed, identity = tmp_path / "out", [], []

    def someone_creates_out(staging=None):  # someone else, after our start check
        target.mkdir()
        if filled:
            (target / "theirs.txt").write_text("theirs")
        identity.append(target.stat().st_ino)

    def before_move(staging):  # e.g. a push to the Hub, after commit's last check of OUT
        pushed.append(staging)
        if when == "just-before-the-move":
            someone_creates_out()

    with pytest.raises(OutputError) as caught:
        with OutputFolder(target, command="test") as out:
            (out.staging / "data.txt").write_text("ours")
            if when == "during-the-work":
                someone_creates_out()
            out.commit(before_move=before_move)
    assert len(pushed) == (0 if when == "during-the-work" else 1)  # a changed OUT is seen before pushing
    assert caught.value.message == (
        f"{target}: was created by someone else while this run was working; it was left untouched and nothing "
        "was written (hint: choose another output folder, or move that folder away and run again)"
    )
    assert caught.value.output_state == "old"
    assert [target.stat().st_ino] == identity
    assert snapshot(target) == ({"theirs.txt": hashlib.sha256(b"theirs").hexdigest()} if filled else {})
    assert leftovers(target) == [] and not committing()  # the move did not happen: signals work again


@pytest.mark.parametrize("renameat2", [True, False], ids=["exchange", "two-renames"])
@pytest.mark.parametrize("change", ["replaced-by-a-foreign-folder", "replaced-by-another-flexlora-output", "emptied"])
@pytest.mark.parametrize("when", ["during-the-work", "just-before-the-move", "between-the-last-check-and-the-move"])
def test_an_output_changed_during_the_run_is_left_untouched(when, renameat2, change, tmp_path, monkeypatch):
    if not renameat2:
        no_renameat2(monkeypatch)
    target, found = tmp_path / "out", {}
    make_output(target, "old")

    def someone_changes_out(staging=None):
        if change == "replaced-by-a-foreign-folder":
            shutil.rmtree(target)
            target.mkdir()
            (target / "theirs.txt").write_text("theirs")
        elif change == "replaced-by-another-flexlora-output":
            (target / MANIFEST_NAME).write_text(json.dumps({"written_by": "flexlora", "run": "other"}))
        else:
            shutil.rmtree(target)
            target.mkdir()
        found.update(snapshot(target))

    if when == "between-the-last-check-and-the-move":  # the change lands right before the exchange
        real_exchange, fired = output_module.exchange, []

        def racing_exchange(first, second):
            if not fired:
                fired.append(someone_changes_out())
            return real_exchange(first, second)

        monkeypatch.setattr(output_module, "exchange", racing_exchange)
    with pytest.raises(OutputError, match="was changed by someone else while this run was working"):
        with OutputFolder(target, overwrite=True, command="test") as out:
            (out.staging / "data.txt").write_text("ours")
            if when == "during-the-work":
                someone_changes_out()
            out.commit(before_move=someone_changes_out if when == "just-before-the-move" else None)
    assert snapshot(target) == found
    assert leftovers(target) == []


@pytest.mark.parametrize("renameat2", [True, False], ids=["exchange", "two-renames"])
def test_an_empty_output_filled_during_the_run_is_left_untouched(renameat2, tmp_path, monkeypatch):
    if not renameat2:
        no_renameat2(monkeypatch)
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(OutputError, match="was changed by someone else"):
        with OutputFolder(target) as out:
            (out.staging / "data.txt").write_text("ours")
            (target / "theirs.txt").write_text("theirs")
            out.commit()
    assert snapshot(target) == {"theirs.txt": hashlib.sha256(b"theirs").hexdigest()}


@pytest.mark.parametrize("renameat2", [True, False], ids=["exchange", "two-renames"])
def test_an_unchanged_output_is_replaced_whole(renameat2, tmp_path, monkeypatch):
    if not renameat2:
        no_renameat2(monkeypatch)
    target = tmp_path / "out"
    make_output(target, "old")
    (target / "extra.txt").write_text("only in the old output")
    make_output(target, "new")
    assert sorted(snapshot(target)) == ["data.txt", MANIFEST_NAME]
    assert (target / "data.txt").read_text() == "new" and leftovers(target) == []


def test_a_folder_created_at_out_during_a_real_run(inputs, tmp_path):
    output = tmp_path / "round"
    hold = gate(tmp_path)
    process = spawn("aggregate", *inputs, "-o", output, FLEXLORA_TEST_PAUSE_WRITES=str(hold))
    try:
        wait_for(lambda: staged(output), process)
        output.mkdir()
        (output / "theirs.txt").write_text("theirs")
    finally:
        hold.unlink()
    stdout, stderr = process.communicate(timeout=WAIT)
    assert process.returncode == 2, stderr
    assert stderr.strip() == (
        f"Error: {output}: was created by someone else while this run was working; it was left untouched and "
        "nothing was written (hint: choose another output folder, or move that folder away and run again)"
    )
    assert snapshot(output) == {"theirs.txt": hashlib.sha256(b"theirs").hexdigest()}
    assert leftovers(output) == []


# --- inputs are read-only in fact -------------------------------------------------------------------


def test_an_input_weight_file_linked_into_the_old_output_is_refused(workdir, tmp_path):
    ok("aggregate", "alice", "bob", "-o", "out")
    carol = workdir / "carol"
    carol.mkdir()
    shutil.copy(workdir / "alice" / "adapter_config.json", carol)
    (carol / "adapter_model.safetensors").symlink_to(workdir / "out" / "alice" / "adapter_model.safetensors")
    before = tree(tmp_path)
    line = refused("aggregate", "carol", "bob", "-o", "out", "--overwrite")
    real = (workdir / "out" / "alice" / "adapter_model.safetensors").resolve()
    assert line == (
        f"Error: out: contains the input {real} (linked from carol/adapter_model.safetensors); inputs are never "
        "modified (hint: choose another output folder)"
    )
    assert tree(tmp_path) == before


def test_inputs_may_be_files_and_are_resolved(tmp_path):
    make_output(tmp_path / "out")
    inside = tmp_path / "out" / "data.txt"
    (tmp_path / "link.txt").symlink_to(inside)
    for given in [inside, tmp_path / "link.txt"]:
        with pytest.raises(OutputError, match="contains the input"):
            with OutputFolder(tmp_path / "out", inputs=[given], overwrite=True):
                pass
    (tmp_path / "model").mkdir()
    (tmp_path / "model-link").symlink_to(tmp_path / "model")
    with pytest.raises(OutputError, match="is inside the input .*model; inputs are never modified"):
        with OutputFolder(tmp_path / "model-link" / "out", inputs=[tmp_path / "model"]):
            pass
    with OutputFolder(tmp_path / "elsewhere", inputs=[tmp_path / "link.txt", tmp_path / "model"]) as out:
        out.commit()


# --- signals and exceptions say what is on disk -------------------------------------------------------

LIBRARY_RUN = textwrap.dedent(
    """
    import json, sys
    from flexlora_cli.adapters.output import OutputFolder, pause_for_tests
    try:
        with OutputFolder(sys.argv[1], overwrite=True, command="test") as out:
            (out.staging / "data.txt").write_text("new")
            pause_for_tests("GATE_WHILE_WRITING")
            out.commit()
        print(json.dumps({"state": "no interrupt"}))
    except KeyboardInterrupt as interrupt:
        print(json.dumps({"state": getattr(interrupt, "output_state", "not said")}))
    """
)


@pytest.mark.parametrize("existing", [True, False], ids=["replacing", "new-output"])
@pytest.mark.parametrize("moment", ["while-writing", "right-after-the-move"])
def test_sigint_in_library_use_leaves_old_or_new_and_says_which(moment, existing, tmp_path):
    target = tmp_path / "out"
    if existing:
        make_output(target, "old")
    hold = gate(tmp_path)
    variable = "GATE_WHILE_WRITING" if moment == "while-writing" else "FLEXLORA_TEST_PAUSE_AFTER_MOVE"
    process = subprocess.Popen(
        [sys.executable, "-c", LIBRARY_RUN, str(target)], env={**os.environ, variable: str(hold)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    if moment == "while-writing":
        wait_for(lambda: any(tmp_path.glob(".out.*.partial/data.txt")), process)
    else:
        wait_for(lambda: (target / "data.txt").exists() and (target / "data.txt").read_text() == "new", process)
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)  # let the signal land while the run waits at the gate
    hold.unlink()
    stdout, stderr = process.communicate(timeout=WAIT)
    assert process.returncode == 0, stderr
    expected = "old" if moment == "while-writing" else "new"
    assert json.loads(stdout) == {"state": expected}
    if expected == "new":
        assert (target / "data.txt").read_text() == "new" and read_manifest(target)["command"] == "test"
    elif existing:
        assert (target / "data.txt").read_text() == "old"
    else:
        assert not target.exists()
    assert leftovers(target) == []  # no staging, no old copy, no lock


def test_sigint_right_after_the_final_swap_completes_the_run(inputs, tmp_path):
    output, expected = tmp_path / "round", tmp_path / "expected"
    ok("aggregate", *inputs, "--weights", "1,3", "-o", output)
    old_manifest = (output / MANIFEST_NAME).read_bytes()
    hold = gate(tmp_path)
    process = spawn("aggregate", *inputs, "-o", output, "--overwrite", FLEXLORA_TEST_PAUSE_AFTER_MOVE=str(hold))
    try:
        wait_for(lambda: (output / MANIFEST_NAME).read_bytes() != old_manifest, process)
        process.send_signal(signal.SIGINT)
        time.sleep(0.5)
    finally:
        hold.unlink()
    stdout, stderr = process.communicate(timeout=WAIT)
    assert process.returncode == 0, stderr
    assert "interrupted" not in stderr and "Error" not in stderr
    ok("aggregate", *inputs, "-o", expected)
    assert snapshot(output) == snapshot(expected)
    assert leftovers(output) == []


def test_committing_is_set_by_the_move(tmp_path, monkeypatch):
    monkeypatch.setattr(output_module, "_committing", False)
    with OutputFolder(tmp_path / "out") as out:
        (out.staging / "data.txt").write_text("x")
        assert not committing()
        out.commit()
        assert committing()


def test_an_exception_in_the_block_says_old_and_removes_everything(tmp_path):
    target = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(RuntimeError) as caught:
        with OutputFolder(target) as out:
            (out.staging / "data.txt").write_text("x")
            raise RuntimeError("a bug while computing")
    assert caught.value.output_state == "old"
    assert not (tmp_path / "new").exists()  # the parents this run created are removed too


# --- early checks and names near the limit ------------------------------------------------------------


def test_the_current_folder_is_refused_before_any_work_unless_ours(tmp_path, monkeypatch, inputs):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    before = tree(tmp_path)
    line = refused("merge", *inputs, "-o", ".")
    assert line == "Error: .: is the current folder, which flexlora did not write (hint: choose another output folder)"
    assert tree(tmp_path) == before
    with pytest.raises(OutputError, match="is the root of the file system"):
        with OutputFolder("/"):
            pass


def test_a_flexlora_output_may_be_replaced_from_inside(tmp_path, monkeypatch):
    target = tmp_path / "out"
    make_output(target, "old")
    monkeypatch.chdir(target)
    make_output(Path("."), "new")
    assert Path.cwd() == target and Path("data.txt").read_text() == "new"


def test_a_symlink_as_output_is_refused(tmp_path):
    make_output(tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OutputError, match="is a symbolic link"):
        with OutputFolder(tmp_path / "link", overwrite=True):
            pass


def test_an_output_name_of_255_bytes_works_and_its_leftovers_are_recognized(inputs, tmp_path):
    output = tmp_path / ("o" * 255)
    stem = output_module._sibling_stem(output.name)
    assert len(f".{stem}.4194304.0123abcd.partial") <= 255 and len(f".{stem}.lock") <= 255
    ok("aggregate", *inputs, "-o", output)
    stale = tmp_path / f".{stem}.999999999.0123abcd.partial"  # left by a killed run
    stale.mkdir()
    ok("aggregate", *inputs, "-o", output, "--overwrite")
    assert not stale.exists() and leftovers(output) == []
    assert sorted(p.name for p in output.iterdir()) == ["alice", "bob", MANIFEST_NAME]
    multibyte = tmp_path / ("é" * 127)  # 254 bytes
    make_output(multibyte)
    assert leftovers(multibyte) == []


def test_outputs_get_plain_umask_modes(inputs, tmp_path):
    mask = os.umask(0o027)  # not the usual 022, so that a fixed 0644 would not pass
    try:
        ok("aggregate", *inputs, "-o", tmp_path / "round")
        ok("merge", *inputs, "--dense", "-o", tmp_path / "merged")
    finally:
        os.umask(mask)
    for root in (tmp_path / "round", tmp_path / "merged"):
        for path in [root, *root.rglob("*")]:
            expected = 0o750 if path.is_dir() else 0o640
            assert stat.S_IMODE(path.stat().st_mode) == expected, path


# --- a full disk ----------------------------------------------------------------------------------------


def test_a_full_disk_reported_by_safetensors_fails_cleanly(inputs, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    output = tmp_path / "round"
    ok("aggregate", *inputs, "--weights", "1,3", "-o", output)
    old = snapshot(output)
    calls = []

    def full_disk(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # what safetensors 0.8 raises on ENOSPC (seen on a full tmpfs)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save_file(tensors, filename, metadata=metadata)

    real_save_file = write.save_file
    monkeypatch.setattr(write, "save_file", full_disk)
    line = refused("aggregate", *inputs, "-o", output, "--overwrite")
    assert line == f"Error: {output}: cannot write: No space left on device; nothing was written"
    assert snapshot(output) == old and leftovers(output) == []


def test_only_write_errors_become_cannot_write(tmp_path):
    from safetensors import SafetensorError

    with pytest.raises(SafetensorError):  # reading a damaged input is not a write error
        with OutputFolder(tmp_path / "a"):
            raise SafetensorError("Error while deserializing header: HeaderTooLarge")
    with pytest.raises(FileNotFoundError):  # nor is an input that vanished
        with OutputFolder(tmp_path / "b"):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(tmp_path / "input"))
    with pytest.raises(OutputError, match="cannot write: Permission denied; nothing was written"):
        with OutputFolder(tmp_path / "c") as out:
            raise PermissionError(errno.EACCES, "Permission denied", str(out.staging / "x"))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_malformed_epoch_is_an_option_error_at_enter(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "soon")
    with pytest.raises(OptionError):
        with OutputFolder(tmp_path / "out"):
            pass
    assert list(tmp_path.iterdir()) == []
