"""Hub references in, --push-to-hub out, through the real huggingface_hub client.

Offline tests read a Hub cache laid out by hand exactly as huggingface_hub lays it out (blobs,
snapshot symlinks, refs). Online tests run a Hub-compatible server on 127.0.0.1 (tests/hub_server.py)
and point HF_ENDPOINT at it: every byte pushed or pulled crosses real HTTP.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run, run_json, write_client
from flexlora_cli.adapters import open_adapter
from flexlora_cli.adapters.hub import HubRef, parse_ref
from hub_server import HubServer, git_blob_id

TOKEN = "hf_flexloraTOKENnotToBeSeen_4f9c2e7a"  # distinctive: searched for in every output
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
ROOT = Path(__file__).resolve().parents[1]






def error_line(*args) -> str:
    result = run(*args, code=2)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- reference syntax -------------------------------------------------------------------------


def test_reference_syntax(tmp_path, monkeypatch):
    assert parse_ref("org/name") == HubRef("org/name")
    assert parse_ref("org/name@v2") == HubRef("org/name", "v2")
    assert parse_ref("hf://org/name@refs/pr/3/round-2/alice") == HubRef("org/name", "refs/pr/3", "round-2/alice")
    assert parse_ref("hf://datasets/org/fed/bob") == HubRef("org/fed", None, "bob", "dataset")
    assert parse_ref("hf://org/name@v2/round-2/alice").name == "alice"
    for local in ("alice", "./alice", "/abs/alice", "a/b/c", "round-1/alice/"):
        assert parse_ref(local) is None
    # A path that exists locally always means the local folder, even if it reads like org/name.
    monkeypatch.chdir(tmp_path)
    write_client(tmp_path / "org" / "name", 4, seed=5)
    adapter = open_adapter("org/name")
    assert adapter.path == Path("org/name") and adapter.provenance == {}


# -- offline: a pre-populated cache -----------------------------------------------------------


def cache_repo(cache: Path, repo_id: str, snapshots: dict[str, dict[str, Path]], refs: dict[str, str]) -> None:
    """Lay out a repo as huggingface_hub's cache does: blobs/<etag>, snapshots/<commit>/<path> -> blob, refs/<name>."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    for commit, files in snapshots.items():
        for path_in_repo, source in files.items():
            data = source.read_bytes()
            etag = hashlib.sha256(data).hexdigest() if path_in_repo.endswith(".safetensors") else git_blob_id(data)
            blob = storage / "blobs" / etag
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = storage / "snapshots" / commit / path_in_repo
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    for ref, commit in refs.items():
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)


def commit_id(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


@pytest.fixture
def offline_cache(tmp_path, monkeypatch, clients):
    """org/fed: main holds alice, branch v1 holds bob's adapter; org/bundle has clients in subfolders."""
    cache = tmp_path / "home" / "hub"
    alice, bob, carol = clients
    main, v1, bundle = commit_id("main"), commit_id("v1"), commit_id("bundle")
    cache_repo(cache, "org/fed", {main: {f: alice / f for f in ADAPTER_FILES}, v1: {f: bob / f for f in ADAPTER_FILES}}, {"main": main, "v1": v1})
    cache_repo(cache, "org/bundle", {bundle: {f"carol/{f}": carol / f for f in ADAPTER_FILES}}, {"main": bundle})
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_CACHE")  # HF_HOME/hub, as huggingface_hub derives it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return {"main": main, "v1": v1, "bundle": bundle}


def test_offline_cache_resolves_repo_revision_and_subfolder(offline_cache, clients, tmp_path):
    alice, bob, carol = clients
    hub_report = run_json(
        "aggregate", "org/fed", "bob=org/fed@v1", f"hf://org/bundle@{offline_cache['bundle']}/carol",
        "--weights", "1,2,3", "-o", tmp_path / "from-hub",
    )
    run("aggregate", f"fed={alice}", f"bob={bob}", f"carol={carol}", "--weights", "1,2,3", "-o", tmp_path / "local")
    provenance = {c["name"]: c["provenance"] for c in hub_report["clients"]}
    assert provenance["fed"]["commit"] == offline_cache["main"]
    assert provenance["bob"] == {"repo_id": "org/fed", "repo_type": "model", "revision": "v1", "commit": offline_cache["v1"], "subfolder": None}
    assert provenance["carol"]["subfolder"] == "carol" and provenance["carol"]["commit"] == offline_cache["bundle"]
    for name in ("fed", "bob", "carol"):  # the cached inputs are the same adapters: same outputs, byte for byte
        weights = "adapter_model.safetensors"
        assert (tmp_path / "from-hub" / name / weights).read_bytes() == (tmp_path / "local" / name / weights).read_bytes()
    card = (tmp_path / "from-hub" / "bob" / "README.md").read_text()
    assert f"Hub `org/fed` @ `v1` (commit `{offline_cache['v1']}`)" in card
    assert sha256(bob / "adapter_model.safetensors") in card and sha256(bob / "adapter_config.json") in card
    assert "weight" in card and "0.333333" in card  # bob's normalized weight 2/6


def test_offline_errors_are_one_line(offline_cache, tmp_path):
    assert "HF_HUB_OFFLINE is set" in error_line("inspect", "org/never-downloaded")
    assert "no local folder of that name" in error_line("inspect", "round-1/alice")
    assert "HF_HUB_OFFLINE is set" in error_line("inspect", "org/fed@v9")
    assert "no adapter files" in error_line("inspect", "hf://org/bundle/dave")
    assert "not a valid Hub reference" in error_line("inspect", "hf://org")


# -- online: the loopback Hub -----------------------------------------------------------------


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A Hub on 127.0.0.1 that requires TOKEN to write; HF_ENDPOINT points at it; fresh cache."""
    from huggingface_hub import constants

    with HubServer(token=TOKEN) as server:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest's offline mode, read at import
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
        yield server


def test_aggregate_pushes_every_client_in_one_commit_and_pulls_back(hub, clients, tmp_path, monkeypatch):
    specs = [f"{name}={folder}" for name, folder in zip(("alice", "bob", "carol"), clients)]
    report = run_json("aggregate", *specs, "-o", tmp_path / "round-1", "--push-to-hub", "org/fed", "--commit-message", "round 1")
    assert len(hub.commits_to("org/fed")) == 1  # one commit for all three clients
    [pushed] = report["pushed"]
    assert report["commit_urls"] == [pushed["commit_url"]] == [f"{hub.url}/org/fed/commit/{pushed['commit']}"]
    remote = hub.files("org/fed")
    assert hub.repos[("model", "org/fed")].commits[pushed["commit"]].message == "round 1"
    for name in ("alice", "bob", "carol"):
        for file in (*ADAPTER_FILES, "README.md"):
            assert remote[f"{name}/{file}"] == (tmp_path / "round-1" / name / file).read_bytes()

    # Pull back by repo id through a fresh cache: the bytes come over HTTP from the server.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "fresh-cache"))
    pulled = open_adapter("hf://org/fed/bob")
    assert pulled.provenance["commit"] == pushed["commit"] and pulled.name == "bob"
    for file in ADAPTER_FILES:
        assert (pulled.path / file).read_bytes() == (tmp_path / "round-1" / "bob" / file).read_bytes()
    assert any(r.method == "GET" and "/org/fed/resolve/" in r.path for r in hub.requests)

    # Round 2 reads the Hub outputs; its cards cite round 1's commit.
    run("aggregate", "hf://org/fed/alice", "hf://org/fed/bob", "hf://org/fed/carol", "-o", tmp_path / "round-2")
    card = (tmp_path / "round-2" / "carol" / "README.md").read_text()
    assert f"Hub `org/fed` folder `carol` @ `main` (commit `{pushed['commit']}`)" in card
    assert sha256(tmp_path / "round-1" / "carol" / "adapter_model.safetensors") in card


def test_split_template_pushes_each_rank_to_its_own_repo(hub, clients, tmp_path):
    run("merge", *clients, "-o", tmp_path / "merged")
    report = run_json("split", tmp_path / "merged", "--ranks", "4,8", "-o", tmp_path / "split", "--push-to-hub", "org/global-r{rank}")
    assert [p["repo_id"] for p in report["pushed"]] == ["org/global-r4", "org/global-r8"]
    for rank in (4, 8):
        remote = hub.files(f"org/global-r{rank}")
        assert len(hub.commits_to(f"org/global-r{rank}")) == 1
        for file in (*ADAPTER_FILES, "README.md"):
            assert remote[file] == (tmp_path / "split" / f"rank-{rank}" / file).read_bytes()
    assert "energy kept" in hub.files("org/global-r4")["README.md"].decode()


def test_merge_pushes_to_a_private_branch_or_a_pull_request(hub, clients, tmp_path):
    report = run_json("merge", *clients[:2], "-o", tmp_path / "m1", "--push-to-hub", "org/merged", "--branch", "round-2", "--private")
    repo = hub.repos[("model", "org/merged")]
    assert repo.private and report["pushed"][0]["revision"] == "round-2"
    assert hub.files("org/merged", "round-2")["adapter_model.safetensors"] == (tmp_path / "m1" / "adapter_model.safetensors").read_bytes()
    assert "adapter_model.safetensors" not in hub.files("org/merged", "main")

    report = run_json("merge", *clients, "-o", tmp_path / "m2", "--push-to-hub", "org/merged", "--create-pr")
    assert report["commit_urls"] == [f"{hub.url}/org/merged/discussions/1"]
    assert hub.files("org/merged", "refs/pr/1")["adapter_model.safetensors"] == (tmp_path / "m2" / "adapter_model.safetensors").read_bytes()
    assert "adapter_model.safetensors" not in hub.files("org/merged", "main")


def test_online_errors_are_one_line(hub, clients, tmp_path, monkeypatch):
    hub.create_repo("org/empty")
    hub.create_repo("org/gated", gated=True)
    assert "repository org/missing not found" in error_line("inspect", "org/missing")
    assert "revision 'nope' not found in org/empty" in error_line("inspect", "hf://org/empty@nope")
    assert "no adapter files" in error_line("inspect", "org/empty")
    # Bad push targets are refused before any work: nothing is written.
    assert "unknown placeholder {rank}" in error_line("aggregate", *clients, "-o", tmp_path / "x", "--push-to-hub", "org/c-{rank}")
    assert "only applies with --push-to-hub" in error_line("merge", *clients, "-o", tmp_path / "x", "--create-pr")
    assert not (tmp_path / "x").exists()

    monkeypatch.delenv("HF_TOKEN")
    line = error_line("inspect", "org/gated")
    assert "gated" in line and "set HF_TOKEN" in line
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    line = error_line("merge", *clients, "-o", tmp_path / "m", "--push-to-hub", "org/new")
    assert "not authorized to push to org/new" in line and "set HF_TOKEN" in line
    assert "org/new" not in {repo_id for _, repo_id in hub.repos}


def test_token_is_never_printed_written_or_logged(hub, clients, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.delenv("HF_TOKEN")  # only --token carries it
    names = [f"{n}={c}" for n, c in zip("ab", clients)]
    results = [
        run("aggregate", *names, "-o", tmp_path / "out", "--push-to-hub", "org/c-{name}", "--token", TOKEN, "--json"),
        run("aggregate", "hf://org/c-a", "hf://org/c-b", "-o", tmp_path / "again", "--token", TOKEN),
        run("inspect", "org/c-missing", "--token", TOKEN, code=2),
        run("merge", *clients, "-o", tmp_path / "m", "--push-to-hub", "org/private", "--token", TOKEN + "x", code=2),
    ]
    assert "adapter_config.json" in hub.files("org/c-b")  # really pushed
    assert any(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)  # really used
    for result in results:
        assert TOKEN not in result.output and TOKEN not in result.stdout and TOKEN not in result.stderr
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert all(TOKEN not in record.getMessage() for record in caplog.records)


def test_example_runs_two_rounds_through_the_hub(hub, clients, tmp_path):
    env = {
        **os.environ, "ORG": "org", "PREFIX": "fl", "NUM_SAMPLES": "120,300,80", "WORK": str(tmp_path / "work"),
        "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "home"),
        "HF_HUB_CACHE": str(tmp_path / "home" / "hub"), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    specs = [f"{name}={folder}" for name, folder in zip(("alice", "bob", "carol"), clients)]
    done = subprocess.run(["bash", str(ROOT / "examples" / "hub_federation.sh"), *specs], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for name, folder in zip(("alice", "bob", "carol"), clients):
        repo = hub.repos[("model", f"org/fl-{name}")]
        history = [commit.message for commit in repo.commits.values()]
        assert history == ["initial commit", f"client {name}: locally trained adapter", "FlexLoRA round 1", "FlexLoRA round 2"]
        round_1 = repo.resolve(repo.commits[repo.refs["main"]].parent)
        card = hub.files(f"org/fl-{name}")["README.md"].decode()
        assert f"Hub `org/fl-{name}` @ `main` (commit `{round_1.oid}`)" in card  # round 2 read round 1's push
        assert hub.files(f"org/fl-{name}")["adapter_model.safetensors"] == (tmp_path / "work" / "round-2" / name / "adapter_model.safetensors").read_bytes()
    assert TOKEN not in done.stdout + done.stderr
