"""Engine replicas on Ray Serve: `python -m fusion serve --replicas N`.

Each replica is one Ray actor process holding one `Engine` (base model loaded once, adapters
loaded once and shared by that replica's requests). Ray Serve's HTTP proxy spreads requests over
the replicas and restarts a replica that dies. The HTTP API, all JSON:

    GET  /info      this replica: id, pid, base model (name, layers, device, dtype)
    GET  /methods   every method and its parameters (as `python -m fusion methods --json`)
    GET  /library   {"adapters", "fusions", "errors"}; a replica rescans its library folders when
                    they changed on disk (`?rescan=1` forces it)
    POST /generate  {"request": {"adapters", "method", "params", "fusion"}, "messages": [...] or "text",
                     "system", "sampling": {"max_new_tokens", "temperature", ...}, "trace": true}
                    -> newline-delimited JSON, one event per token: {"text", "delta", "done",
                       "finish_reason", "token_ids", "prompt_tokens", ..., "replica"}; the last one
                       carries the trace; a problem is one line {"error": "..."}

`fusion.remote.RemoteEngine` is the client, and `python app.py --backend URL` puts the web app on
top of it. Needs `ray[serve]` (requirements-scale.txt).
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at run time.
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from .api import event_to_dict, request_from_dict, sampling_from_dict
from .errors import FusionError

REPO = Path(__file__).resolve().parent.parent
APP_NAME = "lora-studio"

try:
    import ray
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from ray import serve
except ImportError as exc:  # the app and the engine work without Ray; only serving needs it
    raise FusionError(
        f"serving replicas needs Ray Serve ({exc.name} is missing): pip install -r requirements-scale.txt"
    ) from None

import torch  # noqa: E402 - after the check above, which names what is missing

from .engine import Engine  # noqa: E402

api = FastAPI(title="LoRA composition studio engine")


def _error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@serve.deployment(
    name="StudioEngine",
    max_ongoing_requests=8,
    health_check_period_s=2,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=2,
)
@serve.ingress(api)
class StudioEngine:
    """One engine per replica. `options`: model, device, dtype, adapters_dir, fusions_dir, threads."""

    def __init__(self, options: dict):
        if options.get("threads"):
            torch.set_num_threads(int(options["threads"]))
        self.engine = Engine(
            model=options.get("model") or "default",
            device=options.get("device") or "cpu",
            dtype=options.get("dtype") or "float32",
            adapters_dir=options.get("adapters_dir"),
            fusions_dir=options.get("fusions_dir"),
            progress=lambda *a, **k: None,
        )
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a Serve replica (direct construction)
            self.replica = f"local-{os.getpid()}"
        self._scan_lock = threading.Lock()
        self._seen = self._library_stamp()

    def _library_stamp(self):
        """Modification times of the library folders: a save or an import (atomic renames) on the
        serving host changes them, and every replica then rescans on its next request."""
        return tuple(d.stat().st_mtime_ns if d.is_dir() else None for d in map(Path, self.engine.library_folders()))

    def _refresh_library(self, force: bool = False) -> None:
        stamp = self._library_stamp()
        if force or stamp != self._seen:
            with self._scan_lock:
                self.engine.rescan()
                self._seen = stamp

    @api.get("/info")
    def info(self):
        return {"replica": self.replica, "pid": os.getpid(), "base": self.engine.base_info().to_dict()}

    @api.get("/methods")
    def methods(self):
        return self.engine.methods()

    @api.get("/library")
    def library(self, rescan: int = 0):
        self._refresh_library(force=bool(rescan))
        return {
            "adapters": self.engine.adapters(),
            "fusions": self.engine.fusions(),
            "errors": self.engine.library_errors(),
        }

    @api.post("/generate")
    async def generate(self, http_request: Request):
        try:
            body = json.loads(await http_request.body())
            if not isinstance(body, dict):
                raise FusionError("the body must be a JSON object")
            request = request_from_dict(body.get("request") or {})
            sampling = sampling_from_dict(body.get("sampling"))
            messages = body.get("messages")
            if not isinstance(messages, (str, list)):
                raise FusionError("'messages' must be text or a list of {role, content} objects")
            self._refresh_library()
            self.engine.describe(request)  # refuse a bad request before the stream starts
        except ValueError as exc:
            return _error(f"the body is not JSON: {exc}")
        except FusionError as exc:
            return _error(str(exc))
        with_trace = bool(body.get("trace", True))

        def lines():
            # Generation is pulled token by token: a client that goes away stops it at the next token.
            try:
                for event in self.engine.stream(
                    request, messages, sampling, system=body.get("system") or None, trace=with_trace
                ):
                    data = event_to_dict(event, with_trace and event.done)
                    data["replica"] = self.replica
                    yield json.dumps(data) + "\n"
            except FusionError as exc:
                yield json.dumps({"error": str(exc)}) + "\n"
            except Exception as exc:  # noqa: BLE001 - reported to the client, replica keeps serving
                yield (
                    json.dumps({"error": f"unexpected error on replica {self.replica} ({type(exc).__name__}: {exc})"})
                    + "\n"
                )

        return StreamingResponse(lines(), media_type="application/x-ndjson")


def replica_options(args) -> dict:
    return {
        "model": args.model or "default",
        "device": args.device,
        "dtype": args.dtype,
        "adapters_dir": str(Path(args.adapters_dir).resolve()) if args.adapters_dir else None,
        "fusions_dir": str(Path(args.fusions_dir).resolve()) if args.fusions_dir else None,
        "threads": args.threads,
    }


def start(
    replicas: int,
    options: dict,
    host: str = "127.0.0.1",
    port: int = 8000,
    cpus_per_replica: float = 1.0,
    gpus_per_replica: float = 0.0,
    num_cpus=None,
) -> str:
    """Start (or join) a local Ray instance and run the deployment; returns the endpoint URL once
    every replica is up."""
    if replicas < 1:
        raise FusionError(f"--replicas must be at least 1, got {replicas}")
    if not ray.is_initialized():
        env = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
        for key in ("HF_HUB_OFFLINE", "LORA_STUDIO_CACHE", "HF_HOME"):
            if key in os.environ:
                env[key] = os.environ[key]
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": env},
            configure_logging=False,
        )
    serve.start(http_options={"host": host, "port": int(port)})
    app = StudioEngine.options(
        num_replicas=int(replicas), ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica}
    ).bind(options)
    serve.run(app, name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def stop() -> None:
    try:
        serve.shutdown()
    finally:
        if ray.is_initialized():
            ray.shutdown()


def main(args) -> int:
    """`python -m fusion serve`: run until interrupted (Ctrl-C or SIGTERM), then shut down."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)

    options = replica_options(args)
    url = start(
        args.replicas,
        options,
        host=args.host,
        port=args.port,
        cpus_per_replica=args.cpus_per_replica,
        gpus_per_replica=args.gpus_per_replica,
        num_cpus=args.num_cpus,
    )
    print(
        f"{args.replicas} replica(s) serving at {url} — start the app with: python app.py --backend {url}",
        file=sys.stderr,
        flush=True,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop()
    return 0
