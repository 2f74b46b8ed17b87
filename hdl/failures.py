"""How a failed run is recorded in its folder (docs/runs.md, "Failures"): ``error.txt`` (the
one-line error, the exit code and, for an unexpected error, the traceback) and a line in the
run's log (``train.log``). Nothing is written as if it were a result: a failed run has no
``metrics.json``. Light: no torch."""

from __future__ import annotations

import datetime as _dt
import json
import logging
from pathlib import Path
from typing import Any

ERROR_FILE = "error.txt"
log = logging.getLogger("hdl")


def _log_to_run_folder(run_dir: Path, message: str) -> None:
    """The error as an ERROR line of the run's log file(s): Hydra's file handler when it writes
    into ``run_dir``, else appended to the ``*.log`` files already there."""
    run_dir = Path(run_dir).resolve()
    record = log.makeRecord("hdl", logging.ERROR, __file__, 0, message, None, None)
    emitted = False
    for handler in logging.getLogger().handlers:
        name = getattr(handler, "baseFilename", None)
        if name and Path(name).resolve().parent == run_dir:
            handler.emit(record)
            handler.flush()
            emitted = True
    if emitted or not run_dir.is_dir():
        return
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]
    for path in run_dir.glob("*.log"):
        with path.open("a") as f:
            f.write(f"[{stamp}][hdl][ERROR] - {message}\n")


def record_failure(
    run_dir: Path | str, message: str, exit_code: int, trace: str | None = None
) -> Path | None:
    """Write ``error.txt`` into ``run_dir`` and the error into its log; the path (None when the
    folder cannot be written)."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        header = {
            "error": message,
            "exit_code": exit_code,
            "time": _dt.datetime.now().isoformat(timespec="seconds"),
        }
        text = f"{message}\n\n" + json.dumps(header, indent=1) + "\n"
        if trace:
            text += "\n" + trace
        path = run_dir / ERROR_FILE
        path.write_text(text)
    except OSError:
        return None
    _log_to_run_folder(run_dir, f"{message} (exit code {exit_code})")
    return path


def read_failure(run_dir: Path | str) -> dict[str, Any] | None:
    """``{"error": first line, "exit_code": int}`` of a failed run, None when it has no
    ``error.txt``."""
    path = Path(run_dir) / ERROR_FILE
    if not path.is_file():
        return None
    text = path.read_text(errors="replace")
    first = text.splitlines()[0] if text else ""
    out: dict[str, Any] = {"error": first, "exit_code": None}
    start = text.find("{")
    if start >= 0:
        try:
            end = text.index("}", start) + 1
            out |= json.loads(text[start:end])
        except ValueError:
            pass
    return out


def clear_failure(run_dir: Path | str) -> None:
    """Remove the ``error.txt`` of an earlier attempt (a relaunch that now runs)."""
    (Path(run_dir) / ERROR_FILE).unlink(missing_ok=True)
