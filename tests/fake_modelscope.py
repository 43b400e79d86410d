"""A fake ModelScope hub on 127.0.0.1, serving local folders as model repos, for tests that must not touch the
internet.

It answers the three legacy `/api/v1` calls that `modelscope.snapshot_download` (modelscope 1.40, through
modelscope_hub 0.5) makes once MODELSCOPE_ENDPOINT points at it:

- GET /api/v1/models/{owner}/{name}/repo/files?Revision=&Recursive=   the file list (path, size, sha256)
- GET /api/v1/models/{owner}/{name}/repo?Revision=&FilePath=          one file's bytes
- GET /api/v1/models/{owner}/{name}                                   repo info (asked after a 404 on a listing)

Everything else (e.g. the intra-cloud region probe `/api/v1/repos/internalAccelerationInfo`) gets a 404. A repo
may be private: then a request without `Authorization: Bearer <its token>` gets 401 and one with another token 403,
the statuses modelscope_hub maps to AuthenticationError and PermissionDeniedError. Every request is recorded, so a
test can check what was asked for.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class Repo:
    """One model repo: its files (repo path → bytes) per revision, and the token it needs when private."""

    revisions: dict[str, dict[str, bytes]]
    token: str | None = None


@dataclass
class Request:
    path: str
    query: dict[str, str]
    authorization: str | None


def folder_files(folder: Path, extra: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """A folder's files as repo contents, plus `extra` (e.g. other frameworks' weights the client must skip)."""
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    return {**files, **(extra or {})}


@dataclass
class FakeModelScope:
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def downloaded(self, model_id: str, revision: str | None = None) -> set[str]:
        """The files of `model_id` (at `revision`, or any) whose bytes were asked for."""
        prefix = f"/api/v1/models/{model_id}/repo"
        with self._lock:
            return {
                r.query["FilePath"]
                for r in self.requests
                if r.path == prefix and "FilePath" in r.query and revision in (None, r.query.get("Revision"))
            }

    def __enter__(self) -> FakeModelScope:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args):  # noqa: A002 - the base class's name
                pass  # keep pytest's output clean; fake.requests has the record

            def do_HEAD(self):
                self._answer(head=True)

            def do_GET(self):
                self._answer(head=False)

            def _answer(self, head: bool) -> None:
                url = urlsplit(self.path)
                path = unquote(url.path)
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                with fake._lock:
                    fake.requests.append(Request(path, query, self.headers.get("Authorization")))
                parts = path.strip("/").split("/")
                # api/v1/models/{owner}/{name}[/repo[/files]]
                if parts[:3] != ["api", "v1", "models"] or len(parts) < 5:
                    return self._json(404, {"Code": 404, "Message": f"no such API: {path}", "Success": False})
                model_id, rest = "/".join(parts[3:5]), parts[5:]
                repo = fake.repos.get(model_id)
                if repo is None:
                    return self._json(404, {"Code": 404, "Message": f"Model {model_id} not found", "Success": False})
                if repo.token is not None:
                    given = self.headers.get("Authorization")
                    if not given:
                        return self._json(401, {"Code": 401, "Message": "login required", "Success": False})
                    if given != f"Bearer {repo.token}":
                        return self._json(403, {"Code": 403, "Message": "access denied", "Success": False})
                if not rest:
                    return self._json(200, {"Code": 200, "Data": {"Path": model_id.split("/")[0]}, "Success": True})
                revision = query.get("Revision", "master")
                files = repo.revisions.get(revision)
                if files is None:
                    return self._json(404, {"Code": 404, "Message": f"Revision {revision} not found", "Success": False})
                if rest == ["repo", "files"]:
                    listing = [
                        {
                            "Name": name.rsplit("/", 1)[-1],
                            "Path": name,
                            "Type": "blob",
                            "Size": len(data),
                            "Sha256": hashlib.sha256(data).hexdigest(),
                            "Revision": revision,
                        }
                        for name, data in files.items()
                    ]
                    return self._json(200, {"Code": 200, "Data": {"Files": listing}, "Success": True})
                if rest == ["repo"] and query.get("FilePath") in files:
                    data = files[query["FilePath"]]
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if not head:
                        self.wfile.write(data)
                    return None
                return self._json(404, {"Code": 404, "Message": f"no such file: {path}", "Success": False})

            def _json(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler
