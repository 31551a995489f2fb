"""Real English text that no one has to ship: the docstrings of Python's standard library.

    texts = docstring_texts()                                   # ~ thousands of docstrings, fixed order
    windows = token_windows(tokenizer, window_len=512, max_windows=32)   # [n][512] token ids

The docstrings are read at run time with `inspect.getdoc` from MODULES (a fixed list of pure
standard-library modules that import on every platform): each module's own docstring, then its
public members defined in it (not re-exported) sorted by name, and for a class its public methods
sorted by name. Texts are deduplicated (getdoc inherits a method's docstring from its base class)
and those under MIN_CHARS are left out. The text depends on the Python version (the lists of
members and their docstrings change a little between versions), so a measurement records
`python_version`; engine and reference always see the same tokens within one run.

Windows: the texts, each followed by a blank line, are tokenized one at a time without special
tokens and concatenated; the stream is cut into consecutive windows of `window_len` tokens (the
last incomplete one dropped). No BOS is added: each window is a slice of running text, scored on
its tokens 1..window_len-1.
"""

from __future__ import annotations

import importlib
import inspect
import platform
import warnings

MODULES = (
    "abc", "argparse", "ast", "base64", "bisect", "calendar", "collections", "configparser", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum", "fnmatch",
    "fractions", "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html",
    "http.client", "inspect", "io", "ipaddress", "itertools", "json", "logging", "mimetypes", "numbers",
    "operator", "pathlib", "pickle", "pprint", "queue", "random", "re", "sched", "secrets", "shlex",
    "shutil", "statistics", "string", "struct", "tarfile", "tempfile", "textwrap", "threading", "timeit",
    "tokenize", "traceback", "types", "typing", "unittest.case", "urllib.parse", "uuid", "warnings",
    "weakref", "zipfile",
)
MIN_CHARS = 40


def python_version() -> str:
    return platform.python_version()


def docstring_texts(modules: tuple[str, ...] = MODULES, min_chars: int = MIN_CHARS) -> list[str]:
    """The corpus: deduplicated docstrings in a fixed order (see the module docstring)."""
    seen: set[str] = set()
    texts: list[str] = []

    def add(obj) -> None:
        doc = inspect.getdoc(obj)
        if doc and len(doc) >= min_chars and doc not in seen:
            seen.add(doc)
            texts.append(doc)

    with warnings.catch_warnings():  # deprecated aliases warn when read (typing.io, typing.ByteString)
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in modules:
            module = importlib.import_module(name)
            add(module)
            for _, member in _public_members(module):
                if getattr(member, "__module__", None) != module.__name__:
                    continue  # imported from elsewhere: its own module (if listed) has it
                add(member)
                if inspect.isclass(member):
                    for _, method in _public_members(member):
                        add(method)
    return texts


def _public_members(obj) -> list[tuple[str, object]]:
    out = []
    for name in sorted(vars(obj)):  # the object's own attributes, not inherited ones
        if name.startswith("_") or inspect.ismodule(vars(obj)[name]):
            continue
        try:
            out.append((name, getattr(obj, name)))
        except Exception:  # a descriptor that raises on class access
            continue
    return out


def token_windows(tokenizer, window_len: int = 512, max_windows: int = 32,
                  texts: list[str] | None = None) -> list[list[int]]:
    """Up to `max_windows` consecutive windows of exactly `window_len` token ids of the corpus.
    tokenizer: anything called as tokenizer(text, add_special_tokens=False)["input_ids"]
    (a transformers tokenizer, fusecc's byte tokenizer)."""
    if window_len < 2 or max_windows < 1:
        raise ValueError(f"token_windows needs window_len >= 2 and max_windows >= 1, got {window_len} and "
                         f"{max_windows}")
    stream: list[int] = []
    need = window_len * max_windows
    for text in docstring_texts() if texts is None else texts:
        stream += tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"]
        if len(stream) >= need:
            break
    return [stream[i:i + window_len] for i in range(0, min(len(stream), need) - window_len + 1, window_len)]
