"""A loopback JSON endpoint for the tests' deterministic fault injection (canned replies only where
a real server cannot be made to fail on cue): every POST is recorded as (path, body) in `calls`
and answered by `respond(path, body) -> (status, payload)`."""
import http.server
import json
import threading


class JsonEndpoint:
    def __init__(self, respond, poll_interval: float = 0.5):
        self.respond, self.calls, self.lock = respond, [], threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.calls.append((self.path, body))
                status, payload = outer.respond(self.path, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": poll_interval},
                         daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
