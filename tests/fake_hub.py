"""A fake Hugging Face hub on 127.0.0.1 for the hub-source and `modelpool pull` tests.

It answers what huggingface_hub 2.4 asks (read from its source): `GET /api/models/{repo}[/revision/{rev}]`,
`GET /api/models/{repo}/tree/{rev}[/{path}]`, `HEAD`/`GET /{repo}/resolve/{rev}/{path}`, with the hub's headers
(`X-Repo-Commit`, `ETag`, `Content-Length`, `Accept-Ranges`; for LFS files a 302 to a second server standing for
the hub's CDN, carrying `X-Linked-Etag` and `X-Linked-Size`), Range requests (206), and the hub's refusals: 404 or
401 with `X-Error-Code: RepoNotFound` (the hub tells a private repo from a missing one to nobody), `RevisionNotFound`,
`EntryNotFound`, 401/403 `GatedRepo`, 401 for a token it does not know. It never sends Xet headers, so
huggingface_hub never tries hf_xet. Every request is recorded (`seen`), and `cut_off` breaks a file's download
midway to test resuming.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

# Files the hub keeps in LFS (by .gitattributes): it redirects their downloads to the CDN.
LFS_SUFFIXES = (".safetensors", ".bin", ".h5", ".msgpack", ".onnx", ".gguf", ".pth")


@dataclass(frozen=True)
class Seen:
    server: str  # "hub" or "cdn"
    method: str
    path: str  # unquoted, without the query
    query: str
    range: str | None
    authorization: str | None


@dataclass
class _Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    private: bool = False
    gated: bool = False
    readers: frozenset[str] = frozenset()


@dataclass
class _Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    cut: bool = False  # send half the body, then close the connection
    stall: bool = False  # send half the body, then nothing until `restore`


def git_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def _pointer(content: bytes) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256(content)}\nsize {len(content)}\n".encode()


def _is_lfs(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


class FakeHub:
    """`tokens`: the access tokens the hub knows; a private or gated repo lets its `readers` (some of them) in."""

    def __init__(self, tokens: Iterable[str] = ()) -> None:
        self.tokens = frozenset(tokens)
        self.repos: dict[str, _Repo] = {}
        self._blobs: dict[str, bytes] = {}
        self._cut: dict[str, str] = {}  # sha256 -> "half" or "stall" (next GET), "down" (503 until restore)
        self._released = threading.Event()
        self._seen: list[Seen] = []
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []
        self.endpoint = ""
        self.cdn = ""

    # --- content -------------------------------------------------------------------------------------------------

    def add_commit(
        self,
        repo_id: str,
        files: dict[str, bytes],
        refs: Iterable[str] = ("main",),
        *,
        private: bool = False,
        gated: bool = False,
        readers: Iterable[str] = (),
    ) -> str:
        """A commit of `files` in `repo_id`, that the branches or tags `refs` point to; returns its sha."""
        repo = self.repos.setdefault(repo_id, _Repo())
        repo.private, repo.gated, repo.readers = private, gated, frozenset(readers)
        digest = hashlib.sha1(repo_id.encode())
        for path in sorted(files):
            digest.update(f"{path}\0{sha256(files[path])}\0".encode())
        digest.update(str(len(repo.commits)).encode())
        commit = digest.hexdigest()
        repo.commits[commit] = dict(files)
        for ref in refs:
            repo.refs[ref] = commit
        for content in files.values():
            self._blobs[sha256(content)] = content
        return commit

    def cut_off(self, content: bytes) -> None:
        """The next download of `content` sends half its bytes and closes the connection; the ones after are
        answered 503 (the network stays down) until `restore`."""
        self._cut[sha256(content)] = "half"

    def stall(self, content: bytes) -> None:
        """The next download of `content` sends half its bytes, then nothing until `restore`: a silent
        connection, as when the network hangs."""
        self._cut[sha256(content)] = "stall"
        self._released.clear()

    def restore(self) -> None:
        self._cut.clear()
        self._released.set()

    # --- what it saw ---------------------------------------------------------------------------------------------

    def seen(self, *, server: str | None = None, method: str | None = None) -> list[Seen]:
        with self._lock:
            return [s for s in self._seen if (server is None or s.server == server) and (method in (None, s.method))]

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()

    def downloads(self) -> list[Seen]:
        """The GETs that carried file content (from the hub itself or from the CDN)."""
        return [s for s in self.seen(method="GET") if s.server == "cdn" or "/resolve/" in s.path]

    # --- serving -------------------------------------------------------------------------------------------------

    def start(self) -> FakeHub:
        for name in ("hub", "cdn"):
            server = ThreadingHTTPServer(
                ("127.0.0.1", 0), type(f"{name}Handler", (_Handler,), {"hub": self, "name": name})
            )
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, name=f"fake-{name}", daemon=True).start()
            self._servers.append(server)
        self.endpoint = f"http://127.0.0.1:{self._servers[0].server_address[1]}"
        self.cdn = f"http://127.0.0.1:{self._servers[1].server_address[1]}"
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self._seen.append(seen)

    # --- the hub's answers ---------------------------------------------------------------------------------------

    def answer(self, server: str, method: str, target: str, headers) -> _Reply:
        url = urlsplit(target)
        parts = url.path.split("/")[1:]
        head = method == "HEAD"
        if server == "cdn":
            if len(parts) == 2 and parts[0] == "blobs" and parts[1] in self._blobs:
                return self._content(self._blobs[parts[1]], {"ETag": f'"{parts[1]}"'}, headers, head)
            return _Reply(404)
        auth = headers.get("Authorization")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id = f"{unquote(parts[2])}/{unquote(parts[3])}"
            refused = self._refuse(repo_id, auth)
            if refused:
                return refused
            rest = parts[4:]
            rev = unquote(rest[1]) if len(rest) >= 2 else "main"
            if rest[:1] not in ([], ["revision"], ["tree"]):
                return _Reply(404)
            commit = self._commit(repo_id, rev)
            if commit is None:
                return _error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            if rest[:1] == ["tree"]:
                query = parse_qs(url.query)
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                return _json(self._tree(repo_id, commit, unquote("/".join(rest[2:])), recursive))
            return _json(self._info(repo_id, commit, blobs="blobs=true" in url.query.lower()))
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id = f"{unquote(parts[0])}/{unquote(parts[1])}"
            refused = self._refuse(repo_id, auth)
            if refused:
                return refused
            rev, path = unquote(parts[3]), unquote("/".join(parts[4:]))
            commit = self._commit(repo_id, rev)
            if commit is None:
                return _error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            repo = self.repos[repo_id]
            token = _token(auth)
            if repo.gated and token not in repo.readers:
                # Anonymous callers get 401, logged-in ones without access 403, both with GatedRepo.
                return _error(401 if token is None else 403, "GatedRepo", f"Access to model {repo_id} is restricted.")
            files = repo.commits[commit]
            if path not in files:
                return _error(404, "EntryNotFound", f"{path} does not exist", {"X-Repo-Commit": commit})
            content = files[path]
            if _is_lfs(path):
                digest = sha256(content)
                return _Reply(
                    302,
                    {
                        "Location": f"{self.cdn}/blobs/{digest}",
                        "X-Repo-Commit": commit,
                        "ETag": f'"{git_oid(_pointer(content))}"',
                        "X-Linked-Etag": f'"{digest}"',
                        "X-Linked-Size": str(len(content)),
                    },
                )
            return self._content(content, {"ETag": f'"{git_oid(content)}"', "X-Repo-Commit": commit}, headers, head)
        return _Reply(404)

    def _refuse(self, repo_id: str, auth: str | None) -> _Reply | None:
        token = _token(auth)
        if token is not None and token not in self.tokens:
            return _Reply(401, {"X-Error-Message": "Invalid credentials in Authorization header"})
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and token not in repo.readers):
            return _error(401 if token is None else 404, "RepoNotFound", "Repository not found")
        return None

    def _commit(self, repo_id: str, rev: str) -> str | None:
        repo = self.repos[repo_id]
        return repo.refs.get(rev) or (rev if rev in repo.commits else None)

    def _info(self, repo_id: str, commit: str, blobs: bool) -> dict:
        repo = self.repos[repo_id]
        siblings = []
        for path, content in sorted(repo.commits[commit].items()):
            sibling: dict = {"rfilename": path}
            if blobs:
                sibling.update(size=len(content), blobId=git_oid(content))
                if _is_lfs(path):
                    sibling["lfs"] = {"size": len(content), "sha256": sha256(content), "pointerSize": 134}
            siblings.append(sibling)
        return {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit,
            "lastModified": "2026-11-30T00:00:00.000Z",
            "private": repo.private,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "library_name": "transformers",
            "tags": ["transformers", "safetensors", "llama", "text-generation"],
            "pipeline_tag": "text-generation",
            "siblings": siblings,
        }

    def _tree(self, repo_id: str, commit: str, under: str, recursive: bool) -> list[dict]:
        prefix = f"{under}/" if under else ""
        entries: dict[str, dict] = {}
        for path, content in sorted(self.repos[repo_id].commits[commit].items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :].split("/")
            for depth in range(1, len(rest)):
                folder = prefix + "/".join(rest[:depth])
                if recursive or depth == 1:
                    entries.setdefault(
                        folder, {"type": "directory", "oid": git_oid(folder.encode()), "size": 0, "path": folder}
                    )
            if len(rest) > 1 and not recursive:
                continue
            entry: dict = {"type": "file", "oid": git_oid(content), "size": len(content), "path": path}
            if _is_lfs(path):
                entry["oid"] = git_oid(_pointer(content))
                entry["lfs"] = {"oid": sha256(content), "size": len(content), "pointerSize": len(_pointer(content))}
            entries[path] = entry
        return list(entries.values())

    def _content(self, content: bytes, extra: dict[str, str], headers, head: bool) -> _Reply:
        """A file's bytes, honouring `Range: bytes=N-[M]`, or the cut-off that `cut_off` armed."""
        size = len(content)
        base = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream", **extra}
        state = self._cut.get(sha256(content)) if not head else None
        if state == "down":
            return _Reply(503, {"Retry-After": "1"}, b"network down")
        requested = headers.get("Range")
        if requested:
            start_text, _, end_text = requested.removeprefix("bytes=").partition("-")
            start, end = int(start_text), int(end_text) if end_text else size - 1
            if start >= size:
                return _Reply(416, {**base, "Content-Range": f"bytes */{size}"})
            end = min(end, size - 1)
            body = content[start : end + 1]
            reply = _Reply(206, {**base, "Content-Range": f"bytes {start}-{end}/{size}"}, body)
        else:
            reply = _Reply(200, base, content)
        if state == "half":
            self._cut[sha256(content)] = "down"
            reply.cut = True
        elif state == "stall":
            del self._cut[sha256(content)]
            reply.stall = True
        if head:
            reply.headers["Content-Length"] = str(len(reply.body))
            reply.body = b""
        return reply


def _token(auth: str | None) -> str | None:
    return auth.removeprefix("Bearer ").strip() if auth else None


def _error(status: int, code: str, message: str, extra: dict[str, str] | None = None) -> _Reply:
    body = json.dumps({"error": message}).encode()
    return _Reply(
        status,
        {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json", **(extra or {})},
        body,
    )


def _json(value: object) -> _Reply:
    return _Reply(200, {"Content-Type": "application/json"}, json.dumps(value).encode())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the hub: every reply carries a Content-Length
    hub: FakeHub
    name: str

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        pass

    def do_HEAD(self) -> None:
        self._serve()

    def do_GET(self) -> None:
        self._serve()

    def _serve(self) -> None:
        split = urlsplit(self.path)
        self.hub._record(
            Seen(
                self.name,
                self.command,
                unquote(split.path),
                split.query,
                self.headers.get("Range"),
                self.headers.get("Authorization"),
            )
        )
        reply = self.hub.answer(self.name, self.command, self.path, self.headers)
        self.send_response(reply.status)
        length = reply.headers.pop("Content-Length", None)
        for key, value in reply.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", length if length is not None else str(len(reply.body)))
        self.end_headers()
        if reply.cut or reply.stall:
            self.wfile.write(reply.body[: len(reply.body) // 2])
            self.wfile.flush()
            if reply.stall:
                self.hub._released.wait(timeout=120)  # bounded: a broken test must not hang the suite
            self.close_connection = True
            return
        self.wfile.write(reply.body)
