"""What a caller of the engine sees: requests, sampling, events, their wire format, and `Backend`.

`Backend` is every operation the web app, the HTTP server and the lab use. Two classes implement
it: `fusion.engine.Engine` (the model in this process) and `fusion.remote.RemoteEngine` (engine
replicas over HTTP). Everything crossing it is plain data: dataclasses, dicts, lists and text.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import NamedTuple, Protocol, runtime_checkable

from .artifacts import FusionArtifact
from .errors import FusionError
from .limits import LIMITS
from .trace import Trace


@dataclass
class FusionRequest:
    """Everything a request needs to fuse; nothing of it lives in shared state."""

    adapters: list[str] = field(default_factory=list)
    method: str = "base"
    params: dict = field(default_factory=dict)
    fusion: str | None = None  # a saved fitted fusion: supplies method, adapters and params

    def key(self) -> str:
        return json.dumps([self.fusion, self.method, list(self.adapters), self.params], sort_keys=True, default=str)


@dataclass
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()

    def validate(self) -> Sampling:
        if not (1 <= int(self.max_new_tokens) <= LIMITS.max_new_tokens):
            raise FusionError(f"max_new_tokens must lie in [1, {LIMITS.max_new_tokens}], got {self.max_new_tokens}")
        if not (0.0 <= float(self.temperature) <= 5.0):
            raise FusionError(f"temperature must lie in [0, 5], got {self.temperature}")
        if not (0.0 < float(self.top_p) <= 1.0):
            raise FusionError(f"top_p must lie in (0, 1], got {self.top_p}")
        if int(self.top_k) < 0:
            raise FusionError(f"top_k must be 0 (off) or positive, got {self.top_k}")
        return self


@dataclass
class GenerationEvent:
    text: str  # the reply so far
    delta: str  # what this event added
    done: bool = False
    finish_reason: str | None = None  # eos | length | stop | cancelled
    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    seconds_to_first_token: float | None = None
    tokens_per_second: float | None = None
    trace: Trace | None = None
    replica: str | None = None  # the serving replica, when generated through fusion.remote
    queued: int = 0  # > 0: the request waits for room in the running batch, at this place in the queue


@dataclass(frozen=True)
class BaseInfo:
    """The base model a backend serves."""

    name: str
    num_layers: int
    hidden_size: int
    device: str  # "cpu", "cuda:0"
    dtype: str  # "float32", "bfloat16"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> BaseInfo:
        return cls(
            name=str(data["name"]),
            num_layers=int(data["num_layers"]),
            hidden_size=int(data["hidden_size"]),
            device=str(data["device"]),
            dtype=str(data["dtype"]),
        )


@dataclass(frozen=True)
class RequestInfo:
    """What a request runs once a saved fusion is looked up: for labels and summaries."""

    method: str
    adapters: list[str]  # names, in slot order
    fusion: str | None = None


class LibraryFolders(NamedTuple):
    adapters: str
    fusions: str


@runtime_checkable
class Backend(Protocol):
    """The operations an engine offers its callers. Errors a caller can fix raise FusionError
    with a one-line message."""

    def base_info(self) -> BaseInfo: ...

    def methods(self) -> list[dict]:
        """Every fusion method with its declared parameters (`FusionMethod.describe()`)."""
        ...

    def adapters(self) -> list[dict]:
        """One summary per loaded adapter: name, kind, role, rank, modules, ..."""
        ...

    def fusions(self) -> list[dict]:
        """One summary per saved fitted fusion: name, method, adapters, params, meta, path."""
        ...

    def library_errors(self) -> dict[str, str]:
        """Adapter folders that could not be loaded: name -> reason."""
        ...

    def library_folders(self) -> LibraryFolders: ...

    def rescan(self) -> None:
        """Read the library folders again (adapters or fusions added or removed on disk)."""
        ...

    def import_adapter(
        self, source: str, name: str | None = None, role: str | None = None, overwrite: bool = False
    ) -> dict:
        """Validate a peft adapter folder or zip and add it to the library; -> its summary."""
        ...

    def remove(self, name: str, kind: str) -> None:
        """Delete a saved fusion (kind "fusion") or an adapter (kind "adapter") from the library;
        an adapter that saved fusions use is refused."""
        ...

    def describe(self, request: FusionRequest) -> RequestInfo:
        """The method and adapters a request runs; FusionError when it names unknown ones."""
        ...

    def stream(
        self,
        request: FusionRequest,
        messages: list[dict] | str,
        sampling: Sampling | None = None,
        system: str | None = None,
        cancel: threading.Event | None = None,
        trace: bool = True,
    ) -> Iterator[GenerationEvent]:
        """One event per new piece of text; the last has done=True and, if asked, the trace."""
        ...

    def generate(
        self,
        request: FusionRequest,
        messages: list[dict] | str,
        sampling: Sampling | None = None,
        system: str | None = None,
        cancel: threading.Event | None = None,
        trace: bool = True,
    ) -> GenerationEvent:
        """The whole reply: the last event of `stream`."""
        event = None
        for event in self.stream(request, messages, sampling, system=system, cancel=cancel, trace=trace):
            pass
        return event

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
    ) -> FusionArtifact:
        """Fit a method's learnable part on chat examples; -> the fitted fusion (or trained adapter),
        stored under `save_as` in the library (or in the folder `out`) unless `cancel` was set."""
        ...


# ---- the wire format between fusion/remote.py and fusion/serve.py ------------------------------
def request_to_dict(request: FusionRequest) -> dict:
    return {
        "adapters": list(request.adapters),
        "method": request.method,
        "params": dict(request.params or {}),
        "fusion": request.fusion,
    }


def request_from_dict(data: dict) -> FusionRequest:
    if not isinstance(data, dict):
        raise FusionError("'request' must be an object with adapters, method, params and fusion")
    adapters = data.get("adapters") or []
    params = data.get("params") or {}
    if not isinstance(adapters, list) or not all(isinstance(a, str) for a in adapters):
        raise FusionError("'request.adapters' must be a list of adapter names")
    if not isinstance(params, dict):
        raise FusionError("'request.params' must be an object")
    return FusionRequest(
        adapters=adapters, method=str(data.get("method") or "base"), params=params, fusion=data.get("fusion") or None
    )


def sampling_to_dict(sampling: Sampling) -> dict:
    return {**asdict(sampling), "stop": list(sampling.stop)}


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
        "text": event.text,
        "delta": event.delta,
        "done": event.done,
        "finish_reason": event.finish_reason,
        "token_ids": list(event.token_ids),
        "prompt_tokens": event.prompt_tokens,
        "seconds_to_first_token": event.seconds_to_first_token,
        "tokens_per_second": event.tokens_per_second,
        "queued": event.queued,
    }
    if with_trace and event.trace is not None:
        data["trace"] = event.trace.to_dict()
    return data


def event_from_dict(data: dict) -> GenerationEvent:
    trace = Trace.from_dict(data["trace"]) if data.get("trace") else None
    return GenerationEvent(
        text=data["text"],
        delta=data["delta"],
        done=bool(data["done"]),
        finish_reason=data.get("finish_reason"),
        token_ids=list(data.get("token_ids") or []),
        prompt_tokens=int(data.get("prompt_tokens") or 0),
        seconds_to_first_token=data.get("seconds_to_first_token"),
        tokens_per_second=data.get("tokens_per_second"),
        trace=trace,
        replica=data.get("replica"),
        queued=int(data.get("queued") or 0),
    )
