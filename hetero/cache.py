"""hetero's disk cache: where it lives, and digests of code that are kept in it.

Compiled modules (hetero.compile), networks' ONNX forms (hetero.models) and the digests of hetero's own
code that key them all live under one folder; this module is below both, so neither imports the other
for it.
"""

from __future__ import annotations

import ast
import hashlib
import os
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """Where compiled modules live: $HETERO_CACHE, else ~/.cache/hetero."""
    return Path(os.environ.get("HETERO_CACHE") or Path.home() / ".cache" / "hetero")


def code_digest(paths: list[Path]) -> str:
    """A digest of what the Python files at `paths` do: their syntax trees without docstrings, so that a
    comment or a docstring rewritten does not re-compile every network and re-profile every device.

    Parsing the schedules took 0.3 s of every run that loads TVM's engine on the 2-core machine, so the
    digest is kept in the cache under a plain hash of the files' bytes (a millisecond), and the files are
    parsed again only when their bytes change."""
    raw = hashlib.sha256()
    for path in paths:
        text = path.read_bytes()
        raw.update(f"{len(text)}:".encode() + text)
    kept = cache_dir() / "code-digests" / raw.hexdigest()[:24]
    try:
        return kept.read_text(encoding="utf-8").strip()
    except OSError:
        pass
    digest = _parsed_digest(paths)
    try:
        kept.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=kept.parent, delete=False, encoding="utf-8") as staged:
            staged.write(digest)
        os.replace(staged.name, kept)
    except OSError:  # a cache that cannot be written costs the parse again next time, nothing more
        pass
    return digest


def _parsed_digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                    and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
        digest.update(ast.dump(tree).encode())
    return digest.hexdigest()[:12]
