"""Measure the spread of every figure the numeric tests assert, across seeds, thread counts and
CPU paths, so that each threshold can be set well outside it (docs/testing.md lists the results).

    .venv/bin/python tests/measure_margins.py                      # seeds 0-2, threads 1 and 2, every CPU path
    .venv/bin/python tests/measure_margins.py --seeds 0 --paths default -k gate_training

Each configuration runs `pytest -m numeric` in a subprocess with LORA_STUDIO_TEST_SEED,
LORA_STUDIO_TEST_THREADS and ATEN_CPU_CAPABILITY set; the tests append what they measured to one
JSON-lines file (the `figures` fixture), and this prints per test and figure the minimum and
maximum over all configurations. A failing configuration is reported, not hidden.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu_paths() -> list[str]:
    """`default` and `avx2` run on any x86-64 CPU of the last decade; `avx512` only where present."""
    import torch

    native = torch.backends.cpu.get_cpu_capability().lower()
    paths = ["default", "avx2"]
    if native.startswith("avx512"):
        paths.append("avx512")
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--paths", default=",".join(cpu_paths()), help="ATEN_CPU_CAPABILITY values")
    parser.add_argument("-k", default=None, help="pytest -k expression to measure a subset")
    parser.add_argument("--out", default=None, help="keep the JSON lines here")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkstemp(suffix=".jsonl")[1])
    out.write_text("")
    failures = []
    for path in args.paths.split(","):
        for threads in args.threads.split(","):
            for seed in args.seeds.split(","):
                env = dict(
                    os.environ,
                    LORA_STUDIO_TEST_SEED=seed,
                    LORA_STUDIO_TEST_THREADS=threads,
                    ATEN_CPU_CAPABILITY=path,
                    OMP_NUM_THREADS=threads,
                    LORA_STUDIO_FIGURES=str(out),
                    HF_HUB_OFFLINE="1",
                    GRADIO_ANALYTICS_ENABLED="False",
                )
                command = [sys.executable, "-m", "pytest", "-q", "-m", "numeric", "-p", "no:cacheprovider"]
                if args.k:
                    command += ["-k", args.k]
                print(f"path={path} threads={threads} seed={seed}", flush=True)
                done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    failures.append((path, threads, seed, done.stdout.strip().splitlines()[-1:]))
    spread: dict[tuple[str, str], list[float]] = defaultdict(list)
    for line in out.read_text().splitlines():
        row = json.loads(line)
        for key, value in row.items():
            if isinstance(value, (int, float)) and key not in ("seed", "threads"):
                spread[(row["test"].split("::")[-1], key)].append(float(value))
    print(f"\n{'test':<60} {'figure':<28} {'min':>10} {'max':>10} {'runs':>5}")
    for (test, figure), values in sorted(spread.items()):
        print(f"{test:<60} {figure:<28} {min(values):>10.4f} {max(values):>10.4f} {len(values):>5}")
    for path, threads, seed, tail in failures:
        print(f"FAILED at path={path} threads={threads} seed={seed}: {tail}")
    print(f"\nfigures: {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
