"""Names on disk that stay short, safe and readable: the experiment name of a CSV data set (its
file's stem) and the folder of each job of a sweep (its overrides, without directories, quotes
or spaces, capped in length with a stable hash). Registered as OmegaConf resolvers, used in
``conf/train.yaml`` and the CSV data presets:

- ``${hdl_stem:PATH}``: the file's stem, e.g. ``/data/my file.csv`` -> ``my_file``;
- ``${hdl_job_dir:NUM,OVERRIDE_DIRNAME}``: ``NUM_<overrides>``; unchanged when the overrides
  are already safe and short (``0_loss=baseline,data.split_seed=0``).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import PurePath

MAX_JOB_DIR = 150  # characters of a job folder's name (the file system allows 255 bytes)
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+~@%\[\]-]+")


def safe_name(text: str) -> str:
    """``text`` with every run of characters outside ``[A-Za-z0-9._=,+~@%[]-]`` (spaces, quotes,
    slashes, colons, ...) replaced by one ``_``."""
    return _UNSAFE.sub("_", str(text)).strip("_") or "_"


def stem(path: object, default: str = "data") -> str:
    """The stem of a file path as a safe name (``default`` when there is no path)."""
    if path is None or str(path).strip() in ("", "???"):
        return default
    return safe_name(PurePath(str(path).strip().strip("'\"")).stem) or default


def _split_items(text: str, sep: str = ",") -> list[str]:
    """Split at ``sep`` outside brackets (list values keep their commas)."""
    items, depth, current = [], 0, []
    for ch in text:
        depth += ch in "[{("
        depth -= ch in "]})"
        if ch == sep and depth <= 0:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    items.append("".join(current))
    return items


def _short_value(value: str) -> str:
    """A path value as its file name (``/data/x/train.csv`` -> ``train.csv``), element-wise in a
    list; quotes dropped."""
    value = value.strip().strip("'\"")
    if value.startswith("[") and value.endswith("]"):
        inner = _split_items(value[1:-1])
        return "[" + ",".join(_short_value(v) for v in inner) + "]"
    if "/" in value:
        return PurePath(value.rstrip("/")).name or value.replace("/", "-")
    return value


def job_dirname(num: object, overrides: str, limit: int = MAX_JOB_DIR) -> str:
    """``<num>_<overrides>``: path values shortened to their file name, unsafe characters
    replaced, and capped at ``limit`` characters with a stable hash of the full overrides."""
    items = []
    for item in _split_items(str(overrides or "")):
        key, eq, value = item.partition("=")
        items.append(key.replace("/", "-") + eq + (_short_value(value) if eq else ""))
    name = f"{num}_" + ",".join(safe_name(i) if i else "" for i in items)
    if len(name) > limit:
        digest = hashlib.sha1(str(overrides).encode()).hexdigest()[:10]
        name = name[: limit - len(digest) - 1].rstrip(",_=") + "-" + digest
    return name


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("hdl_stem", stem, replace=True)
    OmegaConf.register_new_resolver("hdl_job_dir", job_dirname, replace=True)
