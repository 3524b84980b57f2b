"""Hostile and unlucky inputs that once crashed or misled: dtypes safetensors can hold, weights at the float
range's edges, rich markup in names, credentials inside HF_ENDPOINT, and pushing while the Hub is out of reach.

The one-line messages of the CLI cases are pinned in tests/error_cases.py; these tests check what those cannot:
the dtype table against safetensors itself, outputs that must be written, and what must never be printed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import write_client
from error_cases import Q0_A, raw_bytes, write_raw_safetensors
from flexlora_cli.adapters.load import load_adapter
from flexlora_cli.adapters.tensors import FLOAT_DTYPES, SAFETENSORS_DTYPES, TensorFile, byte_size
from flexlora_cli.cli.app import app
from flexlora_cli.errors import AdapterError
from flexlora_cli.flexlora import normalize_weights
from hub_server import HubServer

runner = CliRunner()
WEIGHTS = "adapter_model.safetensors"
TOKEN = "hf_flexloraTOKENbadInputs_9d1e"
SECRET = "endpointPASSWORD_5b7c"  # inside HF_ENDPOINT: searched for in every output


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-inputs")
    write_client(root / "alice", 4, seed=1, target_modules=["q_proj", "v_proj"])
    write_client(root / "bob", 8, seed=2, target_modules=["q_proj", "v_proj"])
    return root


@pytest.fixture
def work(pristine, tmp_path, monkeypatch) -> Path:
    for client in ("alice", "bob"):
        shutil.copytree(pristine / client, tmp_path / client)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


# -- dtypes ---------------------------------------------------------------------------------------


def safetensors_dtype_names(tmp_path: Path) -> list[str]:
    """Every dtype name this safetensors accepts, from its own refusal of an unknown one."""
    path = tmp_path / "unknown.safetensors"
    write_raw_safetensors(path, {"t": ("NOT_A_DTYPE", [1], b"\0")})
    with pytest.raises(SafetensorError) as refused:
        safe_open(str(path), framework="pt")
    listed = str(refused.value).split("expected one of", 1)[1]
    return re.findall(r"`(\w+)`", listed)


def torch_tensor_of(name: str) -> torch.Tensor | None:
    """A (4, 8) tensor of that dtype as torch makes it (F4 packs two values per byte), or None."""
    dtype = SAFETENSORS_DTYPES[name][1]
    if dtype is None:
        return None
    if name == "F4":
        return torch.zeros(4, 4, dtype=torch.uint8).view(dtype)
    return torch.zeros(4, 8, dtype=dtype)


def test_dtype_table_is_safetensors_own_list(tmp_path):
    names = safetensors_dtype_names(tmp_path)
    assert len(names) >= 20 and "F8_E4M3" in names and "F4" in names
    assert set(SAFETENSORS_DTYPES) == set(names)


@pytest.mark.parametrize("name", sorted(SAFETENSORS_DTYPES))
def test_every_dtype_is_indexed_with_its_name_and_size(name, tmp_path):
    """Real files where torch can make the dtype (safetensors writes the header), by hand otherwise;
    the header's byte span, written or checked by safetensors itself, must equal our size for it."""
    path = tmp_path / "t.safetensors"
    tensor = torch_tensor_of(name)
    if tensor is not None:
        save_file({"t": tensor}, str(path))
    else:  # F6_*: torch has no such dtype; safetensors still validates the span when it opens the file
        write_raw_safetensors(path, {"t": (name, [4, 8], bytes(4 * 8 * 6 // 8))})
    with safe_open(str(path), framework="pt") as handle:
        shape, written = tuple(handle.get_slice("t").get_shape()), handle.get_slice("t").get_dtype()
        if tensor is not None:
            assert handle.get_tensor("t").dtype == SAFETENSORS_DTYPES[name][1]
    header_length = int.from_bytes(path.read_bytes()[:8], "little")
    start, end = json.loads(path.read_bytes()[8 : 8 + header_length])["t"]["data_offsets"]
    assert written == name and shape == (4, 8)
    info = TensorFile(path).index["t"]
    assert (info.dtype, info.shape) == (name, (4, 8))
    assert byte_size(info.shape, info.dtype) == end - start


@pytest.mark.parametrize("name", sorted(set(SAFETENSORS_DTYPES) - set(FLOAT_DTYPES)))
def test_every_other_dtype_is_refused_naming_it(name, pristine, tmp_path):
    """A client whose q_proj lora_A is in that dtype: one message naming the dtype as safetensors does."""
    folder = tmp_path / "bob"
    shutil.copytree(pristine / "bob", folder)
    tensors = load_file(str(folder / WEIGHTS))
    rows, cols = tensors[Q0_A].shape
    entries = {key: ("F32", list(t.shape), raw_bytes(t)) for key, t in tensors.items()}
    entries[Q0_A] = (name, [rows, cols], bytes(byte_size((rows, cols), name)))
    write_raw_safetensors(folder / WEIGHTS, entries)
    with pytest.raises(AdapterError) as refused:
        load_adapter(folder)
    note = "" if name.startswith(("F", "BF")) else " (non-floating-point)"
    assert refused.value.problem == f"tensor {Q0_A} is {name}{note}; LoRA factors must be float16, bfloat16, float32 or float64"


def test_float_dtypes_are_read(pristine, tmp_path):
    for name in FLOAT_DTYPES:
        folder = tmp_path / name
        shutil.copytree(pristine / "bob", folder)
        tensors = load_file(str(folder / WEIGHTS))
        save_file({k: v.to(SAFETENSORS_DTYPES[name][1]) for k, v in tensors.items()}, str(folder / WEIGHTS))
        adapter = load_adapter(folder)
        assert adapter.dtype == SAFETENSORS_DTYPES[name][1]
        assert torch.equal(adapter.tensor(Q0_A), tensors[Q0_A].to(adapter.dtype))


def test_a_large_int32_tensor_is_not_called_truncated(pristine, tmp_path):
    """4 bytes an item: counted as 8 (the old default for unknown dtypes), the header claims more than the file holds."""
    folder = tmp_path / "bob"
    shutil.copytree(pristine / "bob", folder)
    tensors = load_file(str(folder / WEIGHTS))
    tensors["base_model.model.lm_head.weight"] = torch.zeros(80, 3840, dtype=torch.int32)
    save_file(tensors, str(folder / WEIGHTS))
    assert 2 * 80 * 3840 * 4 > (folder / WEIGHTS).stat().st_size  # what makes the wrong size visible
    with pytest.raises(AdapterError) as refused:
        load_adapter(folder)
    assert "truncated" not in refused.value.problem
    assert "base_model.model.lm_head.weight is I32 (non-floating-point)" in refused.value.problem


# -- weights at the float range's edges -------------------------------------------------------------


@pytest.mark.parametrize(
    "weights",
    [[1e308, 1e308], [1e308, 1.7e308, 5e307], [1e-320, 3e-320], [5e-324, 5e-324, 1e-323], [1e308, 1e-300], [10**300, 3 * 10**300]],
)
def test_weights_normalize_at_the_edges_of_the_float_range(weights):
    exact = [Fraction(w) / sum(map(Fraction, weights)) for w in weights]  # exact rational reference
    assert normalize_weights(weights, len(weights)) == pytest.approx([float(e) for e in exact], rel=1e-15, abs=0)


def test_ordinary_weights_normalize_as_plain_division():
    weights = [0.1, 0.7, 3.0, 1e-9]
    total = sum(Fraction(w) for w in weights)
    assert normalize_weights(weights, 4) == [float(Fraction(w) / total) for w in weights]


def test_sample_counts_beyond_the_float_range_are_refused():
    with pytest.raises(ValueError, match="weights must be finite numbers"):
        normalize_weights([10**400, 1], 2)
    with pytest.raises(ValueError, match="must not sum to zero"):
        normalize_weights([0.0, 0.0], 2)


@pytest.mark.parametrize("extreme", ["1e308,1e308", "1e-320,1e-320"])
def test_extreme_weights_through_the_cli_equal_uniform_weights(work, extreme):
    result = runner.invoke(app, ["merge", "alice", "bob", "--weights", extreme, "-o", "extreme"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["merge", "alice", "bob", "-o", "uniform"]).exit_code == 0
    assert (work / "extreme" / WEIGHTS).read_bytes() == (work / "uniform" / WEIGHTS).read_bytes()


# -- rich markup in user text -----------------------------------------------------------------------


def test_markup_in_names_and_folders_prints_literally(work):
    """Folders (hence sources and outputs) named like markup: an unbalanced [/] used to crash after writing."""
    sources = {"alice": "[/]alice", "bob": "[bold]x"}
    for name, source in sources.items():
        shutil.copytree(work / name, work / source)
    output = "[red]out[/red]"
    result = runner.invoke(app, ["aggregate", f"alice={sources['alice']}", f"bob={sources['bob']}", "-o", output])
    assert result.exit_code == 0, result.output
    assert (work / output / "alice" / WEIGHTS).is_file() and (work / output / "bob" / WEIGHTS).is_file()
    for text in (*sources.values(), output):
        assert text in result.stderr, result.stderr  # literal, not styled away
    result = runner.invoke(app, ["merge", f"a={sources['alice']}", f"b={sources['bob']}", "-o", ":smile:[/]"])
    assert result.exit_code == 0, result.output
    assert "merged adapter: :smile:[/]" in result.stderr


def test_markup_in_config_and_module_names_prints_literally(work):
    """inspect shows base_model_name_or_path and target_modules from the config, module names from the keys."""
    folder = work / "alice"
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "[/]org/[bold]model"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(str(folder / WEIGHTS))
    renamed = {key.replace("layers.0.self_attn.q_proj", "layers.0.self_attn.[/]q_proj"): t for key, t in tensors.items()}
    save_file(renamed, str(folder / WEIGHTS))
    result = runner.invoke(app, ["inspect", "alice", "--spectrum", "2"])
    assert result.exit_code == 0, result.output
    assert "[/]org/[bold]model" in result.stderr
    assert "model.layers.0.self_attn.[/]q_proj" in result.stderr


def test_progress_descriptions_are_not_markup(monkeypatch, capsys):
    """Module names go into the progress bar's description, which rich renders as markup."""
    from flexlora_cli.cli.output import progress_bar

    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: treat stderr as a terminal, so the bar is drawn
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    with progress_bar("merging", True) as hook:
        assert hook is not None
        hook(1, 2, "layers.0.[/]q_proj")
        hook(2, 2, "layers.0.[bold]v_proj")
    err = capsys.readouterr().err
    assert "layers.0.[bold]v_proj" in err


# -- the Hub: credentials in HF_ENDPOINT, pushing when it cannot work -------------------------------


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The loopback Hub, reached through an HF_ENDPOINT that carries user:password credentials."""
    from huggingface_hub import constants

    with HubServer(token=TOKEN) as server:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest's offline mode, read at import
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_ENDPOINT", server.url.replace("://", f"://flexuser:{SECRET}@"))
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
        yield server


def assert_no_secret(result) -> None:
    for text in (result.output, result.stdout, result.stderr):
        assert SECRET not in text and "flexuser" not in text, text


def poison_bob(work: Path) -> None:
    """A NaN that is found only when bob's tensors are read: an error about it means the work had started."""
    tensors = load_file(str(work / "bob" / WEIGHTS))
    tensors[Q0_A][0, 0] = float("nan")
    save_file(tensors, str(work / "bob" / WEIGHTS))


def test_endpoint_credentials_never_appear_in_read_errors(hub, work):
    result = runner.invoke(app, ["inspect", "org/missing"])
    assert f" on {hub.url} " in one_error_line(result)  # the endpoint, shown without its credentials
    assert_no_secret(result)


def test_endpoint_credentials_never_appear_in_push_errors(hub, work, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    result = runner.invoke(app, ["merge", "alice", "bob", "-o", "out", "--push-to-hub", "org/new"])
    line = one_error_line(result)
    assert "not authorized to push to org/new on " + hub.url in line
    assert_no_secret(result)
    assert not (work / "out").exists()


def test_unreachable_endpoint_with_credentials(work, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with HubServer() as server:
        closed = server.url  # a port nothing listens on once the server has stopped
    monkeypatch.setenv("HF_ENDPOINT", closed.replace("://", f"://flexuser:{SECRET}@"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    read = runner.invoke(app, ["inspect", "org/fed"])
    assert f"cannot reach {closed}" in one_error_line(read)
    assert_no_secret(read)
    poison_bob(work)
    push = runner.invoke(app, ["merge", "alice", "bob", "-o", "out", "--push-to-hub", "org/fed"])
    assert f"cannot reach {closed}" in one_error_line(push)  # not the NaN: refused before any tensor was read
    assert_no_secret(push)
    assert not (work / "out").exists()


def test_push_while_offline_is_refused_before_any_work(work):
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # conftest's setting
    poison_bob(work)
    result = runner.invoke(app, ["merge", "alice", "bob", "-o", "out", "--push-to-hub", "org/fed"])
    assert one_error_line(result) == (
        "Error: --push-to-hub: cannot push while HF_HUB_OFFLINE is set (hint: unset HF_HUB_OFFLINE, or push the output later)"
    )
    assert sorted(p.name for p in work.iterdir()) == ["alice", "bob"]  # no output, no staging sibling


def test_push_with_a_refused_token_fails_before_any_work(hub, work, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    poison_bob(work)
    line = one_error_line(runner.invoke(app, ["aggregate", "alice", "bob", "-o", "out", "--push-to-hub", "org/c-{name}"]))
    assert "not authorized to push to org/c-{name}" in line and "the token was refused (HTTP 401)" in line
    assert not any(r.method == "POST" for r in hub.requests)  # nothing was created or committed


def test_push_with_a_read_only_token_fails_before_any_work(work, tmp_path, monkeypatch):
    from huggingface_hub import constants

    with HubServer(token=TOKEN, token_role="read") as server:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        poison_bob(work)
        line = one_error_line(runner.invoke(app, ["merge", "alice", "bob", "-o", "out", "--push-to-hub", "org/fed"]))
        assert "the token is read-only" in line and "write access" in line
        assert [r.path for r in server.requests] == ["/api/whoami-v2"]  # one cheap request, then nothing


def test_push_checks_the_token_given_with_the_option(hub, work, monkeypatch):
    """--token, not only HF_TOKEN, is what the early check sends."""
    monkeypatch.delenv("HF_TOKEN")
    poison_bob(work)
    line = one_error_line(runner.invoke(app, ["merge", "alice", "bob", "-o", "out", "--push-to-hub", "org/fed", "--token", "hf_wrong"]))
    assert "the token was refused (HTTP 401)" in line


def test_library_error_texts_lose_endpoint_credentials(monkeypatch):
    """A library's message quoting the URL (user:secret@ included) is shown without the credentials."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    from flexlora_cli.adapters import hub

    endpoint = f"https://flexuser:{SECRET}@hub.example"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    url = f"{endpoint}/api/models/org/fed/commit/main"
    error = HfHubHTTPError(f"500 Server Error: boom for url: {url}", response=httpx2.Response(500, request=httpx2.Request("POST", url)))
    message = hub._as_flexlora_error(error, "org/fed", hub.HubRef("org/fed"), hub.settings(), action="push to").message
    assert "https://hub.example/api/models/org/fed/commit/main" in message and "HTTP 500" in message
    assert SECRET not in message and "flexuser" not in message
    assert hub.public_url(f"http://{SECRET}@h/x and https://u:p@h:1/y") == "http://h/x and https://h:1/y"
