"""A local stand-in for the Hugging Face Hub's file API, served over HTTP from the test process.

It serves dataset repositories from local folders (`HubServer.add_dataset`), one folder per
revision, on the routes huggingface_hub's HfApi / HfFileSystem call:

- `GET /api/datasets/<org>/<name>[/revision/<rev>]`: repo info (its commit `sha`, `siblings`);
- `GET /api/datasets/<org>/<name>/tree/<rev>[/<path>]` (`recursive`, `expand`): a listing;
- `POST /api/datasets/<org>/<name>/paths-info/<rev>` (form or JSON `paths`): info on given paths;
- `GET|HEAD /datasets/<org>/<name>/resolve/<rev>/<path>`: the file, with `Range` requests (206).

A bearer token can be required (`HubServer.token`): requests without it get 401, as a private
repository answers. Every request is recorded (`requests`), so tests can assert what was called,
e.g. that files were read in ranges rather than whole. Project code is not patched: point
HF_ENDPOINT (or the `endpoint` storage option) at `url`.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse


@dataclass
class Repo:
    revisions: dict[str, Path]  # revision (branch name or commit sha) -> folder
    shas: dict[str, str]  # revision -> commit sha


@dataclass
class HubServer:
    token: str | None = None
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, range)
    url: str = ""

    def add_dataset(self, repo_id: str, folder: Path, revision: str = "main") -> str:
        """Serve `folder` as dataset `repo_id` at `revision` (and at its commit sha); returns the sha."""
        sha = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
        repo = self.repos.setdefault(repo_id, Repo({}, {}))
        for rev in (revision, sha):
            repo.revisions[rev] = folder
            repo.shas[rev] = sha
        return sha

    def start(self) -> HubServer:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        server.daemon_threads = True
        self._server = server
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def ranged_reads(self, name: str) -> list[str]:
        return [r for m, p, r in self.requests if m == "GET" and "/resolve/" in p and p.endswith(name) and r]


def _entry(path_in_repo: str, p: Path) -> dict:
    if p.is_dir():
        return {"type": "directory", "path": path_in_repo, "oid": hashlib.sha1(path_in_repo.encode()).hexdigest()}
    data = p.read_bytes()
    return {"type": "file", "path": path_in_repo, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}


def _handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, obj, status: int = 200):
            self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json"})

        def _error(self, status: int, message: str, code: str | None = None):
            headers = {"Content-Type": "application/json", "X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, json.dumps({"error": message}).encode(), headers)

        def _authorized(self) -> bool:
            if hub.token is None:
                return True
            if self.headers.get("authorization") == f"Bearer {hub.token}":
                return True
            self._error(401, "Invalid credentials in Authorization header", "RepoNotFound")
            return False

        def _repo(self, repo_id: str, revision: str | None):
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, f"Repository {repo_id} not found", "RepoNotFound")
                return None, None, None
            rev = unquote(revision or "main")
            if rev not in repo.revisions:
                self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
                return None, None, None
            return repo, repo.revisions[rev], repo.shas[rev]

        def do_HEAD(self):
            self._dispatch("HEAD")

        def do_GET(self):
            self._dispatch("GET")

        def do_POST(self):
            self._dispatch("POST")

        def _dispatch(self, method: str):
            url = urlparse(self.path)
            hub.requests.append((method, url.path, self.headers.get("range")))
            body = b""
            if method == "POST":
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
            if not self._authorized():
                return
            path, query = url.path, parse_qs(url.query)
            if m := re.fullmatch(r"/api/datasets/([^/]+/[^/]+)(?:/revision/(.+))?", path):
                return self._info(m.group(1), m.group(2))
            if m := re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path):
                return self._tree(m.group(1), m.group(2), unquote(m.group(3) or ""), query)
            if m := re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/paths-info/([^/]+)", path):
                return self._paths_info(m.group(1), m.group(2), body, self.headers.get("content-type", ""))
            if m := re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                return self._resolve(m.group(1), m.group(2), unquote(m.group(3)), head=method == "HEAD")
            self._error(404, f"no route {method} {path}")

        def _info(self, repo_id: str, revision: str | None):
            repo, folder, sha = self._repo(repo_id, revision)
            if repo is None:
                return
            siblings = [
                {"rfilename": p.relative_to(folder).as_posix()} for p in sorted(folder.rglob("*")) if p.is_file()
            ]
            self._json({"id": repo_id, "sha": sha, "private": False, "siblings": siblings, "tags": []})

        def _tree(self, repo_id: str, revision: str, sub: str, query: dict):
            repo, folder, _ = self._repo(repo_id, revision)
            if repo is None:
                return
            base = folder / sub if sub else folder
            if not base.is_dir():
                return self._error(404, f"{sub} not found", "EntryNotFound")
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            found = sorted(base.rglob("*") if recursive else base.iterdir())
            self._json([_entry(p.relative_to(folder).as_posix(), p) for p in found])

        def _paths_info(self, repo_id: str, revision: str, body: bytes, content_type: str):
            repo, folder, _ = self._repo(repo_id, revision)
            if repo is None:
                return
            if "json" in content_type:
                paths = json.loads(body or b"{}").get("paths", [])
            else:
                paths = parse_qs(body.decode()).get("paths", [])
            out = [_entry(p, folder / p) for p in paths if (folder / p).exists()]
            self._json(out)

        def _resolve(self, repo_id: str, revision: str, path_in_repo: str, head: bool):
            repo, folder, sha = self._repo(repo_id, revision)
            if repo is None:
                return
            f = folder / path_in_repo
            if not f.is_file():
                return self._error(404, f"Entry not found: {path_in_repo}", "EntryNotFound")
            data = f.read_bytes()
            headers = {
                "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                "X-Repo-Commit": sha,
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
            }
            rng = self.headers.get("range")
            if rng and (m := re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())):
                start = int(m.group(1))
                end = min(int(m.group(2)) if m.group(2) else len(data) - 1, len(data) - 1)
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                return self._send(206, data[start : end + 1], headers, head)
            if head:
                self.send_response(200)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                return
            self._send(200, data, headers)

    return Handler
