"""Shared test fixtures."""

import http.server
import threading

import lightning.pytorch  # noqa: F401  (see below)
import pytest
import torch

# Lightning's "lightning.pytorch" logger gets a StreamHandler bound to sys.stderr at its first
# import. Imported here, that is pytest's session-long stream; first imported inside a test using
# capsys, it would be bound to that test's stream, closed afterwards ("Logging error ... I/O
# operation on closed file" in every later test's stderr).


@pytest.fixture
def one_thread():
    """One intra-op thread for small-tensor training tests.

    Measured on the 2-core CI machine: 1 s instead of 10-40 s per training test when
    other processes share the cores (a second thread only adds hand-off and contention).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def serve():
    """serve(files: {url path: bytes}) -> base URL of a 127.0.0.1 server for this test."""
    servers = []

    def start(files: dict[str, bytes]) -> str:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                body = files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}"

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()
