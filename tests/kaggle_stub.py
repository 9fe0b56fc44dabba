"""A local HTTP server standing in for the Kaggle API, serving files from a folder.

It speaks what kagglesdk sends: POST /api/v1/<service>/<method> with a JSON body; file
downloads answer with a redirect to GET /files/<name>, as Kaggle redirects to storage.
Every request is recorded, so tests can check what the client asked for.
"""

from __future__ import annotations

import base64
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class KaggleStub:
    root: Path  # competition files, as Kaggle lists them (train/..., *.csv)
    username: str = "tester"
    key: str = "secret-key-123"
    refuse: int | None = None  # answer every API call with this status (e.g. 403)
    requests: list[dict] = field(default_factory=list)

    def files(self) -> list[tuple[str, int]]:
        return sorted((p.relative_to(self.root).as_posix(), p.stat().st_size)
                      for p in self.root.rglob("*") if p.is_file())

    def serve(self) -> tuple[ThreadingHTTPServer, str]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _json(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"] or 0))
                                  or b"{}")
                method = self.path.rsplit("/", 1)[-1]
                stub.requests.append({"method": method, "body": body,
                                      "auth": self.headers.get("Authorization", "")})
                expected = "Basic " + base64.b64encode(
                    f"{stub.username}:{stub.key}".encode()).decode()
                if stub.refuse or self.headers.get("Authorization") != expected:
                    status = stub.refuse or 401
                    return self._json(status, {"code": status, "message": "refused"})
                if method == "ListDataFiles":
                    files = stub.files()
                    start = int(body.get("pageToken") or 0)
                    size = int(body.get("pageSize") or 20)
                    page = files[start : start + size]
                    more = start + size < len(files)
                    return self._json(200, {
                        "files": [{"name": n, "totalBytes": s} for n, s in page],
                        "nextPageToken": str(start + size) if more else ""})
                if method == "DownloadDataFile":
                    self.send_response(302)
                    self.send_header("Location", f"/files/{body['fileName']}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                return self._json(404, {"code": 404, "message": f"no method {method}"})

            def do_GET(self) -> None:
                name = self.path.removeprefix("/files/")
                stub.requests.append({"method": "GET", "body": {"file": name}, "auth": ""})
                path = stub.root / name
                if not path.is_file():
                    return self._json(404, {"code": 404, "message": "no such file"})
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return None

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server, f"http://127.0.0.1:{server.server_address[1]}"
