"""A client for engine replicas served over HTTP (`python -m fusion serve`): a `Backend`.

`RemoteEngine(url)` offers the operations of `fusion.api.Backend`, so `python app.py --backend URL`
runs the same UI against a Ray Serve deployment. Only the standard library is used here: the app
needs no Ray. Generation streams newline-delimited JSON events; a reply that breaks off because
its replica died is asked again (replies are regenerated from scratch, so a greedy reply comes out
the same), and a backend that stays unreachable gives one clear error.
Fitting, importing and deleting change the serving host's library and are done there.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
from collections.abc import Iterator

from .api import (
    Backend,
    BaseInfo,
    FusionRequest,
    GenerationEvent,
    LibraryFolders,
    RequestInfo,
    Sampling,
    event_from_dict,
    request_to_dict,
    sampling_to_dict,
)
from .errors import FusionError


# ---- the client ----------------------------------------------------------------------------
class BackendUnavailable(FusionError):
    """The backend could not be reached or lost the request (worth asking again)."""


class RemoteEngine(Backend):
    def __init__(
        self, url: str, timeout: float = 600.0, retries: int = 3, retry_wait: float = 2.0, library_ttl: float = 2.0
    ):
        parsed = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise FusionError(f"--backend must be an http(s) URL such as http://127.0.0.1:8000, got {url!r}")
        self.url = f"{parsed.scheme}://{parsed.netloc}{parsed.path.rstrip('/')}"
        self._parsed = parsed
        self.timeout, self.retries, self.retry_wait, self.library_ttl = timeout, retries, retry_wait, library_ttl
        self._cache: dict[str, tuple[float, object]] = {}
        self._lock = threading.Lock()
        self.info = self._get("/info")
        self._base = BaseInfo.from_dict(self.info["base"])

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
            raise BackendUnavailable(
                f"the backend at {self.url} did not answer ({type(exc).__name__}: {exc})"
            ) from None
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
            raise BackendUnavailable(
                f"the backend at {self.url} failed the request (HTTP {response.status}: {message[:300]})"
            )
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
    def base_info(self) -> BaseInfo:
        return self._base

    def methods(self) -> list[dict]:
        return self._cached("methods", None, lambda: self._get("/methods"))

    def adapters(self) -> list[dict]:
        return self._library()["adapters"]

    def fusions(self) -> list[dict]:
        return self._library()["fusions"]

    def library_errors(self) -> dict[str, str]:
        return dict(self._library()["errors"])

    def library_folders(self) -> LibraryFolders:
        where = f"{self.url} (serving host)"
        return LibraryFolders(where, where)

    def rescan(self) -> None:
        self._library(rescan=True)

    def import_adapter(
        self, source: str, name: str | None = None, role: str | None = None, overwrite: bool = False
    ) -> dict:
        raise FusionError(
            "this studio uses a remote backend: copy the adapter folder into the serving host's "
            "library; the replicas pick it up by themselves"
        )

    def remove(self, name: str, kind: str) -> None:
        raise FusionError(
            "this studio uses a remote backend: delete the folder in the serving host's library and rescan"
        )

    def describe(self, request: FusionRequest) -> RequestInfo:
        """Looks up a saved fusion and checks the method's name; the replica validates the rest
        when the request runs."""
        method, adapters = request.method, list(request.adapters)
        if request.fusion:
            saved = {f["name"]: f for f in self.fusions()}.get(request.fusion)
            if saved is None:
                raise FusionError(f"no saved fusion named {request.fusion!r} on the backend")
            method, adapters = saved["method"], list(saved["adapters"])
        if method not in {m["name"] for m in self.methods()}:
            raise FusionError(f"unknown fusion method {method!r}")
        if method == "base":
            adapters = []
        return RequestInfo(method=method, adapters=[a.split("/")[-1] for a in adapters], fusion=request.fusion)

    def stream(
        self,
        request: FusionRequest,
        messages: list[dict] | str,
        sampling: Sampling | None = None,
        system: str | None = None,
        cancel: threading.Event | None = None,
        trace: bool = True,
    ) -> Iterator[GenerationEvent]:
        sampling = (sampling or Sampling()).validate()
        body = {
            "request": request_to_dict(request),
            "messages": messages,
            "system": system,
            "sampling": sampling_to_dict(sampling),
            "trace": bool(trace),
        }
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
                    raise BackendUnavailable(
                        f"the backend at {self.url} broke off the reply "
                        f"({line[:200].decode('utf-8', 'replace').strip()})"
                    ) from None
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

    def fit(
        self,
        method_name: str,
        adapters: list[str],
        records: list[dict] | str,
        params: dict | None = None,
        train: dict | None = None,
        save_as: str | None = None,
        out: str | None = None,
        overwrite: bool = False,
        system: str | None = None,
        on_progress=None,
        cancel: threading.Event | None = None,
        **options,
    ):
        raise FusionError(
            "this studio uses a remote backend: fit on the serving host with "
            "`python -m fusion fit ... --save-as NAME`; the replicas pick it up by themselves"
        )
