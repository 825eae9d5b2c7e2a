"""A loopback JSON endpoint for the tests' deterministic fault injection (canned replies only where
a real server cannot be made to fail on cue): every POST is recorded as (path, body) in `calls`
and answered by `respond(path, body) -> (status, payload)` or `(status, payload, headers)`; a
`bytes` payload is sent as it is (malformed JSON), and `None` instead of a reply drops the
connection without an answer (`respond` may also sleep, to hang past a client's timeout)."""
import http.server
import json
import random
import socket
import threading
import time


class JsonEndpoint:
    def __init__(self, respond, poll_interval: float = 0.5):
        self.respond, self.calls, self.lock = respond, [], threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.calls.append((self.path, body))
                reply = outer.respond(self.path, body)
                if reply is None:   # a dropped connection: no status line, the socket closed
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                status, payload, headers = (*reply, {})[:3]
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in headers.items():
                        self.send_header(k, str(v))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):   # the client gave up (a hang)
                    self.close_connection = True

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            request_queue_size = 128   # concurrent clients never wait on the listen backlog (5)

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": poll_interval},
                         daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


FAULT_KINDS = ("http_500", "http_429", "timeout", "malformed", "connection")   # endpoint.py's names


def fault(kind: str, hang_s: float = 1.0, retry_after_s: float = 0.0):
    """The reply (for JsonEndpoint) that fails a chat call the way `kind` names: HTTP 500, 429 with
    Retry-After, a hang of `hang_s` (past the client's timeout), malformed JSON on a 200, a dropped
    connection."""
    if kind == "http_500":
        return 500, {"error": {"message": "injected server error"}}
    if kind == "http_429":
        return 429, {"error": {"message": "rate limited"}}, {"Retry-After": retry_after_s}
    if kind == "timeout":
        time.sleep(hang_s)
        return 500, {"error": {"message": "answered after the client gave up"}}
    if kind == "malformed":
        return 200, b'{"choices": [{"message": {"role": "assistant", "content": "cut'
    if kind == "connection":
        return None
    raise ValueError(f"unknown fault kind {kind!r}; expected one of {FAULT_KINDS}")


class FaultPlan:
    """Which calls fail, and how: call n (in arrival order) fails with probability `rate`, drawn
    from random.Random(seed); the failures take the kinds of FAULT_KINDS in turn, so every kind
    occurs once five calls have failed. `injected` counts them by kind."""

    def __init__(self, rate: float, seed: int = 0, kinds: tuple[str, ...] = FAULT_KINDS):
        self.rate, self.kinds, self.rng = rate, kinds, random.Random(seed)
        self.lock, self.calls, self.injected = threading.Lock(), 0, {k: 0 for k in kinds}

    def draw(self) -> str | None:
        """The fault of the next call, or None when it is answered."""
        with self.lock:
            self.calls += 1
            if self.rng.random() >= self.rate:
                return None
            kind = self.kinds[sum(self.injected.values()) % len(self.kinds)]
            self.injected[kind] += 1
            return kind


GRADE = "# Expectations\nThe criterion is met.\n# Reality\nThe submission meets it.\n# Score\n1"


def faulty_judge(rate: float = 0.3, seed: int = 0, hang_s: float = 1.0,
                 retry_after_s: float = 0.05) -> tuple[JsonEndpoint, FaultPlan]:
    """An LLM judge endpoint that grades every criterion 1 (the answer format judge.LLMGrader
    parses) and fails `rate` of its calls in every way (FaultPlan, seeded). Any score but 1 that
    is not a disqualification was therefore made up, not judged."""
    plan = FaultPlan(rate, seed)

    def respond(path, body):
        kind = plan.draw()
        if kind:
            return fault(kind, hang_s=hang_s, retry_after_s=retry_after_s)
        return 200, {"choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": GRADE}}],
                     "usage": {"prompt_tokens": 100, "completion_tokens": 20}}
    return JsonEndpoint(respond, poll_interval=0.05), plan
