"""A small Hugging Face Hub-compatible HTTP server on 127.0.0.1, for tests that must run the real client.

It serves exactly the endpoints that huggingface_hub 2.4 calls to create a repo, create a branch,
validate a README, ask for upload modes (preupload), commit (NDJSON), resolve a revision, list a
tree, and HEAD/GET a file (with the X-Repo-Commit and ETag headers `hf_hub_download` requires), and
whoami-v2 (which flexlora asks before computing anything it will push), answering with `token_role`.
Every file is a regular git blob: preupload never answers "lfs", so no LFS/Xet storage is needed.

Repos live in memory as git-like commits; every request is recorded in `requests` so that a test
can prove a push really reached the server. With `token=...`, writes and private or gated repos need
`Authorization: Bearer <token>`, answered with the same status codes and X-Error-Code headers as the Hub.

    with HubServer(token="secret") as hub:
        os.environ["HF_ENDPOINT"] = hub.url
        ...
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

_INITIAL_FILES = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}


def git_blob_id(content: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    oid: str
    files: dict[str, bytes]
    message: str
    parent: str | None


@dataclass
class Repo:
    repo_id: str
    repo_type: str = "model"
    private: bool = False
    gated: bool = False
    refs: dict[str, str] = field(default_factory=dict)  # branch or refs/pr/N -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        oid = self.refs.get(revision, revision)
        return self.commits.get(oid)


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes


class HubServer:
    """The fake Hub; a context manager that serves on an ephemeral port and stops on exit."""

    def __init__(self, token: str | None = None, token_role: str = "write"):
        self.token = token
        self.token_role = token_role  # what whoami-v2 says the token may do: "write", "read" or "fineGrained"
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[Request] = []
        self._counter = itertools.count(1)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # -- state helpers for tests -------------------------------------------------------------

    def create_repo(self, repo_id: str, repo_type: str = "model", *, private: bool = False, gated: bool = False) -> Repo:
        with self._lock:
            repo = Repo(repo_id, repo_type, private, gated)
            self.repos[(repo_type, repo_id)] = repo
            self._commit(repo, "main", dict(_INITIAL_FILES), "initial commit")
            return repo

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        commit = self.repos[(repo_type, repo_id)].resolve(revision)
        return dict(commit.files)

    def commits_to(self, repo_id: str, repo_type: str = "model") -> list[Request]:
        """The commit requests the server received for a repo."""
        return [r for r in self.requests if r.method == "POST" and f"/api/{repo_type}s/{repo_id}/commit/" in r.path]

    def _commit(self, repo: Repo, ref: str, files: dict[str, bytes], message: str) -> Commit:
        parent = repo.refs.get(ref)
        seed = f"{repo.repo_id}|{parent}|{message}|{next(self._counter)}|" + "|".join(
            f"{path}:{git_blob_id(content)}" for path, content in sorted(files.items())
        )
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), files, message, parent)
        repo.commits[commit.oid] = commit
        repo.refs[ref] = commit.oid
        return commit


class _Reply(Exception):
    """An HTTP error answer, with the Hub's error headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, body: dict | None = None):
        self.status, self.message, self.headers = status, message, headers or {}
        self.body = body or {"error": message}


def _handler_for(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output clean
            pass

        def do_HEAD(self):
            self._serve("HEAD")

        def do_GET(self):
            self._serve("GET")

        def do_POST(self):
            self._serve("POST")

        def _serve(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            hub.requests.append(Request(method, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            try:
                status, headers, payload = self._route(method, body)
            except _Reply as reply:
                status, headers = reply.status, {"X-Error-Message": reply.message, **reply.headers}
                payload = json.dumps(reply.body).encode()
                headers.setdefault("Content-Type", "application/json")
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(payload)

        # -- routing --------------------------------------------------------------------

        def _route(self, method: str, body: bytes):
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            parts = url.path.strip("/").split("/")  # still percent-encoded: revisions may hold %2F
            if method == "POST" and url.path == "/api/repos/create":
                return self._create_repo(json.loads(body))
            if method == "POST" and url.path == "/api/validate-yaml":
                return _json({"errors": [], "warnings": []})
            if method == "GET" and url.path == "/api/whoami-v2":
                return self._whoami()
            if parts[0] == "api" and len(parts) >= 4 and parts[1] in ("models", "datasets"):
                repo_type, repo_id, rest = parts[1][:-1], f"{parts[2]}/{parts[3]}", parts[4:]
                write = method == "POST"
                repo = self._repo(repo_type, repo_id, write=write)
                action, args = (rest[0], [unquote(p) for p in rest[1:]]) if rest else ("", [])
                if method == "GET" and action in ("", "revision"):
                    return self._info(repo, args[0] if args else "main")
                if method == "GET" and action == "tree":
                    return self._tree(repo, args[0], "/".join(args[1:]), query.get("recursive", [""])[0].lower() == "true")
                if write and action == "preupload":
                    return self._preupload(repo, args[0], json.loads(body))
                if write and action == "commit":
                    return self._apply_commit(repo, args[0], body, query.get("create_pr") == ["1"])
                if write and action == "branch":
                    return self._create_branch(repo, args[0], json.loads(body or b"{}"))
            if method in ("GET", "HEAD") and "resolve" in parts:
                at = parts.index("resolve")
                prefix, repo_path = (parts[0][:-1], parts[1:at]) if parts[0] == "datasets" else ("model", parts[:at])
                repo = self._repo(prefix, "/".join(repo_path), write=False)
                return self._resolve(repo, unquote(parts[at + 1]), unquote("/".join(parts[at + 2 :])))
            raise _Reply(404, f"no such endpoint: {method} {url.path}")

        def _authorized(self) -> bool:
            return hub.token is None or self.headers.get("Authorization") == f"Bearer {hub.token}"

        def _repo(self, repo_type: str, repo_id: str, write: bool) -> Repo:
            if hub.token is not None and self.headers.get("Authorization") and not self._authorized():
                raise _Reply(401, "Invalid credentials in Authorization header")
            repo = hub.repos.get((repo_type, repo_id))
            hidden = repo is None or ((repo.private or write) and not self._authorized())
            if hidden:  # the Hub answers 401 for missing and for private repos alike
                raise _Reply(401 if hub.token else 404, "Repository not found", {"X-Error-Code": "RepoNotFound"})
            if repo.gated and not self._authorized():
                raise _Reply(403, "Access to this gated repo is restricted", {"X-Error-Code": "GatedRepo"})
            return repo

        def _commit_at(self, repo: Repo, revision: str) -> Commit:
            commit = repo.resolve(revision)
            if commit is None:
                raise _Reply(404, "Invalid rev id: " + revision, {"X-Error-Code": "RevisionNotFound"})
            return commit

        # -- endpoints -----------------------------------------------------------------

        def _create_repo(self, payload: dict):
            if not hub.token or not self._authorized():
                raise _Reply(401, "Invalid credentials in Authorization header")
            repo_type = payload.get("type") or "model"
            repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
            prefix = "" if repo_type == "model" else f"{repo_type}s/"
            url = f"{hub.url}/{prefix}{repo_id}"
            if (repo_type, repo_id) in hub.repos:
                message = "You already created this model repo"
                raise _Reply(409, message, body={"error": message, "url": url})  # the client reads "url"
            hub.create_repo(repo_id, repo_type, private=payload.get("visibility") == "private")
            return _json({"url": url, "name": repo_id})

        def _whoami(self):
            if not self.headers.get("Authorization") or not hub.token or not self._authorized():
                raise _Reply(401, "Invalid credentials in Authorization header")
            return _json(
                {"type": "user", "name": "tester", "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": hub.token_role}}}
            )

        def _create_branch(self, repo: Repo, branch: str, payload: dict):
            if branch in repo.refs:
                raise _Reply(409, "Reference already exists")
            start = self._commit_at(repo, payload.get("startingPoint") or "main")
            with hub._lock:
                repo.refs[branch] = start.oid
            return _json({})

        def _info(self, repo: Repo, revision: str):
            commit = self._commit_at(repo, revision)
            return _json(
                {"id": repo.repo_id, "sha": commit.oid, "private": repo.private, "gated": "manual" if repo.gated else False,
                 "siblings": [{"rfilename": path} for path in sorted(commit.files)]}
            )

        def _tree(self, repo: Repo, revision: str, folder: str, recursive: bool):
            commit = self._commit_at(repo, revision)
            prefix = f"{folder}/" if folder else ""
            entries, folders = [], set()
            for path, content in sorted(commit.files.items()):
                if not path.startswith(prefix):
                    continue
                inner = path[len(prefix) :]
                if "/" in inner and not recursive:
                    folders.add(prefix + inner.split("/")[0])
                    continue
                entries.append({"type": "file", "path": path, "size": len(content), "oid": git_blob_id(content)})
            if not entries and not folders and folder:
                raise _Reply(404, "Entry not found", {"X-Error-Code": "EntryNotFound"})
            entries += [{"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest()} for path in sorted(folders)]
            return _json(entries)

        def _preupload(self, repo: Repo, revision: str, payload: dict):
            existing = repo.resolve(revision)
            files = existing.files if existing else {}
            return _json(
                {"files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                     "oid": git_blob_id(files[f["path"]]) if f["path"] in files else None}
                    for f in payload["files"]
                ]}
            )

        def _apply_commit(self, repo: Repo, revision: str, body: bytes, create_pr: bool):
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            if not lines or lines[0].get("key") != "header":
                raise _Reply(400, "commit payload must start with a header line")
            base = self._commit_at(repo, revision)
            files = dict(base.files)
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    files = {p: c for p, c in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
                else:  # lfsFile / copy: never requested, since preupload answers "regular"
                    raise _Reply(400, f"unsupported commit operation {key!r}")
            with hub._lock:
                if create_pr:
                    number = 1 + sum(ref.startswith("refs/pr/") for ref in repo.refs)
                    ref = f"refs/pr/{number}"
                    repo.refs[ref] = base.oid
                else:
                    ref = revision
                commit = hub._commit(repo, ref, files, lines[0]["value"]["summary"])
            url = f"{hub.url}/{repo.repo_id}"
            return _json(
                {"success": True, "commitOid": commit.oid, "commitUrl": f"{url}/commit/{commit.oid}",
                 "pullRequestUrl": f"{url}/discussions/{ref.rsplit('/', 1)[-1]}" if create_pr else None}
            )

        def _resolve(self, repo: Repo, revision: str, path: str):
            commit = self._commit_at(repo, revision)
            if path not in commit.files:
                raise _Reply(404, "Entry not found", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit.oid})
            content = commit.files[path]
            headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{git_blob_id(content)}"', "Content-Type": "application/octet-stream"}
            return 200, headers, content

    return Handler


def _json(data) -> tuple[int, dict[str, str], bytes]:
    return 200, {"Content-Type": "application/json"}, json.dumps(data).encode()
