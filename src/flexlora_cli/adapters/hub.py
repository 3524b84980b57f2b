"""The Hugging Face Hub as a place adapters come from and go to. huggingface_hub does all the HTTP.

What counts as a Hub reference (a path that exists locally always means the local folder):

    hf://org/name[@revision][/sub/folder]    huggingface_hub's own HF URI grammar (also hf://datasets/...)
    org/name   or   org/name@revision          shorthand for the root of a model repo

Revisions are branches, tags, commit hashes or refs/pr/N. The environment is read at call time:
HF_TOKEN (or the saved `hf auth login`), HF_ENDPOINT, HF_HUB_OFFLINE, HF_HOME / HF_HUB_CACHE.
A token is sent to the endpoint and nowhere else: never printed, logged, or written to any output; nor are
credentials written into HF_ENDPOINT (https://user:secret@host), which messages show as https://host.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import string
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from flexlora_cli.adapters.files import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

from flexlora_cli.adapters.write import MODEL_CARD_NAME
from flexlora_cli.errors import AdapterError, FlexLoraError, OptionError, OutputError

HF_URI_PREFIX = "hf://"
ADAPTER_FILES = (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)
PUSHED_FILES = (*ADAPTER_FILES, MODEL_CARD_NAME)
_SHORTHAND = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[^\s@]+)?$")
_COMMIT_HASH = re.compile(r"^[0-9a-f]{40}$")
_TOKEN_HINT = "set HF_TOKEN (or pass --token) to a token with access to it"
_WRITE_HINT = "set HF_TOKEN (or pass --token) to a token with write access"
_USERINFO = re.compile(r"(?<=://)[^/\s@]*@")  # user:secret@ in a URL

# The token given with --token, for every Hub read in the current command (None: HF_TOKEN / saved login).
_token: contextvars.ContextVar[str | None] = contextvars.ContextVar("flexlora_hub_token", default=None)


@contextlib.contextmanager
def use_token(token: str | None) -> Iterator[None]:
    """Use this token for the Hub downloads inside the block (the CLI's --token)."""
    reset = _token.set(token or None)
    try:
        yield
    finally:
        _token.reset(reset)


@dataclass(frozen=True)
class HubRef:
    """A folder in a Hub repo at a revision."""

    repo_id: str
    revision: str | None = None
    subfolder: str = ""
    repo_type: str = "model"

    @property
    def name(self) -> str:
        """The default client name: the subfolder's last part, else the repo's name."""
        return (self.subfolder or self.repo_id).rstrip("/").rsplit("/", 1)[-1]

    def __str__(self) -> str:
        prefix = "" if self.repo_type == "model" else f"{self.repo_type}s/"
        text = prefix + self.repo_id + (f"@{self.revision}" if self.revision else "")
        return text + (f"/{self.subfolder}" if self.subfolder else "")


def parse_ref(text: str) -> HubRef | None:
    """The Hub reference `text` names, or None if it does not look like one. Local paths are the caller's check."""
    if text.startswith(HF_URI_PREFIX):
        uri = text
    elif _SHORTHAND.match(text):
        uri = HF_URI_PREFIX + text
    else:
        return None
    from huggingface_hub import parse_hf_uri
    from huggingface_hub.errors import HfUriError

    try:
        parsed = parse_hf_uri(uri)
    except HfUriError as error:
        raise AdapterError(text, f"not a valid Hub reference: {_first_line(error)}") from None
    if parsed.type not in ("model", "dataset"):
        raise AdapterError(text, f"adapters are read from model or dataset repos, not a {parsed.type}")
    return HubRef(parsed.id, parsed.revision, parsed.path_in_repo.strip("/"), parsed.type)


@dataclass(frozen=True)
class HubSettings:
    """The Hub client's environment, read when a command runs (not when huggingface_hub was imported)."""

    endpoint: str
    cache_dir: str
    offline: bool
    token: str | None = field(repr=False)  # None: huggingface_hub finds HF_TOKEN or the saved login

    @property
    def public_endpoint(self) -> str:
        """The endpoint as messages show it: without credentials."""
        return public_url(self.endpoint)


def public_url(url: str) -> str:
    """`url` (or any text holding URLs) without the user:secret@ part."""
    return _USERINFO.sub("", url)


def settings(token: str | None = None) -> HubSettings:
    from huggingface_hub import constants

    env = os.environ
    home = env.get("HF_HOME")
    cache = env.get("HF_HUB_CACHE") or (os.path.join(os.path.expanduser(home), "hub") if home else constants.HF_HUB_CACHE)
    offline = constants.is_offline_mode() or env.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return HubSettings(
        endpoint=(env.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/"),
        cache_dir=os.path.expanduser(cache),
        offline=offline,
        token=token or _token.get(),
    )


def download(ref: HubRef, spec: str) -> tuple[Path, dict]:
    """Fetch only the adapter files of `ref` (or find them in the cache); return the folder and provenance.

    Raises AdapterError with one line for every way this can fail (not found, revision, auth, offline).
    """
    from huggingface_hub import snapshot_download

    hub = settings()
    prefix = f"{ref.subfolder}/" if ref.subfolder else ""
    try:
        snapshot = snapshot_download(
            ref.repo_id,
            repo_type=ref.repo_type,
            revision=ref.revision,
            allow_patterns=[prefix + name for name in ADAPTER_FILES],
            cache_dir=hub.cache_dir,
            endpoint=hub.endpoint,
            token=hub.token,
            local_files_only=hub.offline,
            tqdm_class=None if sys.stderr.isatty() else _silent_bar(),
        )
    except Exception as error:
        raise _as_flexlora_error(error, spec, ref, hub, action="read") from None
    folder = Path(snapshot) / ref.subfolder if ref.subfolder else Path(snapshot)
    if not (folder / CONFIG_NAME).is_file():
        where = f"in folder {ref.subfolder!r} " if ref.subfolder else ""
        raise AdapterError(spec, f"no adapter files ({CONFIG_NAME}) {where}of {ref.repo_id} at {ref.revision or 'main'}")
    commit = Path(snapshot).name
    provenance = {
        "repo_id": ref.repo_id,
        "repo_type": ref.repo_type,
        "revision": ref.revision or "main",
        "commit": commit if _COMMIT_HASH.match(commit) else None,
        "subfolder": ref.subfolder or None,
    }
    return folder, provenance


def _silent_bar():
    """huggingface_hub's progress bar, off: bars are for terminals, not for logs, pipes and tests."""
    from huggingface_hub.utils.tqdm import tqdm

    class SilentBar(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})

    return SilentBar


@dataclass(frozen=True)
class PushItem:
    """One written adapter folder to upload: `subfolder` in a shared repo, `fields` for a repo template."""

    folder: Path
    subfolder: str
    fields: dict[str, str]


def check_target(target: str, fields: Sequence[str], revision: str | None, create_pr: bool, token: str | None = None) -> None:
    """Refuse a --push-to-hub target and options that cannot work, before any computation.

    Checks the target's syntax, then HF_HUB_OFFLINE, then asks the endpoint once whether it is reachable
    and accepts the token (`token`, else --token's context, HF_TOKEN or the saved login) for writing.
    """
    names = _template_fields(target)
    unknown = sorted(names - set(fields))
    if unknown:
        allowed = ", ".join("{" + f + "}" for f in fields) or "none for this command"
        raise OptionError("--push-to-hub", f"unknown placeholder {{{unknown[0]}}} in {target!r}; placeholders: {allowed}")
    try:
        ref = parse_ref(target.format(**{name: "x" for name in names}))
    except AdapterError as error:
        raise OptionError("--push-to-hub", error.problem) from None
    if ref is None:
        raise OptionError("--push-to-hub", f"expected a repo id like org/name (or hf://org/name@branch/folder), got {target!r}")
    if ref.revision and revision and ref.revision != revision:
        raise OptionError("--revision", f"{revision!r} contradicts the revision in --push-to-hub {target!r}")
    branch = ref.revision or revision
    if create_pr and branch not in (None, "main"):
        raise OptionError("--create-pr", "pull requests are opened against main; drop --revision")
    hub = settings(token)
    if hub.offline:
        raise OptionError("--push-to-hub", "cannot push while HF_HUB_OFFLINE is set", hint="unset HF_HUB_OFFLINE, or push the output later")
    _check_can_push(target, ref, hub)


def _check_can_push(target: str, ref: HubRef, hub: HubSettings) -> None:
    """One request (whoami) to the endpoint: is it reachable, and does it accept the token for writing?

    Without any token only reachability is checked: some endpoints take anonymous writes.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, get_session

    headers = build_hf_headers(token=hub.token)  # hub.token, else HF_TOKEN or the saved login
    authorization = headers.get("authorization") or headers.get("Authorization")
    try:
        response = get_session().get(f"{hub.endpoint}/api/whoami-v2", headers=headers, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as error:
        raise _as_flexlora_error(error, target, ref, hub, action="push to") from None
    where = hub.public_endpoint
    if authorization and response.status_code in (401, 403):
        raise OutputError(target, f"not authorized to push to {target} on {where}: the token was refused (HTTP {response.status_code})", hint=_WRITE_HINT)
    if authorization and response.status_code == 200:
        try:
            role = response.json()["auth"]["accessToken"]["role"]
        except (ValueError, KeyError, TypeError):  # an endpoint that answers differently: the push will tell
            role = None
        if role == "read":
            raise OutputError(target, f"not authorized to push to {target} on {where}: the token is read-only", hint=_WRITE_HINT)


def push(
    items: Sequence[PushItem],
    target: str,
    *,
    commit_message: str,
    commit_description: str = "",
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
) -> list[dict]:
    """Upload written adapters in one commit per repo; return one record per commit (repo, url, oid).

    A plain target (org/name, or hf://org/name@branch/folder) gets every item in its own subfolder in ONE
    commit (a single item without subfolder goes to the root); a template such as org/client-{name} gets
    each item at the root of its own repo.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    templated = bool(_template_fields(target))
    commits: dict[HubRef, list[CommitOperationAdd]] = {}
    for item in items:
        ref = parse_ref(target.format(**item.fields))
        base = ref.subfolder + "/" if ref.subfolder else ""
        inner = "" if templated or not item.subfolder else item.subfolder + "/"
        repo = HubRef(ref.repo_id, ref.revision or revision, "", ref.repo_type)
        operations = commits.setdefault(repo, [])
        for name in PUSHED_FILES:
            path_in_repo = base + inner + name
            if (item.folder / name).is_file():
                if any(op.path_in_repo == path_in_repo for op in operations):
                    raise OptionError("--push-to-hub", f"{target!r} sends two adapters to {repo}/{path_in_repo}")
                operations.append(CommitOperationAdd(path_in_repo, str(item.folder / name)))
    hub = settings(token)
    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    results = []
    for repo, operations in commits.items():
        try:
            api.create_repo(repo.repo_id, repo_type=repo.repo_type, private=private or None, exist_ok=True)
            if repo.revision not in (None, "main") and not create_pr:
                api.create_branch(repo.repo_id, branch=repo.revision, repo_type=repo.repo_type, exist_ok=True)
            info = api.create_commit(
                repo.repo_id, operations, commit_message=commit_message, commit_description=commit_description,
                repo_type=repo.repo_type, revision=repo.revision, create_pr=create_pr,
            )
        except Exception as error:
            raise _as_flexlora_error(error, str(repo), repo, hub, action="push to") from None
        commit_url, pr_url = (public_url(url) if url else url for url in (info.commit_url, info.pr_url))
        results.append(
            {
                "repo_id": repo.repo_id,
                "revision": repo.revision or "main",
                "commit": info.oid,
                "commit_url": commit_url,
                "pr_url": pr_url,
                "url": pr_url or commit_url,
                "files": [op.path_in_repo for op in operations],
            }
        )
    return results


def _template_fields(target: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(target) if name is not None}
    except ValueError as error:
        raise OptionError("--push-to-hub", f"bad template {target!r}: {error}") from None


def _as_flexlora_error(error: Exception, spec: str, ref: HubRef, hub: HubSettings, action: str) -> FlexLoraError:
    """One line for the user, never the token; anything unexpected is re-raised as the bug it is."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    kind = AdapterError if action == "read" else OutputError
    where = hub.public_endpoint
    # A shorthand that names no local folder may well be a mistyped path: say both.
    local = "no local folder of that name, and on the Hub: " if action == "read" and not spec.startswith(HF_URI_PREFIX) else ""
    if isinstance(error, GatedRepoError):
        return kind(spec, f"{local}{ref.repo_id} is gated on {where}: request access on its page", hint=_TOKEN_HINT)
    if isinstance(error, RepositoryNotFoundError):
        return kind(spec, f"{local}repository {ref.repo_id} not found on {where} (or it is private)", hint=_TOKEN_HINT)
    if isinstance(error, RevisionNotFoundError):
        return kind(spec, f"{local}revision {ref.revision!r} not found in {ref.repo_id} on {where}")
    if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        if hub.offline:
            return kind(spec, f"{local}not in the Hub cache {hub.cache_dir}, and HF_HUB_OFFLINE is set", hint="unset HF_HUB_OFFLINE to download it")
        return kind(spec, f"{local}cannot reach {where}, and the Hub cache {hub.cache_dir} does not hold it", hint="check the network or HF_ENDPOINT")
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            need = "read" if action == "read" else "write"
            return kind(spec, f"{local}not authorized to {action} {ref.repo_id} on {where} (HTTP {status})", hint=f"set HF_TOKEN (or pass --token) to a token with {need} access")
        return kind(spec, f"{local}the Hub refused to {action} {ref.repo_id}: HTTP {status} {_redact(_first_line(error), hub)}")
    if _is_connection_error(error):
        return kind(spec, f"{local}cannot reach {where} ({type(error).__name__})", hint="check the network or HF_ENDPOINT")
    if isinstance(error, ValueError) and action != "read":  # e.g. README metadata the Hub rejects
        return kind(spec, f"cannot {action} it: {_redact(_first_line(error), hub)}")
    raise error


def _is_connection_error(error: Exception) -> bool:
    import httpx2

    return isinstance(error, (httpx2.TransportError, ConnectionError))


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _redact(text: str, hub: HubSettings) -> str:
    """A library's error text without the token or HF_ENDPOINT's credentials."""
    from huggingface_hub import get_token

    text = public_url(text)
    for secret in {hub.token, get_token(), *_endpoint_secrets(hub.endpoint)} - {None, ""}:
        text = text.replace(secret, "***")
    return text


def _endpoint_secrets(endpoint: str) -> set[str]:
    """The password in HF_ENDPOINT's user:secret@ (or the user part alone, which then is the secret)."""
    parts = urlsplit(endpoint)
    secret = parts.password if parts.password is not None else parts.username
    return {secret, unquote(secret)} if secret else set()
