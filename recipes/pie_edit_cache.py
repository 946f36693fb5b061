"""PIE demo: keep a code file's KV cache valid through an edit, on the default model (SmolLM2-135M).

Loads a standard-library file, prefills its first ``--tokens`` tokens, replaces one line (default: a line in
the middle), and updates three copies of the cache: full re-encode from the edit on (exact), naive splice (no
re-rotation), and PIE. Prints each update's time and how many of the next ``--gen`` greedy tokens agree with
the re-encode.

    python recipes/pie_edit_cache.py                       # toy size, < 1 min on CPU
    python recipes/pie_edit_cache.py --file inspect.py --tokens 8192 --gen 32
"""

from __future__ import annotations

import argparse
import sysconfig
import time
from pathlib import Path

import torch

from longkit.hf_patches.pie import EditableContext, TextEdit
from longkit.models import load_default


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", default="textwrap.py", help="a module of the standard library")
    ap.add_argument("--tokens", type=int, default=512, help="context length (tokens)")
    ap.add_argument("--gen", type=int, default=16, help="greedy tokens compared after the edit")
    ap.add_argument("--line", type=int, default=None, help="line to replace (default: the middle one)")
    ap.add_argument("--new", default="    result = None  # edited", help="the replacement line")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model, tok = load_default()
    source = (Path(sysconfig.get_paths()["stdlib"]) / args.file).read_text(encoding="utf-8")
    head = tok.decode(tok(source, add_special_tokens=False)["input_ids"][: args.tokens])
    head = head[: head.rfind("\n") + 1]
    t = time.perf_counter()
    base = EditableContext(model, text=head, tokenizer=tok)
    print(f"{args.file}: {len(base)} tokens prefilled in {time.perf_counter() - t:.1f} s")

    lines = head.splitlines(keepends=True)
    i = len(lines) // 2 if args.line is None else args.line
    start = sum(len(x) for x in lines[:i])
    old = lines[i].rstrip("\n")
    edit = TextEdit(start, start + len(old), args.new)
    print(f"line {i}: {old!r} -> {args.new!r}\n")

    outs = {}
    for method in ("reencode", "splice", "pie"):
        ctx = base.clone()
        t = time.perf_counter()
        stats = ctx.edit(edit, method=method)
        dt = time.perf_counter() - t
        outs[method] = ctx.generate(args.gen)[0].tolist()
        agree = sum(a == b for a, b in zip(outs[method], outs["reencode"])) / args.gen
        print(f"{method:8s} update {dt * 1000:8.1f} ms  encoded {stats.encoded:5d}  re-rotated {stats.rerotated:5d}  "
              f"agreement with re-encode {agree:.0%}  next: {tok.decode(outs[method])[:40]!r}")


if __name__ == "__main__":
    main()
