"""Errors a user can act on: the tools check their inputs before any engine starts.

A tool raises :class:`ToolError` (or the map's ``TriangleMixConfigError``);
``cli.main`` prints it as one line, ``vllm-trianglemix COMMAND: error: ...``,
and exits with status 2, without a traceback.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit


class ToolError(Exception):
    """A bad input of a tool, said in one line."""


def existing_file(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise ToolError(f"{what}: no such file: {path}")
    if not os.path.isfile(path):
        raise ToolError(f"{what}: not a file: {path}")
    return path


def writable_file(path: str, what: str) -> str:
    """A file the tool will write: its folder must exist."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ToolError(f"{what}: folder {folder} does not exist (for {path})")
    if os.path.isdir(path):
        raise ToolError(f"{what}: {path} is a folder, not a file")
    return path


def looks_like_path(name: str) -> bool:
    """A local path rather than a Hugging Face repo id ('org/name')."""
    return (os.path.isabs(name) or name.startswith(("./", "../", "~", "."))
            or name.count("/") > 1 or os.sep != "/" and os.sep in name)


def model_folder_or_hub_id(model: str, what: str = "--model") -> str:
    """A local model folder with config.json, or a name that can only be a hub id."""
    path = os.path.expanduser(model)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ToolError(f"{what}: {model} is a file; give the model's folder")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ToolError(f"{what}: model folder {model} has no config.json")
        return path
    if looks_like_path(model):
        raise ToolError(f"{what}: no such model folder: {model}")
    return model


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "tekken.json")
"""Any of these in a model folder: Hugging Face (or vLLM) can load a tokenizer from it."""


def has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES)


def http_url(url: str, what: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ToolError(f"{what}: not an http(s) URL: {url!r} (e.g. http://localhost:8000)")
    try:
        parts.port
    except ValueError:
        raise ToolError(f"{what}: bad port in URL {url!r}") from None
    return url.rstrip("/")


def shown_path(value: str) -> str:
    """A path as a report records it: relative to the working folder or ``~``
    when it lies under one (no machine-specific prefix); anything else as is."""
    if not value or not os.path.exists(value):
        return value
    full, cwd = os.path.abspath(value), os.getcwd()
    home = os.path.expanduser("~")
    if full.startswith(cwd + os.sep):
        return os.path.relpath(full, cwd)
    if home not in ("", "/") and full.startswith(home + os.sep):
        return "~" + full[len(home):]
    return value
