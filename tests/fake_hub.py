"""A small fake Hugging Face Hub on 127.0.0.1 for offline tests: model AND dataset repos, uploads and downloads.

Good enough for the real ``huggingface_hub`` 2.x client (``HfApi.create_repo``, ``upload_folder``,
``upload_file``, ``create_commit``, ``preupload_lfs_files``, ``repo_info`` / ``model_info`` / ``dataset_info``,
``list_repo_files`` / ``list_repo_tree``, ``get_paths_info``, ``file_exists``, ``hf_hub_download``,
``snapshot_download``, ``HfFileSystem``) and for what builds on it: ``datasets.DatasetDict.push_to_hub`` /
``load_dataset(repo_id)``, ``PreTrainedModel.push_to_hub``, ``PeftModel.push_to_hub`` / ``from_pretrained``,
``ModelCard.push_to_hub``, ``Trainer.push_to_hub``.

Use it through the ``fake_hub`` pytest fixture (tests/conftest.py), which sets ``HF_ENDPOINT`` to the server,
``HF_HUB_DISABLE_XET=1`` (no Xet storage protocol here), a fresh temporary ``HF_HOME`` (so no real token or
cache leaks in) and ``HF_TOKEN`` to a fake token, and reloads the endpoint constants of ``huggingface_hub`` and
``datasets`` (they read the environment at import)::

    def test_push(fake_hub):
        api = HfApi()
        api.create_repo("tester/my-adapter", private=True)             # model repo (repo_type=None)
        api.upload_folder(folder_path=out_dir, repo_id="tester/my-adapter")
        assert fake_hub.repo("tester/my-adapter").private
        files = fake_hub.files("tester/my-adapter")                    # {path: bytes} at main
        fake_hub.requests                                              # [(method, path), ...]

Protocol (read from huggingface_hub 2.4 ``hf_api.py``, ``_commit_api.py``, ``lfs.py``, ``file_download.py``):

* ``POST /api/repos/create`` (409 when it exists), ``GET /api/whoami-v2`` (user ``tester``, write token),
  ``POST /api/validate-yaml`` (README.md front matter must parse as a YAML mapping);
* ``GET /api/{models|datasets|spaces}/{id}[/revision/{rev}]``: info with ``sha``, ``private``, ``siblings``;
* ``POST /api/{type}s/{id}/preupload/{rev}``: ``lfs`` for ``*.parquet``, ``*.safetensors``, ``*.bin``, ``*.pt``,
  ``*.png`` and files >= 1 MB, else ``regular``;
* LFS: ``POST /{prefix}{id}.git/info/lfs/objects/batch`` (``basic`` transfer), upload ``PUT /__lfs/{oid}``
  (sha256 checked), objects already stored get no upload action;
* ``POST /api/{type}s/{id}/commit/{rev}`` (ndjson: header with ``parentCommit`` -> 412 when stale, ``file``
  base64, ``lfsFile`` by oid, ``deletedFile``, ``deletedFolder``); a new commit snapshot per call;
* ``GET /api/{type}s/{id}/tree/{rev}[/{path}]`` (``recursive``), ``POST .../paths-info/{rev}``,
  ``GET .../refs``, ``POST .../branch/{name}`` (create_branch);
* ``HEAD|GET /{prefix}{id}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag``, ``X-Linked-Etag`` /
  ``X-Linked-Size`` for LFS files, and ``Range`` requests (206).

Not modelled: pull requests (``create_pr``), Xet, gated repos, tags, discussions, Spaces runtime. Any other
route answers 404 and is listed in ``fake_hub.unknown`` so a test can show what a client needed.
Private repos answer 401 without a token (as the Hub does for private repos). Storage is in memory; call
:meth:`FakeHub.dump` to write a repo's files to a folder for inspection.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from ctiqa.testing.loopback import LoopbackServer

USER = "tester"
TOKEN = "hf_fake_token_for_tests"
_LFS_SUFFIXES = (".parquet", ".safetensors", ".bin", ".pt", ".png", ".jpg", ".arrow", ".gguf")
_LFS_MIN_BYTES = 1_000_000
_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


def git_blob_oid(data: bytes) -> str:
    """git's blob id: sha1 of ``b"blob <len>\\0" + data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class StoredFile:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else git_blob_oid(self.data)


@dataclass
class Commit:
    oid: str
    title: str
    files: dict[str, StoredFile]
    date: str


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    commits: list[Commit] = field(default_factory=list)
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit oid

    def resolve(self, rev: str) -> Commit | None:
        rev = unquote(rev)
        oid = self.branches.get(rev, rev)
        for c in self.commits:
            if c.oid == oid:
                return c
        return None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class FakeHub(LoopbackServer):
    """The server. ``url``, ``repos``, ``requests`` (method, path), ``unknown`` (unmatched routes), helpers
    :meth:`repo`, :meth:`files`, :meth:`dump`."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.unknown: list[tuple[str, str]] = []
        self.auth_seen: list[bool] = []
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ inspection API

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        """The stored repo (KeyError if absent). ``repo_type``: ``model`` | ``dataset`` | ``space``."""
        return self.repos[(repo_type, repo_id)]

    def files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> dict[str, bytes]:
        """``{path: bytes}`` of a repo at ``revision``."""
        commit = self.repo(repo_id, repo_type).resolve(revision)
        return {} if commit is None else {p: f.data for p, f in commit.files.items()}

    def dump(self, repo_id: str, folder: str | Path, repo_type: str = "model", revision: str = "main") -> Path:
        """Write the files of a repo to ``folder`` and return it."""
        folder = Path(folder)
        for path, data in self.files(repo_id, repo_type, revision).items():
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_bytes(data)
        return folder

    # ------------------------------------------------------------------ server

    # ------------------------------------------------------------------ HTTP plumbing
    @staticmethod
    def _send(h: BaseHTTPRequestHandler, code: int, body: Any = None, headers: dict[str, str] | None = None,
              raw: bytes | None = None) -> None:
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        h.send_response(code)
        if raw is None:
            h.send_header("Content-Type", "application/json")
        hdrs = dict(headers or {})
        length = hdrs.pop("Content-Length", None)
        h.send_header("Content-Length", str(length if length is not None else len(data)))
        for k, v in hdrs.items():
            h.send_header(k, v)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    def _error(self, h: BaseHTTPRequestHandler, code: int, msg: str) -> None:
        self._send(h, code, {"error": msg}, {"X-Error-Message": msg.replace("\n", " ")[:200]})

    def dispatch(self, h: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(h.path)
        path, query = unquote(parts.path), parse_qs(parts.query)
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        authed = h.headers.get("authorization") == f"Bearer {TOKEN}"
        with self._lock:
            self.requests.append((h.command, path))
            self.auth_seen.append(authed)
        try:
            self._route(h, path, query, body, authed)
        except Exception as e:  # noqa: BLE001 - a fake server answers 500 like a real one
            self._error(h, 500, f"fake hub error: {type(e).__name__}: {e}")

    def _repo_or_error(self, h: BaseHTTPRequestHandler, rtype: str, rid: str, authed: bool) -> Repo | None:
        repo = self.repos.get((rtype, rid))
        if repo is None or (repo.private and not authed):
            self._send(h, 401 if not authed else 404, {"error": "Repository not found"},
                       {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
            return None
        return repo

    def _route(self, h: BaseHTTPRequestHandler, path: str, query: dict, body: bytes, authed: bool) -> None:
        cmd = h.command
        if path == "/api/whoami-v2":
            if not authed:
                return self._error(h, 401, "Invalid credentials in Authorization header")
            return self._send(h, 200, {"type": "user", "name": USER, "fullname": "Test User", "orgs": [],
                                       "auth": {"type": "access_token",
                                                "accessToken": {"displayName": "fake", "role": "write"}}})
        if path == "/api/agent-harnesses":  # huggingface_hub's user-agent registry: an empty one
            return self._send(h, 200, {"standardEnvVars": [], "harnesses": {}})
        if path == "/api/validate-yaml" and cmd == "POST":
            return self._validate_yaml(h, json.loads(body or b"{}"))
        if path == "/api/repos/create" and cmd == "POST":
            return self._create_repo(h, json.loads(body or b"{}"), authed)
        if path.startswith("/__lfs/") and cmd == "PUT":
            oid = path.rsplit("/", 1)[1]
            if hashlib.sha256(body).hexdigest() != oid:
                return self._error(h, 400, "sha256 mismatch")
            with self._lock:
                self.lfs[oid] = body
            return self._send(h, 200, {})
        m = re.match(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+?)\.git/info/lfs/objects/batch$", path)
        if m and cmd == "POST":
            return self._lfs_batch(h, json.loads(body), authed, m)
        m = re.match(r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/(.*))?$", path)
        if m:
            return self._api(h, _TYPES[m.group(1)], m.group(2), m.group(3) or "", query, body, authed)
        m = re.match(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if m and cmd in ("GET", "HEAD"):
            rtype = {"datasets": "dataset", "spaces": "space"}.get(m.group(1) or "", "model")
            return self._resolve(h, rtype, m.group(2), m.group(3), m.group(4), authed)
        with self._lock:
            self.unknown.append((cmd, path))
        return self._error(h, 404, f"fake hub: no route for {cmd} {path}")

    # ------------------------------------------------------------------ endpoints
    def _validate_yaml(self, h: BaseHTTPRequestHandler, payload: dict) -> None:
        """README.md front matter must be a YAML mapping (the Hub checks much more; this catches broken YAML)."""
        import yaml

        m = re.match(r"^---\s*\n(.*?)\n---\s*(?:\n|$)", payload.get("content", ""), flags=re.DOTALL)
        try:
            meta = yaml.safe_load(m.group(1)) if m else {}
            if meta is not None and not isinstance(meta, dict):
                raise ValueError("the metadata is not a mapping")
        except (yaml.YAMLError, ValueError) as e:
            return self._send(h, 400, {"errors": [{"message": f"Invalid YAML: {e}"}], "warnings": []})
        return self._send(h, 200, {"errors": [], "warnings": []})

    def _create_repo(self, h: BaseHTTPRequestHandler, payload: dict, authed: bool) -> None:
        if not authed:
            return self._error(h, 401, "Invalid credentials in Authorization header")
        rtype = payload.get("type") or "model"
        rid = f"{payload.get('organization') or USER}/{payload['name']}"
        url = f"{self.url}/{_PREFIX[rtype]}{rid}"
        with self._lock:
            if (rtype, rid) in self.repos:
                return self._send(h, 409, {"error": "You already created this repo", "url": url})
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            repo = Repo(rtype, rid, private)
            first = Commit(uuid.uuid4().hex + uuid.uuid4().hex[:8], "initial commit",
                           {".gitattributes": StoredFile(b"*.parquet filter=lfs diff=lfs merge=lfs -text\n", False)},
                           _now())
            repo.commits.append(first)
            repo.branches["main"] = first.oid
            self.repos[(rtype, rid)] = repo
        return self._send(h, 200, {"url": url, "name": rid, "id": rid})

    def _lfs_batch(self, h: BaseHTTPRequestHandler, payload: dict, authed: bool, m: re.Match) -> None:
        rtype = {"datasets": "dataset", "spaces": "space"}.get(m.group(1) or "", "model")
        if self._repo_or_error(h, rtype, m.group(2), authed) is None:
            return None
        objects = []
        for obj in payload.get("objects", []):
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.lfs:
                entry["actions"] = {"upload": {"href": f"{self.url}/__lfs/{obj['oid']}"}}
            objects.append(entry)
        return self._send(h, 200, {"transfer": "basic", "objects": objects},
                          {"Content-Type": "application/vnd.git-lfs+json"})

    def _entry(self, path: str, f: StoredFile, commit: Commit) -> dict[str, Any]:
        e: dict[str, Any] = {"type": "file", "oid": git_blob_oid(f.data), "size": len(f.data), "path": path,
                             "lastCommit": {"id": commit.oid, "title": commit.title, "date": commit.date}}
        if f.lfs:
            e["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": 134}
        return e

    @staticmethod
    def _dir_entry(path: str, commit: Commit) -> dict[str, Any]:
        return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path,
                "lastCommit": {"id": commit.oid, "title": commit.title, "date": commit.date}}

    def _info(self, repo: Repo, commit: Commit) -> dict[str, Any]:
        return {"_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
                "author": repo.repo_id.split("/")[0], "sha": commit.oid, "private": repo.private,
                "gated": False, "disabled": False, "lastModified": commit.date, "createdAt": repo.commits[0].date,
                "tags": [], "downloads": 0, "likes": 0,
                "siblings": [{"rfilename": p, "size": len(f.data), "blobId": git_blob_oid(f.data),
                              **({"lfs": {"sha256": f.sha256, "size": len(f.data), "pointerSize": 134}}
                                 if f.lfs else {})} for p, f in sorted(commit.files.items())]}

    def _api(self, h: BaseHTTPRequestHandler, rtype: str, rid: str, rest: str, query: dict, body: bytes,
             authed: bool) -> None:
        cmd = h.command
        repo = self._repo_or_error(h, rtype, rid, authed)
        if repo is None:
            return None
        m = re.match(r"^(?:revision/(.+))?$", rest)
        if m and cmd == "GET":
            commit = repo.resolve(m.group(1) or "main")
            if commit is None:
                return self._send(h, 404, {"error": "Revision not found"}, {"X-Error-Code": "RevisionNotFound"})
            return self._send(h, 200, self._info(repo, commit))
        m = re.match(r"^(preupload|commit|tree|paths-info|refs|branch)(?:/([^/]+))?(?:/(.*))?$", rest)
        if not m:
            with self._lock:
                self.unknown.append((cmd, f"/api/{rtype}s/{rid}/{rest}"))
            return self._error(h, 404, f"fake hub: no route for {cmd} {rest}")
        kind, rev, sub = m.group(1), unquote(m.group(2) or "main"), m.group(3) or ""
        if kind == "refs":
            return self._send(h, 200, {"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": o}
                                                    for b, o in repo.branches.items()], "converts": [], "tags": []})
        if kind == "branch" and cmd == "POST":
            if not authed:
                return self._error(h, 401, "unauthorized")
            if rev in repo.branches:
                return self._send(h, 409, {"error": "Reference already exists"})
            repo.branches[rev] = repo.branches["main"]
            return self._send(h, 200, {})
        commit = repo.resolve(rev)
        if kind in ("preupload", "commit"):
            if not authed:
                return self._error(h, 401, "unauthorized")
            if query.get("create_pr"):
                return self._error(h, 400, "fake hub: pull requests are not modelled")
            if kind == "preupload":
                files = json.loads(body)["files"]
                return self._send(h, 200, {"files": [
                    {"path": f["path"], "uploadMode": "lfs" if (f["path"].lower().endswith(_LFS_SUFFIXES)
                                                               or f["size"] >= _LFS_MIN_BYTES) else "regular",
                     "shouldIgnore": False, "oid": None} for f in files], "commitOid": commit.oid if commit else None})
            return self._commit(h, repo, rev, body)
        if commit is None:
            return self._send(h, 404, {"error": "Revision not found"}, {"X-Error-Code": "RevisionNotFound"})
        if kind == "tree":
            base = sub.strip("/")
            if base and base not in self._dirs(commit):
                return self._send(h, 404, {"error": f"{base} does not exist on {rev}"},
                                  {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"})
            recursive = (query.get("recursive") or ["false"])[0].lower() in ("1", "true")
            return self._send(h, 200, self._tree(commit, base, recursive))
        if kind == "paths-info":
            try:
                req = json.loads(body)
                paths = req.get("paths", [])
            except ValueError:
                paths = parse_qs(body.decode()).get("paths", [])
            out = []
            dirs = self._dirs(commit)
            for p in paths:
                p = p.strip("/")
                if p in commit.files:
                    out.append(self._entry(p, commit.files[p], commit))
                elif p in dirs:
                    out.append(self._dir_entry(p, commit))
            return self._send(h, 200, out)
        return self._error(h, 404, f"fake hub: no route for {cmd} {rest}")

    @staticmethod
    def _dirs(commit: Commit) -> set[str]:
        dirs = set()
        for p in commit.files:
            parts = p.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                dirs.add("/".join(parts[:i]))
        return dirs

    def _tree(self, commit: Commit, base: str, recursive: bool) -> list[dict[str, Any]]:
        prefix = f"{base}/" if base else ""
        dirs = self._dirs(commit)
        out = []
        for d in sorted(dirs):
            if d.startswith(prefix) and (recursive or "/" not in d[len(prefix):]):
                out.append(self._dir_entry(d, commit))
        for p, f in sorted(commit.files.items()):
            if p.startswith(prefix) and (recursive or "/" not in p[len(prefix):]):
                out.append(self._entry(p, f, commit))
        return out

    def _commit(self, h: BaseHTTPRequestHandler, repo: Repo, rev: str, body: bytes) -> None:
        lines = [json.loads(x) for x in body.splitlines() if x.strip()]
        header = next((x["value"] for x in lines if x["key"] == "header"), {})
        with self._lock:
            head = repo.branches.get(rev)
            if head is None:
                return self._send(h, 404, {"error": f"Invalid rev id: {rev}"}, {"X-Error-Code": "RevisionNotFound"})
            parent = header.get("parentCommit")
            if parent is not None and parent != head:
                return self._error(h, 412, "A commit has happened since. Please refresh and try again.")
            files = dict(repo.resolve(head).files)  # type: ignore[union-attr]
            for item in lines:
                key, v = item["key"], item.get("value", {})
                if key == "file":
                    files[v["path"]] = StoredFile(base64.b64decode(v["content"]), False)
                elif key == "lfsFile":
                    data = self.lfs.get(v["oid"])
                    if data is None:
                        return self._error(h, 400, f"LFS object {v['oid']} was not uploaded")
                    files[v["path"]] = StoredFile(data, True)
                elif key == "deletedFile":
                    files.pop(v["path"], None)
                elif key == "deletedFolder":
                    folder = v["path"].rstrip("/") + "/"
                    for p in [p for p in files if p.startswith(folder)]:
                        del files[p]
            commit = Commit(uuid.uuid4().hex + uuid.uuid4().hex[:8], header.get("summary", ""), files, _now())
            repo.commits.append(commit)
            repo.branches[rev] = commit.oid
        url = f"{self.url}/{_PREFIX[repo.repo_type]}{repo.repo_id}/commit/{commit.oid}"
        return self._send(h, 200, {"success": True, "commitOid": commit.oid, "commitUrl": url, "pullRequestUrl": None})

    def _resolve(self, h: BaseHTTPRequestHandler, rtype: str, rid: str, rev: str, path: str, authed: bool) -> None:
        repo = self._repo_or_error(h, rtype, rid, authed)
        if repo is None:
            return None
        commit = repo.resolve(rev)
        if commit is None:
            return self._send(h, 404, {"error": "Revision not found"}, {"X-Error-Code": "RevisionNotFound"})
        f = commit.files.get(path)
        if f is None:
            return self._send(h, 404, {"error": "Entry not found"},
                              {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit.oid})
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{f.etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if f.lfs:
            headers |= {"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(len(f.data))}
        data = f.data
        rng = h.headers.get("Range")
        m = re.match(r"bytes=(\d*)-(\d*)$", rng or "")
        if m and h.command == "GET":
            total = len(data)
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), total - 1) if m.group(2) else total - 1
            else:
                start, end = max(0, total - int(m.group(2))), total - 1
            if start >= total:
                return self._send(h, 416, raw=b"", headers={"Content-Range": f"bytes */{total}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
            return self._send(h, 206, raw=data[start:end + 1], headers=headers)
        return self._send(h, 200, raw=data, headers=headers)
