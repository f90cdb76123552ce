"""Transient storage errors: a job writing to an S3 endpoint on loopback (moto server behind a proxy that answers
503 to every third request) still completes with one record and one image per item."""

from __future__ import annotations

import http.client
import http.server
import threading

import pytest

from pipeline.config import load_spec
from pipeline.runner import run_job
from pipeline.storage import Storage
from tests.invariants import check_invariants

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

ROWS = [{"prompt_id": f"sku-{i:02d}", "prompt": f"a packshot of product {i}"} for i in range(6)]


class _FlakyProxy(http.server.ThreadingHTTPServer):
    """Forwards to the real endpoint, but answers ``503 SlowDown`` to every ``every``-th request."""

    daemon_threads = True

    def __init__(self, upstream_port: int, every: int = 3) -> None:
        self.upstream_port, self.every = upstream_port, every
        self.requests = self.injected = 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _forward(self) -> None:
        server: _FlakyProxy = self.server  # type: ignore[assignment]
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        with server.lock:
            server.requests += 1
            inject = server.requests % server.every == 0
            server.injected += inject
        if inject:
            payload = b"<Error><Code>SlowDown</Code><Message>injected by the test</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        conn = http.client.HTTPConnection("127.0.0.1", server.upstream_port, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "expect")}
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        # A HEAD response carries the object's length, not the (empty) body's.
        length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
        self.send_header("Content-Length", length)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward


@pytest.fixture
def flaky_s3(monkeypatch):
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port = server._server.server_port
    proxy = _FlakyProxy(port)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{proxy.server_address[1]}"
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    import boto3
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket="assets")
    yield proxy
    s3fs.S3FileSystem.clear_instance_cache()
    proxy.shutdown()
    server.stop()


@pytest.mark.timeout(240)
def test_job_on_s3_survives_injected_503s(flaky_s3, make_spec, tmp_path):
    db = f"sqlite:///{tmp_path}/audit.db"
    path = make_spec(ROWS, output="s3://assets/runs", database=db, sampler={"steps": 2})
    summary = run_job(load_spec(path), quiet=True)
    assert summary.counts == {"generated": 6}
    assert flaky_s3.injected >= 3, (flaky_s3.requests, flaky_s3.injected)  # the faults really happened
    check_invariants(db, "s3://assets/runs/test-job", "test-job", 6)
    rerun = run_job(load_spec(path), quiet=True)
    assert rerun.generated_now == 0 and rerun.skipped_done == 6


@pytest.mark.timeout(120)
def test_open_atomic_on_s3_publishes_only_a_finished_file(flaky_s3):
    # fsspec's S3 file object uploads on close, even when the block raised: a crash mid-write used to replace a
    # good results.parquet with a truncated one.
    st = Storage("s3://assets/atomic")
    with st.open_atomic("results.parquet") as f:
        f.write(b"PAR1 all of the rows PAR1")
        assert not st.exists("results.parquet")  # not visible before the block exits
    with pytest.raises(RuntimeError, match="crash mid-write"), st.open_atomic("results.parquet") as f:
        f.write(b"PAR1 half of the rows")
        raise RuntimeError("crash mid-write")
    with pytest.raises(RuntimeError), st.open_atomic("never.bin") as f:
        f.write(b"partial")
        raise RuntimeError("crash mid-write")
    assert st.read("results.parquet") == b"PAR1 all of the rows PAR1"
    assert not st.exists("never.bin")
    assert flaky_s3.requests > 0
