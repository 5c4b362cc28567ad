"""Real text nobody here wrote, from the docstrings of installed libraries (no download).

`numpy_doc_pairs()` gives (query, passage) pairs from numpy's public functions: the summary
line is the query, the rest of the docstring the passage. `stdlib_texts()` gives sentences
from Python standard-library docstrings (a calibration set disjoint from numpy's text).
"""

from __future__ import annotations

import importlib
import inspect
import re

_SIG = re.compile(r"^[\w.]+\(.*\)\s*(->.*)?$")
NUMPY_MODULES = (
    "numpy",
    "numpy.linalg",
    "numpy.fft",
    "numpy.random",
    "numpy.ma",
    "numpy.polynomial.polynomial",
    "numpy.char",
    "numpy.strings",
    "numpy.emath",
    "numpy.lib.stride_tricks",
    "numpy.testing",
)


def _split_doc(doc: str) -> tuple[str, str] | None:
    """(summary, rest) of a docstring; a leading call signature line is skipped."""
    lines = inspect.cleandoc(doc).splitlines()
    while lines and (not lines[0].strip() or _SIG.match(lines[0].strip())):
        lines = lines[1:]
    if not lines:
        return None
    summary = []
    while lines and lines[0].strip():
        summary.append(lines.pop(0).strip())
    rest = " ".join(" ".join(ln.split()) for ln in lines if ln.strip())
    query = " ".join(summary)
    if len(query) < 12 or len(rest) < 40:
        return None
    return query, rest


def numpy_doc_pairs(min_pairs: int = 0) -> list[tuple[str, str, str]]:
    """(qualified name, query, passage) for numpy's public functions, one per distinct
    docstring, in a fixed order."""
    out, seen = [], set()
    for modname in NUMPY_MODULES:
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue
        names = getattr(mod, "__all__", None) or [n for n in dir(mod) if not n.startswith("_")]
        for name in sorted(names):
            obj = getattr(mod, name, None)
            if obj is None or not callable(obj) or inspect.isclass(obj) and modname != "numpy":
                continue
            doc = getattr(obj, "__doc__", None)
            if not isinstance(doc, str) or doc in seen:
                continue
            pair = _split_doc(doc)
            if pair is None:
                continue
            seen.add(doc)
            out.append((f"{modname}.{name}", *pair))
    if len(out) < min_pairs:
        raise RuntimeError(f"only {len(out)} numpy docstring pairs found (need {min_pairs})")
    return out


CALIBRATION_MODULES = (
    "sklearn.metrics",
    "sklearn.preprocessing",
    "sklearn.utils",
    "sklearn.model_selection",
    "sklearn.datasets",
    "sklearn.feature_extraction.text",
    "sklearn.cluster",
    "sklearn.linear_model",
    "sklearn.decomposition",
)


def calibration_texts(limit: int = 128) -> list[str]:
    """Queries and passages (as numpy_doc_pairs splits them) from scikit-learn's public
    functions and classes: technical docstrings of the same genre as the evaluation text,
    disjoint from it. Alternates query, passage; at most `limit` texts."""
    out: list[str] = []
    for modname in CALIBRATION_MODULES:
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue
        for name in sorted(getattr(mod, "__all__", None) or dir(mod)):
            doc = getattr(getattr(mod, name, None), "__doc__", None)
            pair = _split_doc(doc) if isinstance(doc, str) else None
            if pair is not None:
                out.extend(pair)
            if len(out) >= limit:
                return out[:limit]
    return out


STDLIB_MODULES = (
    "os",
    "collections",
    "itertools",
    "functools",
    "json",
    "re",
    "pathlib",
    "subprocess",
    "statistics",
    "string",
    "textwrap",
    "shutil",
    "heapq",
    "bisect",
)


def stdlib_texts(limit: int = 64) -> list[str]:
    """Docstring paragraphs of standard-library functions (calibration text)."""
    out = []
    for modname in STDLIB_MODULES:
        mod = importlib.import_module(modname)
        for name in sorted(n for n in dir(mod) if not n.startswith("_")):
            doc = getattr(getattr(mod, name, None), "__doc__", None)
            if isinstance(doc, str) and len(doc) > 60:
                out.append(" ".join(doc.split()))
            if len(out) >= limit:
                return out
    return out
