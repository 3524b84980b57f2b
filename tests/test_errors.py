"""Every bad input through the CLI: one line `Error: <input>: <problem>`, exit 2, nothing written,
inputs untouched. docs/errors.md is checked against the messages seen here."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import invoke_flexlora, write_client
from error_cases import CASES, MARKER, Case
from flexlora_cli.cli.app import app

runner = CliRunner()
DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
MESSAGES: dict[str, str] = {}  # case id -> the message the CLI printed (for the docs table)
COMMANDS: dict[str, list[str]] = {}  # case id -> its command line


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    write_client(root / "alice", 4, seed=1, target_modules=["q_proj", "v_proj"])
    write_client(root / "bob", 8, seed=2, target_modules=["q_proj", "v_proj"])
    return root


def snapshot(folder: Path, skip: set[Path] = frozenset()) -> dict[str, str]:
    """Relative path -> sha256 (or the symlink target) of everything under `folder`."""
    state = {}
    for path in sorted(folder.rglob("*")):
        if any(path == s or s in path.parents for s in skip):
            continue
        if path.is_symlink():
            state[str(path.relative_to(folder))] = "-> " + os.readlink(path)
        elif path.is_file():
            state[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            state[str(path.relative_to(folder))] = "dir"
    return state


def run_case(case: Case, pristine: Path, workdir: Path, monkeypatch) -> str:
    """Run one case in a fresh copy of the clients; return the one-line message."""
    for client in ("alice", "bob"):
        shutil.copytree(pristine / client, workdir / client)
    monkeypatch.chdir(workdir)
    args = case.build(workdir)
    watched = {workdir / out for out in case.outputs}
    before = snapshot(workdir, skip=watched)
    result = invoke_flexlora(args)
    lines = result.stderr.splitlines()
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback
    assert "Traceback" not in result.output
    assert result.stdout == ""
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert case.expect in lines[0], lines[0]
    # nothing written, nothing changed, no temporary sibling left behind
    assert snapshot(workdir, skip=watched) == before
    for out in watched:
        assert not out.exists() or out.is_symlink(), out
    assert not (workdir / MARKER).exists(), "the .bin payload ran"
    message = lines[0].removeprefix("Error: ")
    for absolute in {str(workdir.resolve()), str(workdir)}:  # messages that resolve paths
        message = message.replace(absolute + os.sep, "").replace(absolute, ".")
    MESSAGES[case.id], COMMANDS[case.id] = message, args
    return message


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, pristine, tmp_path, monkeypatch):
    run_case(case, pristine, tmp_path, monkeypatch)


def test_json_mode_errors_keep_stdout_empty(pristine, tmp_path, monkeypatch):
    shutil.copytree(pristine / "alice", tmp_path / "alice")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["merge", "alice", "nope", "-o", "out", "--json"])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip() == "Error: nope: no such file or folder"


def test_debug_shows_the_traceback(pristine, tmp_path, monkeypatch):
    from flexlora_cli.errors import AdapterError

    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["merge", "nope", "-o", "out", "--debug"])
    assert isinstance(result.exception, AdapterError)  # raised through: the CLI shows the traceback
    monkeypatch.setenv("FLEXLORA_DEBUG", "1")
    assert isinstance(runner.invoke(app, ["merge", "nope", "-o", "out"]).exception, AdapterError)


def _without_file_read_override() -> None:
    """In a child about to exec, as root: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding
    set, so the exec'd process obeys file modes like any user when it reads and writes (it stays uid 0, so it can still run an
    interpreter installed under /root, which `nobody` could not)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH (linux/capability.h)
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_permission_denied_config(pristine, tmp_path):
    """Tested as root too (CI runs as root): the CLI runs in a child process without the capabilities
    that let root read any file."""
    import subprocess
    import sys

    shutil.copytree(pristine / "alice", tmp_path / "alice")
    (tmp_path / "alice" / "adapter_config.json").chmod(0)
    as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    done = subprocess.run(
        [sys.executable, "-c", "from flexlora_cli.cli.app import main; main()", "merge", "alice", "-o", "out"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        preexec_fn=_without_file_read_override if as_root else None,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == "Error: alice/adapter_config.json: cannot read: Permission denied"
    assert done.stdout == "" and not (tmp_path / "out").exists()


def test_unwritable_output_location(pristine, tmp_path):
    """Tested as root too: the CLI runs in a child process without the capabilities that let root write
    in any folder."""
    import subprocess
    import sys

    shutil.copytree(pristine / "alice", tmp_path / "alice")
    (tmp_path / "locked").mkdir(mode=0o500)
    as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    done = subprocess.run(
        [sys.executable, "-c", "from flexlora_cli.cli.app import main; main()", "merge", "alice", "-o", "locked/out"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        preexec_fn=_without_file_read_override if as_root else None,
    )
    assert done.returncode == 2, done.stderr
    message = done.stderr.strip()
    assert message.startswith(f"Error: locked/out: cannot write in {(tmp_path / 'locked').resolve()} ("), message
    assert "permission denied" in message, message
    assert done.stdout == "" and not (tmp_path / "locked" / "out").exists() and len(message.splitlines()) == 1


def test_a_single_input_is_merged_with_a_note(pristine, tmp_path, monkeypatch):
    shutil.copytree(pristine / "alice", tmp_path / "alice")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["merge", "alice", "-o", "out", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["notes"] == ["merging a single adapter: output equals its delta"]
    assert "note: merging a single adapter: output equals its delta" in result.stderr
    human = runner.invoke(app, ["merge", "alice", "-o", "out2"])
    assert "merging a single adapter: output equals its delta" in human.stderr


def render_table(messages: dict[str, str], commands: dict[str, list[str]]) -> str:
    """docs/errors.md: the table of every case and the message the CLI gives for it."""
    lines = [
        "# Bad inputs and their messages",
        "",
        "Generated by `tests/test_errors.py` from the cases in `tests/error_cases.py` (regenerate with",
        "`FLEXLORA_WRITE_DOCS=1 python -m pytest tests/test_errors.py`); the test suite fails if this file",
        "is out of date. Each case runs through the CLI on real PEFT folders: the command exits with code 2,",
        "prints exactly this one line on stderr, writes nothing and leaves its inputs byte-identical.",
        "`--debug` (or `FLEXLORA_DEBUG=1`) shows the traceback instead.",
        "",
        "In the examples, `alice/` (r=4) and `bob/` (r=8) are valid clients (tiny Llama, `q_proj` and",
        "`v_proj`; `v_proj` is 48x96) and the command writes to `out/`.",
        "",
        "| bad input | command | message (`Error: ...`) |",
        "|---|---|---|",
    ]
    for case in CASES:
        command = "flexlora " + " ".join(commands[case.id])
        lines.append(f"| {case.bad_input} | `{_cell(command)}` | `{_cell(messages[case.id])}` |")
    lines += [
        "",
        "Also handled, with messages that depend on the platform: an `adapter_config.json` without read",
        "permission (`alice/adapter_config.json: cannot read: Permission denied`; tested as root too, without root's",
        "capabilities to read and write any file)",
        "and an output location where the OS refuses to create a folder (`out: cannot write in <folder>",
        "(permission denied)`, or `(operation not permitted)`, `(read-only file system)`).",
        "",
        "Not an error: a single input to `merge` is allowed; its output equals that adapter's delta, and the",
        "command says so (`note: merging a single adapter: output equals its delta` on stderr, and in",
        "`notes` of the `--json` report).",
        "",
        "Ranks: a rank the user asks for (`--rank`, `--ranks`) must be between 1 and min(d_out, d_in) of",
        "every module it applies to. A client's own trained rank may exceed that (PEFT allows it); such a",
        "client is accepted and gets back an adapter of its own rank, the components beyond",
        "min(d_out, d_in) being zero.",
        "",
        "NaN/Inf is detected as each tensor is read while the modules stream through the merge; the output",
        "is only written, atomically, after every tensor has been read, so a NaN in the last module still",
        "leaves nothing behind.",
        "",
    ]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def test_errors_doc_is_up_to_date(pristine, tmp_path_factory, monkeypatch):
    for case in CASES:
        if case.id not in MESSAGES:  # run on its own (e.g. with -k): collect what is missing
            with monkeypatch.context() as patch:
                run_case(case, pristine, tmp_path_factory.mktemp(case.id), patch)
    expected = render_table(MESSAGES, COMMANDS)
    if os.environ.get("FLEXLORA_WRITE_DOCS"):
        DOC.parent.mkdir(exist_ok=True)
        DOC.write_text(expected, encoding="utf-8")
    assert DOC.is_file() and DOC.read_text(encoding="utf-8") == expected, (
        "docs/errors.md is out of date: run FLEXLORA_WRITE_DOCS=1 python -m pytest tests/test_errors.py"
    )
