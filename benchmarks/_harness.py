"""Shared benchmark conventions: baseline and longkit in the same process, a printed table, and
``benchmarks/results/<name>.json`` with device, versions, date, git commit and command line."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _git_commit() -> str | None:
    """``HEAD``'s short hash, with ``+changes`` when tracked files differ from it (the run used other code)."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "."], capture_output=True,
                               cwd=here.parent).returncode != 0
    except Exception:  # noqa: BLE001 - benchmarks also run from copies without .git
        return None
    return head + ("+changes" if dirty else "")


def env_info() -> dict[str, Any]:
    """Device name, library versions, date and command, recorded with every result."""
    import torch

    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": _git_commit(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available()
        else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
    }
    for mod in ("triton", "transformers", "trl", "deepspeed", "vllm"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent optional host
            pass
    return info


def print_table(rows: list[dict[str, Any]], columns: list[str] | None = None, title: str | None = None) -> None:
    """Print rows as an aligned text table (floats with 4 significant digits)."""
    if not rows:
        print("(no rows)")
        return
    columns = columns or list(rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    if title:
        print(f"\n## {title}")
    print(" | ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("-|-".join("-" * w for w in widths))
    for row in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(row, widths)))


def save_results(name: str, rows: list[dict[str, Any]], extra: dict[str, Any] | None = None,
                 out_dir: Path | None = None) -> Path:
    """Write ``{env, rows, extra}`` to ``<out_dir or benchmarks/results>/<name>.json`` and return the path."""
    out_dir = Path(out_dir) if out_dir else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"env": env_info(), "rows": rows, **(extra or {})}, indent=2, default=str))
    print(f"\nwrote {path}")
    return path
