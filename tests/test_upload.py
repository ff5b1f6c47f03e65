"""push against a recording Hub endpoint on 127.0.0.1 (HF_ENDPOINT): what huggingface_hub actually sends.

The server answers the calls an upload makes (create repo, validate the card's YAML, preupload,
commit) the way the Hub documents them, asking for plain (non-LFS) uploads, and records every request.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nf4convert.convert import convert


class RecordingHub(BaseHTTPRequestHandler):
    requests: list[tuple[str, str, bytes]]
    reject_commit = False

    def _send(self, code: int, obj: object) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        self.requests.append(("POST", self.path, body))
        base = f"http://{self.headers['Host']}/me/tiny-nf4"
        if self.path == "/api/repos/create":
            return self._send(200, {"url": base, "name": "me/tiny-nf4", "id": "1"})
        if self.path == "/api/validate-yaml":
            return self._send(200, {"errors": [], "warnings": []})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        if "/commit/" in self.path:
            if self.reject_commit:
                return self._send(403, {"error": "You don't have the rights to create a commit"})
            pr = {"pullRequestUrl": f"{base}/discussions/1"} if "create_pr=1" in self.path else {}
            return self._send(200, {"commitUrl": f"{base}/commit/{'a' * 40}", "commitOid": "a" * 40, **pr})
        self._send(404, {"error": "not found"})

    def do_GET(self) -> None:  # noqa: N802
        self.requests.append(("GET", self.path, b""))
        self._send(404, {"error": "not found"})

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hub():
    handler = type("Handler", (RecordingHub,), {"requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield handler, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def push(folder, endpoint, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint, "HF_TOKEN": "hf_test_token", "HF_HUB_DISABLE_TELEMETRY": "1"}
    return subprocess.run([sys.executable, "-m", "nf4convert", "push", str(folder), "me/tiny-nf4", *args], capture_output=True, text=True, env=env, timeout=120)


def test_push_creates_the_repo_and_commits_every_file_with_the_card(hub, llama_dir, tmp_path):
    handler, endpoint = hub
    out = convert(llama_dir, tmp_path / "nf4")
    p = push(out, endpoint, "--private", "--commit-message", "NF4 weights")
    assert p.returncode == 0, p.stderr
    assert f"{endpoint}/me/tiny-nf4/commit/" in p.stdout
    posts = {path: body for method, path, body in handler.requests if method == "POST"}
    assert json.loads(posts["/api/repos/create"]) == {"name": "tiny-nf4", "organization": "me", "visibility": "private"}
    lines = [json.loads(line) for line in posts["/api/models/me/tiny-nf4/commit/main"].splitlines()]
    assert lines[0] == {"key": "header", "value": {"summary": "NF4 weights", "description": ""}}
    sent = {v["value"]["path"]: base64.b64decode(v["value"]["content"]) for v in lines[1:]}
    assert set(sent) == {"README.md"} | {p.name for p in out.iterdir()}
    for name, data in sent.items():
        assert name == "README.md" or data == (out / name).read_bytes(), name
    assert b"base_model_relation" not in sent["README.md"] and b"me/tiny-nf4" in sent["README.md"]
    assert not (out / "README.md").exists()  # the card went up from memory


@pytest.mark.parametrize("reject", [False, True])
def test_push_never_writes_into_the_folder(hub, llama_dir, tmp_path, reject):
    handler, endpoint = hub
    handler.reject_commit = reject
    out = convert(llama_dir, tmp_path / "nf4")
    (out / "README.md").write_text("my own notes\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    p = push(out, endpoint)
    assert p.returncode == (9 if reject else 0), p.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_rejected_commit_is_one_line(hub, llama_dir, tmp_path):
    handler, endpoint = hub
    handler.reject_commit = True
    out = convert(llama_dir, tmp_path / "nf4")
    p = push(out, endpoint)
    assert p.returncode == 9
    assert p.stderr.strip() == "nf4convert: error: me/tiny-nf4: upload rejected (HTTP 403); check the token's write permission"


def test_an_unreachable_hub_is_one_line(llama_dir, tmp_path):
    out = convert(llama_dir, tmp_path / "nf4")
    p = push(out, "http://127.0.0.1:9")
    assert p.returncode == 9 and p.stderr.count("\n") == 1 and "me/tiny-nf4: upload failed" in p.stderr


def committed(handler, branch: str = "main") -> dict[str, bytes]:
    """The files of the (last) commit to ``branch``: name -> bytes."""
    body = [body for method, path, body in handler.requests if method == "POST" and f"/commit/{branch}" in path][-1]
    lines = [json.loads(line) for line in body.splitlines()]
    return {v["value"]["path"]: base64.b64decode(v["value"]["content"]) for v in lines[1:]}


def test_a_readme_without_front_matter_is_kept_and_no_library_warning_reaches_the_user(hub, llama_dir, tmp_path):
    handler, endpoint = hub
    out = convert(llama_dir, tmp_path / "nf4")
    (out / "README.md").write_text("# My model\n\nMy own words.\n")
    p = push(out, endpoint)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    card = committed(handler)["README.md"].decode()
    assert card.startswith("---\n") and "# My model\n\nMy own words." in card and "## Quantization: me/tiny-nf4" in card


def test_the_folders_own_readme_is_kept_with_a_quantization_section_added(hub, llama_dir, tmp_path):
    handler, endpoint = hub
    out = convert(llama_dir, tmp_path / "nf4")
    (out / "README.md").write_text("---\nlicense: mit\ntags: [mine]\n---\n# My model\n\nMy own words.\n")
    p = push(out, endpoint)
    assert p.returncode == 0, p.stderr
    card = committed(handler)["README.md"].decode()
    assert "# My model\n\nMy own words." in card and "## Quantization: me/tiny-nf4" in card
    assert "license: mit" in card and "- mine" in card and "- nf4convert" in card  # theirs kept, ours added
    assert (out / "README.md").read_text().endswith("My own words.\n")  # the folder is untouched
    p = push(out, endpoint, "--replace-card")
    assert p.returncode == 0, p.stderr
    card = committed(handler)["README.md"].decode()
    assert "My own words" not in card and card.split("---")[2].lstrip().startswith("# me/tiny-nf4")


def test_hf_upload_conventions_revision_and_create_pr(hub, llama_dir, tmp_path):
    handler, endpoint = hub
    out = convert(llama_dir, tmp_path / "nf4")
    p = push(out, endpoint, "--create-pr", "--revision", "main")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().endswith("/me/tiny-nf4/discussions/1")
    assert any("/commit/main?create_pr=1" in path for method, path, _ in handler.requests if method == "POST")


def test_a_base_model_that_is_not_a_repo_id_is_refused_and_nothing_is_uploaded(hub, llama_dir, tmp_path):
    handler, endpoint = hub
    out = convert(llama_dir, tmp_path / "nf4")
    p = push(out, endpoint, "--base-model", "not a repo id")
    assert p.returncode == 9 and p.stderr.strip() == "nf4convert: error: --base-model 'not a repo id' is not a Hub repo id (org/name)"
    assert handler.requests == []


def test_convert_push_to_uploads_after_a_verified_conversion(hub, llama_dir, tmp_path):
    handler, endpoint = hub
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint, "HF_TOKEN": "hf_test_token", "HF_HUB_DISABLE_TELEMETRY": "1"}
    p = subprocess.run([sys.executable, "-m", "nf4convert", "convert", str(llama_dir), str(tmp_path / "nf4"), "--push-to", "me/tiny-nf4"],
                       capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "Next: nf4convert verify" in p.stdout and "nf4convert push" not in p.stdout  # pushed already
    assert set(committed(handler)) == {"README.md"} | {q.name for q in (tmp_path / "nf4").iterdir()}
    p = subprocess.run([sys.executable, "-m", "nf4convert", "convert", str(llama_dir), str(tmp_path / "other"), "--push-to", "no repo"],
                       capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert p.returncode == 2 and "--push-to 'no repo' is not a Hub repo id (org/name)" in p.stderr
    assert not (tmp_path / "other").exists()
