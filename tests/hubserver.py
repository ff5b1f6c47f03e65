"""A Hub on 127.0.0.1 that serves one folder as a model repo the way huggingface.co does: the repo
listing with LFS sizes and sha256 (``/api/models/{repo}[/revision/{rev}]?blobs=true``), and files at
``/{repo}/resolve/{rev}/{name}`` for HEAD and GET with ``X-Repo-Commit``, ``X-Linked-Etag`` and
``X-Linked-Size`` for LFS files, and byte ranges (206). It records every request, and the scratch
folder's size when each full shard download starts.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under ``folder`` (hidden ones and unfinished downloads too)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


class FakeHub(BaseHTTPRequestHandler):
    repo_id: str
    root: Path
    scratch: Path | None
    requests: list[tuple[str, str, str | None]]  # method, file (or the API path), Range header
    scratch_at_download: list[tuple[str, int]]  # (shard, bytes in scratch when its download started)
    missing: set[str]  # files whose downloads are answered 404, as if the Hub lost them for a while

    def _lfs(self, name: str) -> bool:
        return name.endswith(".safetensors")

    def _files(self) -> dict[str, Path]:
        return {p.relative_to(self.root).as_posix(): p for p in sorted(self.root.rglob("*")) if p.is_file()}

    def _json(self, obj: object, code: int = 200) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _resolve(self, head: bool) -> None:
        m = re.fullmatch(rf"/{re.escape(self.repo_id)}/resolve/([^/]+)/(.+)", self.path)
        files = self._files()
        lost = m is not None and m.group(2) in self.missing and (head or self.headers.get("Range") is None)  # downloads fail, ranges not
        if m is None or m.group(1) not in ("main", COMMIT) or m.group(2) not in files or lost:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        name, data = m.group(2), files[m.group(2)].read_bytes()
        rng = self.headers.get("Range")
        self.requests.append(("HEAD" if head else "GET", name, rng))
        if not head and rng is None and self._lfs(name) and self.scratch is not None:
            self.scratch_at_download.append((name, folder_bytes(self.scratch)))
        body, code = data, 200
        if rng and not head:
            first, last = (int(x) for x in re.fullmatch(r"bytes=(\d+)-(\d+)", rng).groups())
            body, code = data[first : last + 1], 206
        self.send_response(code)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
        if self._lfs(name):
            self.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("X-Linked-Size", str(len(data)))
        if code == 206:
            self.send_header("Content-Range", f"bytes {first}-{first + len(body) - 1}/{len(data)}")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def do_HEAD(self) -> None:  # noqa: N802
        self._resolve(head=True)

    def do_GET(self) -> None:  # noqa: N802
        if re.match(rf"/api/models/{re.escape(self.repo_id)}(/revision/[^/?]+)?(\?|$)", self.path):
            self.requests.append(("GET", "api", None))
            siblings = []
            for name, path in self._files().items():
                data = path.read_bytes()
                entry = {"rfilename": name, "size": len(data), "blobId": hashlib.sha1(data).hexdigest()}
                if self._lfs(name):
                    entry["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
                siblings.append(entry)
            return self._json({"id": self.repo_id, "modelId": self.repo_id, "sha": COMMIT, "private": False, "siblings": siblings})
        if self.path.startswith("/api/"):
            return self._json({"error": "Repository not found"}, 404)
        self._resolve(head=False)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def serve(repo_id: str, root: Path, scratch: Path | None = None) -> Iterator[tuple[type[FakeHub], str]]:
    """Serve ``root`` as ``repo_id``; yields the handler class (its ``requests``) and the endpoint URL."""
    handler = type("Hub", (FakeHub,), {"repo_id": repo_id, "root": root, "scratch": scratch, "requests": [], "scratch_at_download": [], "missing": set()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield handler, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
