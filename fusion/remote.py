"""A client for engine replicas served over HTTP (`python -m fusion serve`), shaped like `Engine`.

`RemoteEngine(url)` offers what the app uses of an engine — methods(), adapters(), fusions(),
resolve(), stream(), generate(), base, library.errors — so `python app.py --backend URL` runs the
same UI against a Ray Serve deployment. Only the standard library is used here: the app needs no
Ray. Generation streams newline-delimited JSON events; a reply that breaks off because its
replica died is asked again (replies are regenerated from scratch, so a greedy reply comes out the
same), and a backend that stays unreachable gives one clear error.
Fitting and importing write to the serving host's library and are done there.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
from dataclasses import asdict
from types import SimpleNamespace
from typing import Iterator

from .errors import FusionError
from .generate import GenerationEvent, Sampling
from .trace import Trace

NDJSON = "application/x-ndjson"


# ---- the wire format, shared with fusion/serve.py ------------------------------------------
def request_to_dict(request) -> dict:
    return {"adapters": list(request.adapters), "method": request.method, "params": dict(request.params or {}),
            "fusion": request.fusion}


def request_from_dict(data: dict):
    from .engine import FusionRequest

    if not isinstance(data, dict):
        raise FusionError("'request' must be an object with adapters, method, params and fusion")
    adapters = data.get("adapters") or []
    params = data.get("params") or {}
    if not isinstance(adapters, list) or not all(isinstance(a, str) for a in adapters):
        raise FusionError("'request.adapters' must be a list of adapter names")
    if not isinstance(params, dict):
        raise FusionError("'request.params' must be an object")
    return FusionRequest(adapters=adapters, method=str(data.get("method") or "base"), params=params,
                         fusion=data.get("fusion") or None)


def sampling_from_dict(data: dict | None) -> Sampling:
    data = dict(data or {})
    known = set(Sampling.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise FusionError(f"unknown sampling option(s): {', '.join(unknown)}")
    if "stop" in data:
        data["stop"] = tuple(data["stop"] or ())
    try:
        return Sampling(**data).validate()
    except (TypeError, ValueError) as exc:
        raise FusionError(f"bad sampling options: {exc}") from None


def event_to_dict(event: GenerationEvent, with_trace: bool) -> dict:
    data = {
        "text": event.text, "delta": event.delta, "done": event.done, "finish_reason": event.finish_reason,
        "token_ids": list(event.token_ids), "prompt_tokens": event.prompt_tokens,
        "seconds_to_first_token": event.seconds_to_first_token, "tokens_per_second": event.tokens_per_second}
    if with_trace and event.trace is not None:
        data["trace"] = event.trace.to_dict()
    return data


def event_from_dict(data: dict) -> GenerationEvent:
    trace = Trace.from_dict(data["trace"]) if data.get("trace") else None
    return GenerationEvent(text=data["text"], delta=data["delta"], done=bool(data["done"]),
                           finish_reason=data.get("finish_reason"), token_ids=list(data.get("token_ids") or []),
                           prompt_tokens=int(data.get("prompt_tokens") or 0),
                           seconds_to_first_token=data.get("seconds_to_first_token"),
                           tokens_per_second=data.get("tokens_per_second"), trace=trace,
                           replica=data.get("replica"))


# ---- the client ----------------------------------------------------------------------------
class BackendUnavailable(FusionError):
    """The backend could not be reached or lost the request (worth asking again)."""


class RemoteLibrary:
    """What the UI reads of `Engine.library`; changes to the library happen on the serving host."""

    def __init__(self, remote: "RemoteEngine"):
        self._remote = remote
        self.adapters_dir = f"{remote.url} (serving host)"
        self.fusions_dir = f"{remote.url} (serving host)"

    @property
    def errors(self) -> dict:
        return self._remote._library()["errors"]

    def rescan(self) -> None:
        self._remote._library(rescan=True)

    def import_adapter(self, *args, **kwargs):
        raise FusionError("this studio uses a remote backend: copy the adapter folder into the serving host's "
                          "library; the replicas pick it up by themselves")


class RemoteEngine:
    def __init__(self, url: str, timeout: float = 600.0, retries: int = 3, retry_wait: float = 2.0,
                 library_ttl: float = 2.0):
        parsed = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise FusionError(f"--backend must be an http(s) URL such as http://127.0.0.1:8000, got {url!r}")
        self.url = f"{parsed.scheme}://{parsed.netloc}{parsed.path.rstrip('/')}"
        self._parsed = parsed
        self.timeout, self.retries, self.retry_wait, self.library_ttl = timeout, retries, retry_wait, library_ttl
        self._cache: dict[str, tuple[float, object]] = {}
        self._lock = threading.Lock()
        info = self._get("/info")
        self.info = info
        base = info["base"]
        self.base = SimpleNamespace(name=base["name"], device=base["device"], dtype=base["dtype"],
                                    config=SimpleNamespace(num_hidden_layers=base["num_layers"]))
        self.library = RemoteLibrary(self)

    # ---- HTTP ----------------------------------------------------------------------------
    def _connection(self, timeout: float | None = None):
        cls = http.client.HTTPSConnection if self._parsed.scheme == "https" else http.client.HTTPConnection
        return cls(self._parsed.hostname, self._parsed.port, timeout=timeout or self.timeout)

    def _open(self, method: str, path: str, body: dict | None = None):
        """-> (connection, response) with status 200; raises BackendUnavailable or FusionError."""
        conn = self._connection()
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            conn.request(method, self._parsed.path.rstrip("/") + path, body=payload, headers=headers)
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise BackendUnavailable(f"the backend at {self.url} did not answer ({type(exc).__name__}: {exc})") from None
        if response.status != 200:
            text = response.read(2000).decode("utf-8", "replace")
            conn.close()
            try:
                message = json.loads(text).get("error") or text
            except (ValueError, AttributeError):
                message = text
            message = " ".join(str(message).split()) or f"HTTP {response.status}"
            if response.status in (400, 404, 422):
                raise FusionError(message)
            raise BackendUnavailable(f"the backend at {self.url} failed the request (HTTP {response.status}: "
                                     f"{message[:300]})")
        return conn, response

    def _with_retries(self, attempt):
        last = None
        for i in range(self.retries + 1):
            try:
                return attempt()
            except BackendUnavailable as exc:
                last = exc
                if i < self.retries:
                    time.sleep(self.retry_wait * (i + 1))
        raise last

    def _get(self, path: str):
        def attempt():
            conn, response = self._open("GET", path)
            try:
                return json.loads(response.read().decode("utf-8"))
            except (OSError, http.client.HTTPException, ValueError) as exc:
                raise BackendUnavailable(f"the backend at {self.url} sent a broken answer ({exc})") from None
            finally:
                conn.close()
        return self._with_retries(attempt)

    def _cached(self, key: str, ttl: float | None, fetch):
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit and (ttl is None or now - hit[0] < ttl):
                return hit[1]
        value = fetch()
        with self._lock:
            self._cache[key] = (now, value)
        return value

    def _library(self, rescan: bool = False) -> dict:
        if rescan:
            with self._lock:
                self._cache.pop("library", None)
            return self._cached("library", self.library_ttl, lambda: self._get("/library?rescan=1"))
        return self._cached("library", self.library_ttl, lambda: self._get("/library"))

    # ---- what the engine offers ------------------------------------------------------------
    def methods(self) -> list[dict]:
        return self._cached("methods", None, lambda: self._get("/methods"))

    def adapters(self) -> list[dict]:
        return self._library()["adapters"]

    def fusions(self) -> list[dict]:
        return self._library()["fusions"]

    def resolve(self, request):
        """-> (method, adapters, params) with `.name` attributes, for labels; the replica validates."""
        method, adapters, params = request.method, list(request.adapters), dict(request.params or {})
        if request.fusion:
            saved = {f["name"]: f for f in self.fusions()}.get(request.fusion)
            if saved is None:
                raise FusionError(f"no saved fusion named {request.fusion!r} on the backend")
            method, adapters = saved["method"], list(saved["adapters"])
        if method not in {m["name"] for m in self.methods()}:
            raise FusionError(f"unknown fusion method {method!r}")
        if method == "base":
            adapters = []
        return (SimpleNamespace(name=method), [SimpleNamespace(name=a.split("/")[-1]) for a in adapters], params)

    def stream(self, request, messages, sampling: Sampling | None = None, system: str | None = None,
               cancel: threading.Event | None = None, trace: bool = True) -> Iterator[GenerationEvent]:
        sampling = (sampling or Sampling()).validate()
        body = {"request": request_to_dict(request), "messages": messages, "system": system,
                "sampling": {**asdict(sampling), "stop": list(sampling.stop)}, "trace": bool(trace)}
        for attempt in range(self.retries + 1):
            try:
                yield from self._stream_once(body, cancel)
                return
            except BackendUnavailable as exc:
                if attempt == self.retries:
                    raise BackendUnavailable(f"{exc}; gave up after {attempt + 1} attempts") from None
                time.sleep(self.retry_wait * (attempt + 1))

    def _stream_once(self, body: dict, cancel: threading.Event | None) -> Iterator[GenerationEvent]:
        conn, response = self._open("POST", "/generate", body)
        event = None
        try:
            while True:
                if cancel is not None and cancel.is_set():
                    if event is not None:
                        event.done, event.finish_reason, event.delta = True, "cancelled", ""
                        yield event
                    return
                try:
                    line = response.readline()
                except (OSError, http.client.HTTPException) as exc:
                    raise BackendUnavailable(f"the backend at {self.url} broke off the reply ({exc})") from None
                if not line:
                    raise BackendUnavailable(f"the backend at {self.url} broke off the reply before it finished")
                try:
                    data = json.loads(line)
                except ValueError:
                    raise BackendUnavailable(f"the backend at {self.url} broke off the reply "
                                             f"({line[:200].decode('utf-8', 'replace').strip()})") from None
                if "error" in data:
                    if data.get("retry"):
                        raise BackendUnavailable(data["error"])
                    raise FusionError(data["error"])
                event = event_from_dict(data)
                yield event
                if event.done:
                    return
        finally:
            conn.close()

    def generate(self, request, messages, sampling: Sampling | None = None, **kwargs) -> GenerationEvent:
        event = None
        for event in self.stream(request, messages, sampling, **kwargs):
            pass
        return event

    def fit(self, *args, **kwargs):
        raise FusionError("this studio uses a remote backend: fit on the serving host with "
                          "`python -m fusion fit ... --save-as NAME`; the replicas pick it up by themselves")
