"""HTTP connection limits (security/connections.py) on a whole gateway with its Triton edge
faked: real sockets against the real HTTP listener, short timeouts set by the test. Slow
clients (a request head dribbled a byte at a time, a body that stalls, an idle keep-alive
connection, a connection that sends nothing) are closed by the server while other clients are
served; one source address cannot hold more than its cap of connections."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.gateway.harness import fake_gateway
from tests.gateway.pki import client_context, make_pki
from tests.gateway.util import dicom_bytes, make_instance

HEADER_S, BODY_S, KEEP_ALIVE_S, CAP = 3.0, 2.5, 0.3, 4
TLS_HEADER_S = 1.5
SLACK_S = 3.0  # a loaded 2-core machine
DICOM = {"Content-Type": "application/dicom"}
SLOW_HEAD = (b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nUser-Agent: slow\r\n"
             b"X-Filler: " + b"a" * 200 + b"\r\n\r\n")
METRIC = 'bedside_gateway_requests_total{outcome="refused",protocol="http",reason="%s"}'


def _connect(port: int, source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def _open(sock: socket.socket) -> bool:
    """True while the server keeps the connection open and has sent nothing."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False  # an answer, or the end of the stream


def _until_closed(sock: socket.socket, within_s: float) -> tuple[bytes, float] | None:
    """Everything the server sends until it closes, and when it closed; None if it did not
    close within ``within_s``."""
    deadline = time.monotonic() + within_s
    data = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return None
        except ConnectionResetError:
            return data, time.monotonic()
        if not chunk:
            return data, time.monotonic()
        data += chunk
    return None


def _metric(text: str, reason: str) -> float:
    for line in text.splitlines():
        if line.startswith(METRIC % reason + " "):
            return float(line.split()[-1])
    return 0.0


class Dribbler:
    """Sends each socket's request head one byte at a time, every ``every_s``, until stopped
    or the socket is closed."""

    def __init__(self, socks: list[socket.socket], every_s: float = 0.1) -> None:
        self.socks, self.every_s = socks, every_s
        self.sent = [0] * len(socks)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            for k, sock in enumerate(self.socks):
                if self.sent[k] >= len(SLOW_HEAD) - 1:  # never completes the head
                    continue
                try:
                    sock.sendall(SLOW_HEAD[self.sent[k]:self.sent[k] + 1])
                    self.sent[k] += 1
                except OSError:
                    self.sent[k] = len(SLOW_HEAD)

    @contextmanager
    def running(self) -> Iterator[None]:
        self._thread.start()
        try:
            yield
        finally:
            self._stop.set()
            self._thread.join()


def _head(sock: socket.socket) -> bytes:
    """One response's head and the body bytes after it (Content-Length), read whole."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(4096)
    return head


def _steady_upload(port: int, answers: list[bytes]) -> None:
    """A body sent in 8 pieces 0.5 s apart: 4 s in all, longer than BODY_S, but no pause as
    long; then answered like any request."""
    body = dicom_bytes(make_instance(5))
    with _connect(port, "127.0.0.2") as sock:
        sock.settimeout(10)
        sock.sendall(b"POST /v1/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                     b"application/dicom\r\nContent-Length: %d\r\n\r\n" % len(body))
        step = -(-len(body) // 8)
        for k in range(8):
            time.sleep(0.5)
            sock.sendall(body[k * step:(k + 1) * step])
        answers.append(_head(sock))


def _busy_keep_alive(port: int, answers: list[bytes]) -> None:
    """One connection, a request every 0.1 s for 3.5 s (longer than HEADER_S): each head has
    its own deadline, from the end of the previous response."""
    with _connect(port, "127.0.0.2") as sock:
        sock.settimeout(10)
        end = time.monotonic() + HEADER_S + 0.5
        while time.monotonic() < end:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            answers.append(_head(sock))
            time.sleep(0.1)


def test_slow_clients_are_closed_and_one_source_is_capped_while_others_are_served(
        tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    gw = fake_gateway(tmp_path, http_header_timeout_s=HEADER_S, http_body_timeout_s=BODY_S,
                      http_keep_alive_s=KEEP_ALIVE_S, max_connections_per_source=CAP,
                      audit_log=audit)
    port = gw.config.http_port
    ds = make_instance(3)
    socks: list[socket.socket] = []
    try:
        # 127.0.0.1 takes its whole cap: three request heads dribbled a byte every 0.1 s, and a
        # POST whose headers are complete but whose body stops after 128 of 100000 bytes
        dribbled = [_connect(port, "127.0.0.1") for _ in range(3)]
        stalled = _connect(port, "127.0.0.1")
        socks += [*dribbled, stalled]
        opened = time.monotonic()
        stalled.sendall(b"POST /v1/infer HTTP/1.1\r\nHost: localhost\r\n"
                        b"Content-Type: application/dicom\r\nContent-Length: 100000\r\n\r\n"
                        + b"\0" * 128)
        body_stalled = time.monotonic()
        # meanwhile, from 127.0.0.2: a slow but steady upload, a busy keep-alive connection
        uploaded: list[bytes] = []
        reused: list[bytes] = []
        steady = [threading.Thread(target=_steady_upload, args=(port, uploaded), daemon=True),
                  threading.Thread(target=_busy_keep_alive, args=(port, reused), daemon=True)]
        for thread in steady:
            thread.start()
        with Dribbler(dribbled).running():
            # one more connection from 127.0.0.1 is answered 429 and closed
            extra = _connect(port, "127.0.0.1")
            socks.append(extra)
            extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            got = _until_closed(extra, SLACK_S)
            assert got is not None, "the connection over the cap was not closed"
            head, _, body = got[0].partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 429"), got[0][:200]
            assert b"retry-after: 1" in head.lower()
            assert json.loads(body)["error"]["reason"] == "source_connection_limit"
            # meanwhile another client is served, requests and an inference alike
            local = httpx.HTTPTransport(local_address="127.0.0.2")
            with httpx.Client(transport=local, base_url=f"http://127.0.0.1:{port}",
                              timeout=10) as client:
                assert [client.get("/healthz").status_code for _ in range(3)] == [200] * 3
                inferred = client.post("/v1/infer", content=dicom_bytes(ds), headers=DICOM)
                assert inferred.status_code == 200, inferred.text
            assert all(_open(s) for s in [*dribbled, stalled]), "closed before others served"
            # every slow connection is closed by the server: dribbling does not extend the
            # header deadline, a stalled body ends at its pause limit; each gets a 408
            for sock in dribbled:
                got = _until_closed(sock, opened + HEADER_S + SLACK_S - time.monotonic())
                assert got is not None, "a dribbled request head was never closed"
                assert got[0].startswith(b"HTTP/1.1 408"), got[0][:200]
                assert got[1] - opened >= HEADER_S * 0.9
            got = _until_closed(stalled, body_stalled + BODY_S + SLACK_S - time.monotonic())
            assert got is not None, "a stalled body was never closed"
            assert got[0].startswith(b"HTTP/1.1 408"), got[0][:200]
            assert json.loads(got[0].partition(b"\r\n\r\n")[2])["error"]["reason"] == (
                "body_timeout")
        for thread in steady:
            thread.join(timeout=10)
        assert len(uploaded) == 1 and uploaded[0].startswith(b"HTTP/1.1 200"), uploaded
        assert len(reused) >= 10 and all(a.startswith(b"HTTP/1.1 200") for a in reused), reused
        # an idle keep-alive connection is closed after the keep-alive timeout, silently
        idle = _connect(port, "127.0.0.2")
        socks.append(idle)
        idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        idle.settimeout(5)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += idle.recv(4096)
        answered = time.monotonic()
        assert answer.startswith(b"HTTP/1.1 200")
        got = _until_closed(idle, KEEP_ALIVE_S + SLACK_S)
        assert got is not None, "an idle keep-alive connection was never closed"
        assert got[1] - answered < HEADER_S  # the keep-alive timeout, not the header one
        # a connection that sends nothing at all is closed at the header timeout, unanswered;
        # on the gRPC port too (HTTP/2 preface and settings not sent: GOAWAY, then closed)
        silent = _connect(port, "127.0.0.3")
        grpc_silent = _connect(gw.config.grpc_port, "127.0.0.3")
        socks += [silent, grpc_silent]
        got = _until_closed(silent, HEADER_S + SLACK_S)
        assert got is not None and got[0] == b"", got
        got = _until_closed(grpc_silent, SLACK_S)
        assert got is not None and b"handshake timeout" in got[0], got
        # beyond twice the cap a source's connections are closed at once, unanswered: CAP
        # admitted, CAP more refused (to be answered 429 at a first request they never send),
        # and the next one is closed
        held = [_connect(port, "127.0.0.1") for _ in range(2 * CAP)]
        other = _connect(port, "127.0.0.4")
        socks += [*held, other]
        time.sleep(0.1)
        assert all(_open(s) for s in [*held, other])
        dropped = _connect(port, "127.0.0.1")
        socks.append(dropped)
        got = _until_closed(dropped, SLACK_S)
        assert got is not None and got[0] == b""
        assert _open(other)  # another source is not affected
        for sock in held:  # before their header timeout
            sock.close()
        # slots free again: 127.0.0.1 is served
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    finally:
        for sock in socks:
            sock.close()
        gw.stop()
    assert _metric(metrics, "source_connection_limit") == 1 + CAP + 1  # 429, held, closed
    assert _metric(metrics, "header_timeout") == 4  # three dribbled, one silent
    assert _metric(metrics, "body_timeout") == 1
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    refusals = [r for r in records if r["event"] == "connection"]
    assert {(r["source"], r["reason"], r["status"]) for r in refusals} == {
        ("127.0.0.1", "source_connection_limit", 429),
        ("127.0.0.1", "source_connection_limit", "closed"),
        ("127.0.0.1", "header_timeout", 408), ("127.0.0.3", "header_timeout", "closed"),
        ("127.0.0.1", "body_timeout", 408)}
    text = audit.read_text()
    assert ds.SOPInstanceUID not in text and ds.StudyInstanceUID not in text


def test_tls_connections_are_timed_out_and_client_certificates_still_authenticate(
        tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [
        {"name": "radiology-app", "subject": "O=Radiology, CN=client", "scopes": ["infer"]}]}))
    gw = fake_gateway(tmp_path, tls_cert=pki / "server.pem", tls_key=pki / "server.key",
                      tls_ca=pki / "ca.pem", http_tls=True, api_keys=keys,
                      http_header_timeout_s=TLS_HEADER_S, max_connections_per_source=CAP)
    port = gw.config.http_port
    try:
        raw = _connect(port, "127.0.0.1")
        slow = client_context(pki, True).wrap_socket(raw, server_hostname="localhost")
        slow.sendall(SLOW_HEAD[:20])
        started = time.monotonic()
        with httpx.Client(verify=client_context(pki, True)) as client:
            ok = client.post(f"https://localhost:{port}/v1/infer",
                             content=dicom_bytes(make_instance(1)), headers=DICOM)
        assert ok.status_code == 200, ok.text  # the certificate is still the principal
        slow.settimeout(TLS_HEADER_S + SLACK_S)
        data = b""
        try:
            while chunk := slow.recv(4096):
                data += chunk
        except (ConnectionResetError, ssl.SSLError):
            pass
        assert data.startswith(b"HTTP/1.1 408"), data[:200]
        assert time.monotonic() - started < TLS_HEADER_S + SLACK_S
        slow.close()
    finally:
        gw.stop()
