"""One client for every OpenAI-compatible chat endpoint (vLLM, SGLang, `transformers serve`, hosted
APIs): the LLM judge (judge.OpenAIChat), the teacher and rubric generation (factory) and the
policy (agent.OpenAIPolicy) all send `/v1/chat/completions` requests through `ChatEndpoint`.

Paper: none (plumbing). KLong judges with an endpoint model (gpt-oss-120b) and PaperBench's judge
retries its calls; the paper says nothing of how. Built from two well-kept libraries instead of a
hand-written loop: the official `openai` client speaks the protocol (URL, key, timeouts, typed HTTP
errors) with its own retries off (`max_retries=0`), and `tenacity` runs the retry policy below, so
every failed try is seen, classified and counted here.

Retry policy (attempt k = 0, 1, ... of `attempts` tries in all):

    wait_k = min(max_backoff_s, backoff_s · factor^k)   exponential backoff (factor 2), capped
    wait_k = min(max_backoff_s, Retry-After)            when the reply carries Retry-After (429, 503)

- retried: timeouts, connection errors (refused, dropped), HTTP 429 and 5xx, and an HTTP 200 that
  is not a chat completion (malformed JSON, no choices[0].message): each try's kind is recorded
  ("timeout", "connection", "http_429", "http_500", ..., "malformed"); after the last try
  EndpointUnavailable (an outage, not an answer).
- never retried: HTTP 401/403/404 (EndpointAccessError: the key, model or URL is wrong; every later
  call of this endpoint fails at once without a request), other 4xx (EndpointRequestError; an HTTP
  400 about the prompt's length is ContextLengthError).

Departures and choices:
- No jitter on the backoff (the openai client adds 25 %): waits are reproducible and the fault
  tests can bound them; concurrent callers of one endpoint back off in step.
- The reply is kept as the raw JSON (Completion.raw), not the client's typed model: servers add
  fields the OpenAI schema lacks (vLLM / SGLang log-probs and token ids) and a malformed 200 is
  classified here instead of failing inside the client's parser.
- Without a key (argument or OPENAI_API_KEY) the client sends `Bearer EMPTY` (vLLM's convention);
  local servers ignore it, hosted APIs answer 401.
"""
from __future__ import annotations

import email.utils
import json
import logging
import os
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import openai
import tenacity

log = logging.getLogger("klong.endpoint")

ACCESS_ERRORS = {401: "the API key is missing or wrong (set OPENAI_API_KEY)",
                 403: "the API key may not use this model",
                 404: "unknown model or wrong URL"}

# an HTTP 400 that is about the prompt's length (vLLM, SGLang, OpenAI, transformers serve wording)
CONTEXT_ERROR = re.compile(r"context[ _-]?(length|window)|maximum context|max_model_len|"
                           r"too many tokens|prompt is too long|input is too long", re.I)

SUFFIX = "/chat/completions"


class EndpointError(Exception):
    """Any failure of a chat endpoint call."""


class EndpointAccessError(EndpointError):
    """HTTP 401/403/404: the key, model or URL is wrong. Never retried."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class EndpointRequestError(EndpointError):
    """The endpoint refused this request (a 4xx other than 401/403/404/429). Never retried."""

    def __init__(self, message: str, status: int, body: str):
        super().__init__(message)
        self.status, self.body = status, body


class ContextLengthError(EndpointRequestError):
    """HTTP 400 saying the prompt is longer than the model's context."""


class EndpointUnavailable(EndpointError):
    """Every try failed in a retryable way (timeouts, connection errors, 429, 5xx, malformed 200)."""

    def __init__(self, message: str, failures: list[str], wait_s: float):
        super().__init__(message)
        self.failures, self.wait_s = failures, wait_s


@dataclass
class Completion:
    """One chat completion."""
    message: dict                 # choices[0].message as a plain dict
    raw: dict                     # the whole response JSON, fields outside OpenAI's schema kept
    usage: dict | None = None
    retries: int = 0              # failed tries before this answer
    wait_s: float = 0.0           # seconds in failed tries and backoff (not the answering try)
    failures: list[str] = field(default_factory=list)   # one kind per failed try


def base_url(url: str) -> str:
    """The client's base URL from what a user gives: `.../v1/chat/completions` and `.../v1` are
    kept up to `/v1`; a bare host (`http://h:8000`) gets `/v1`."""
    base = url.rstrip("/")
    if base.endswith(SUFFIX):
        return base[: -len(SUFFIX)]
    return base if base.endswith("/v1") else base + "/v1"


def retry_after_s(headers) -> float | None:
    """Seconds asked by a Retry-After header (seconds or an HTTP date) or retry-after-ms."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def backoff_s(k: int, base_s: float, max_s: float, retry_after: float | None = None,
              factor: float = 2.0) -> float:
    """The wait after failed try k (0-based): Retry-After when the server gave one, else
    base_s · factor^k; capped at max_s either way."""
    return min(max_s, retry_after if retry_after is not None else base_s * factor ** k)


class _Retryable(Exception):
    """One failed try worth another: its kind, a one-line description, the server's Retry-After."""

    def __init__(self, kind: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.kind, self.retry_after = kind, retry_after


def _one_line(text: str, n: int = 300) -> str:
    return " ".join(str(text).split())[:n]


class ChatEndpoint:
    """`POST {base}/chat/completions` with the retry policy of the module docstring. Thread-safe:
    one instance serves concurrent callers (the judge's 16 leaves at once)."""

    def __init__(self, url: str, model: str, *, api_key: str | None = None,
                 timeout_s: float = 600.0, attempts: int = 4, backoff_s: float = 1.0,
                 max_backoff_s: float = 60.0, backoff_factor: float = 2.0):
        if attempts < 1:
            raise ValueError(f"ChatEndpoint: attempts must be >= 1, got {attempts}")
        self.base_url, self.model = base_url(url), model
        self.url = self.base_url + SUFFIX
        self.attempts, self.backoff_s, self.max_backoff_s = attempts, backoff_s, max_backoff_s
        self.backoff_factor = backoff_factor
        self._client = openai.OpenAI(base_url=self.base_url, timeout=timeout_s, max_retries=0,
                                     api_key=api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY")
        self._lock = threading.Lock()
        self._stats = {"calls": 0, "answered": 0, "retries": 0, "unavailable": 0,
                       "access_errors": 0, "request_errors": 0, "wait_s": 0.0}
        self._failures: Counter[str] = Counter()
        self._denied: EndpointAccessError | None = None   # the first 401/403/404, raised again

    @property
    def stats(self) -> dict:
        """Running counts over every call: calls, answered, retries, unavailable (retries
        exhausted), access_errors, request_errors, wait_s, failures (by kind)."""
        with self._lock:
            return {**self._stats, "failures": dict(self._failures)}

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ChatEndpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def create(self, messages: list[dict], *, tools: list[dict] | None = None,
               max_tokens: int | None = None, temperature: float | None = None,
               seed: int | None = None, extra_body: dict | None = None) -> Completion:
        """One chat completion, retried as the module docstring says."""
        if self._denied is not None:   # one refusal stops every later call (no request is sent)
            raise self._denied
        kwargs = {"model": self.model, "messages": messages}
        for name, value in (("tools", tools), ("max_tokens", max_tokens),
                            ("temperature", temperature), ("seed", seed),
                            ("extra_body", extra_body)):
            if value is not None:
                kwargs[name] = value
        failures: list[str] = []
        t0, started = time.monotonic(), [0.0]   # started[0]: when the latest try began

        def attempt() -> Completion:
            started[0] = time.monotonic()
            try:
                return self._try(kwargs)
            except _Retryable as e:
                failures.append(e.kind)
                raise

        def wait(state: tenacity.RetryCallState) -> float:
            return backoff_s(state.attempt_number - 1, self.backoff_s, self.max_backoff_s,
                             getattr(state.outcome.exception(), "retry_after", None),
                             self.backoff_factor)

        def before_sleep(state: tenacity.RetryCallState) -> None:
            log.warning("%s: %s; retry %d/%d in %.2fs", self.url, state.outcome.exception(),
                        state.attempt_number, self.attempts - 1, state.upcoming_sleep)

        def waited() -> float:   # failed tries and backoff: up to the start of the latest try
            return started[0] - t0 if failures else 0.0

        with self._lock:
            self._stats["calls"] += 1
        try:
            done = tenacity.Retrying(stop=tenacity.stop_after_attempt(self.attempts), wait=wait,
                                     retry=tenacity.retry_if_exception_type(_Retryable),
                                     before_sleep=before_sleep, reraise=True)(attempt)
        except _Retryable as e:
            wait_s = time.monotonic() - t0   # every try failed: all of it was waiting
            self._count(failures, wait_s, "unavailable")
            raise EndpointUnavailable(f"{self.url} ({self.model}) failed {self.attempts} times; "
                                      f"last error: {e}", failures, wait_s) from None
        except EndpointAccessError as e:
            self._count(failures, waited(), "access_errors")
            with self._lock:
                self._denied = e
            raise
        except EndpointRequestError:
            self._count(failures, waited(), "request_errors")
            raise
        done.retries, done.wait_s, done.failures = len(failures), waited(), failures
        self._count(failures, done.wait_s, "answered")
        return done

    def _count(self, failures: list[str], waited: float, outcome: str) -> None:
        with self._lock:
            self._stats[outcome] += 1
            self._stats["retries"] += len(failures) - (outcome == "unavailable")
            self._stats["wait_s"] += waited
            self._failures.update(failures)

    def _try(self, kwargs: dict) -> Completion:
        """One request: the completion, or _Retryable / EndpointAccessError / EndpointRequestError."""
        try:
            r = self._client.chat.completions.with_raw_response.create(**kwargs).http_response
        except openai.APITimeoutError:
            raise _Retryable("timeout", "timed out") from None
        except openai.APIConnectionError as e:
            cause = e.__cause__
            raise _Retryable("connection", f"{type(cause).__name__}: {_one_line(cause)}"
                             if cause else _one_line(e)) from None
        except openai.APIStatusError as e:
            status, text = e.status_code, e.response.text
            message = f"HTTP {status}: {_one_line(text)}"
            if status == 429 or status >= 500:
                raise _Retryable(f"http_{status}", message,
                                 retry_after_s(e.response.headers)) from None
            if status in ACCESS_ERRORS:
                raise EndpointAccessError(f"{self.url} (model {self.model!r}): HTTP {status}, "
                                          f"{ACCESS_ERRORS[status]}: {_one_line(text, 200)}",
                                          status) from None
            kind = ContextLengthError if status == 400 and CONTEXT_ERROR.search(text) \
                else EndpointRequestError
            raise kind(f"{self.url} refused the request: {message}", status, text) from None
        try:
            raw = json.loads(r.text)
            message = raw["choices"][0]["message"]
            if not isinstance(message, dict):
                raise TypeError("message is not an object")
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Retryable("malformed", f"HTTP {r.status_code} without a chat completion: "
                             f"{r.text[:200]!r}") from None
        return Completion(message=message, raw=raw, usage=raw.get("usage"))
