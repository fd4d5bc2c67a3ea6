"""A fake Kubernetes API server for the deploy tests (there is no cluster here): real HTTP on
loopback, answering the few reads `bedside deploy` makes, from scripted states."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

from kubernetes import client


def workload(kind: str, name: str, replicas: int, ready: int, generation: int = 2,
             observed: int = 2) -> dict[str, Any]:
    labels = {"app": name}
    status: dict[str, Any] = {"observedGeneration": observed, "replicas": replicas,
                              "updatedReplicas": ready, "readyReplicas": ready,
                              "availableReplicas": ready}
    if kind == "StatefulSet":
        status.update(currentRevision="r2" if ready >= replicas else "r1", updateRevision="r2")
    return {"apiVersion": "apps/v1", "kind": kind,
            "metadata": {"name": name, "namespace": "bedside", "generation": generation},
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                     "serviceName": name,
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"containers": [{"name": "c", "image": "i:1"}]}}},
            "status": status}


@dataclass
class ApiState:
    """Each read pops the next scripted answer; the last one repeats."""

    workloads: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)
    model_ready: list[bool] = field(default_factory=lambda: [True])
    requests: list[str] = field(default_factory=list)

    def next(self, answers: list[Any]) -> Any:
        return answers.pop(0) if len(answers) > 1 else answers[0]


def _handler(state: ApiState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, code: int, body: Any) -> None:
            data = json.dumps(body).encode() if not isinstance(body, bytes) else body
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            path = unquote(self.path.split("?")[0])
            state.requests.append(path)
            parts = path.strip("/").split("/")
            if parts[:2] == ["apis", "apps"] and len(parts) == 7:
                kind = {"deployments": "Deployment", "statefulsets": "StatefulSet"}[parts[5]]
                answers = state.workloads.get((kind, parts[6]))
                if answers is None:
                    self._send(404, {"kind": "Status", "code": 404, "reason": "NotFound"})
                else:
                    self._send(200, state.next(answers))
            elif parts[:2] == ["api", "v1"] and "proxy" in parts:
                ready = state.next(state.model_ready)
                self._send(200 if ready else 400, b"" if ready else b'{"error":"not ready"}')
            else:
                self._send(404, {"kind": "Status", "code": 404})

    return Handler


@contextmanager
def fake_apiserver(state: ApiState) -> Iterator[client.ApiClient]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    config = client.Configuration()
    config.host = f"http://127.0.0.1:{server.server_address[1]}"
    api = client.ApiClient(config)
    try:
        yield api
    finally:
        api.close()
        server.shutdown()
        server.server_close()
