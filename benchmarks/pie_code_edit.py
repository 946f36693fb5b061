"""PIE vs full re-encode vs naive splice after code edits, on the default model and stdlib Python files.

For each file and context length: the file's first ``N`` tokens (cut back to a line end) are prefilled once;
for each random edit (single-line insertion, deletion, replacement, and a 3-place multi-edit, at uniformly
random lines) the three methods update a copy of that cache:

* ``reencode`` (baseline a, its fastest honest form): keep the cache before the first edit, recompute the rest;
* ``splice`` (baseline b): encode the edited tokens, append the old suffix entries unchanged (positions stale);
* ``pie``: encode the edited tokens, re-rotate the suffix keys by their position delta;
* ``pie_refresh`` (with ``--refresh-tail K``): PIE, then the context's last ``K`` tokens re-encoded
  (``PIEConfig(refresh_tail=K)``): the tokens next to the generation point see the edited text;
* ``reencode_chunked`` (with ``--noise-floor``): the re-encode again, in chunks of 64 tokens: the same math in
  another floating-point order. Its agreement with ``reencode`` is the metric's noise floor: greedy decoding
  parts at near-ties, so no method can be expected to agree more often than an exact recomputation does.

Metrics against ``reencode``: greedy next-32-token agreement (position-wise, and the agreeing prefix),
next-line exact match, perplexity of the file's real next 64 tokens (teacher-forced after the context), and the
wall time of the update itself (tokenizing the edit included, generation excluded).

    python benchmarks/pie_code_edit.py --files argparse.py inspect.py typing.py --contexts 2048 4096 8192 \
        --edits-per-kind 2
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import statistics
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._harness import print_table, save_results  # noqa: E402
from longkit.hf_patches.pie import EditableContext, TextEdit  # noqa: E402
from longkit.models import load_default  # noqa: E402

KINDS = ("insert", "delete", "replace", "multi")
METHODS = ("reencode", "splice", "pie")


def _lines(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` character spans of the lines (end includes the newline)."""
    out, pos = [], 0
    for line in text.splitlines(keepends=True):
        out.append((pos, pos + len(line)))
        pos += len(line)
    return out


def _one_edit(kind: str, text: str, spans: list[tuple[int, int]], i: int, donors: list[str],
              rng: random.Random) -> TextEdit:
    """A single-line edit of ``kind`` at line ``i``; inserted/replacing lines are real lines of the same file."""
    s, e = spans[i]
    if kind == "insert":
        return TextEdit(s, s, rng.choice(donors) + "\n")
    if kind == "delete":
        return TextEdit(s, e, "")
    line = text[s:e].rstrip("\n")
    return TextEdit(s, s + len(line), rng.choice([d for d in donors if d != line] or donors))


def make_edits(kind: str, text: str, donors: list[str], rng: random.Random) -> list[TextEdit]:
    """Random edits of ``kind`` at uniformly random lines (not the last one, so the context end is kept)."""
    spans = _lines(text)
    lines = list(range(len(spans) - 1))
    if kind != "multi":
        return [_one_edit(kind, text, spans, rng.choice(lines), donors, rng)]
    picks: list[int] = []
    while len(picks) < 3:  # three lines at least two apart, so the edits' line windows do not merge
        i = rng.choice(lines)
        if all(abs(i - j) > 2 for j in picks):
            picks.append(i)
    return [_one_edit(rng.choice(KINDS[:3]), text, spans, i, donors, rng) for i in sorted(picks)]


def _first_line(s: str) -> str:
    return s.lstrip("\n").split("\n")[0]


def _ppl(ctx: EditableContext, cont: list[int]) -> float:
    logits = ctx.continuation_logits(cont).float()
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(cont[1:], device=logits.device))
    return math.exp(nll.item())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", nargs="+", default=["argparse.py", "inspect.py", "typing.py"],
                    help="stdlib module files (each must have >= max(--contexts) tokens)")
    ap.add_argument("--contexts", nargs="+", type=int, default=[2048, 4096, 8192])
    ap.add_argument("--edits-per-kind", type=int, default=2)
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--ppl-tokens", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--refresh-tail", type=int, default=0,
                    help="also run PIE with PIEConfig(refresh_tail=K) as method pie_refresh (0: not run)")
    ap.add_argument("--noise-floor", action="store_true",
                    help="also re-encode in chunks of 64 tokens (method reencode_chunked): the agreement an exact "
                         "recomputation in another summation order reaches")
    ap.add_argument("--out", default=None, help="results name (default pie_code_edit_<cpu|gpu>)")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    model, tok = load_default(dtype=getattr(torch, args.dtype), device=args.device)
    dev = model.device
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rng = random.Random(args.seed)
    rows: list[dict[str, Any]] = []
    name = args.out or f"pie_code_edit_{'gpu' if dev.type == 'cuda' else 'cpu'}"
    extra = {"args": vars(args)}
    for fname in args.files:
        source = (stdlib / fname).read_text(encoding="utf-8")
        all_ids = tok(source, add_special_tokens=False)["input_ids"]
        n_max = max(args.contexts)
        if len(all_ids) < n_max + args.ppl_tokens:
            raise SystemExit(f"{fname} has {len(all_ids)} tokens, fewer than {n_max} + {args.ppl_tokens}")
        head = tok.decode(all_ids[:n_max])
        head = head[: head.rfind("\n") + 1]  # end the context on a line end: the next line is then well defined
        t0 = time.perf_counter()
        full = EditableContext(model, text=head, tokenizer=tok)
        print(f"[{fname}] prefill {len(full)} tokens: {time.perf_counter() - t0:.1f} s", flush=True)
        donors = [ln.rstrip("\n") for ln in source.splitlines() if ln.strip() and len(ln) < 100]
        for n_ctx in args.contexts:
            # the longest line-aligned prefix of <= n_ctx tokens (a causal cache's prefix is that prefix's cache)
            ids_text = full.text or ""
            # (a boundary after a newline and, possibly, the next line's indentation: BPE merges "\n" + spaces)
            bounds = full._bounds or []
            cut = max(j for j in range(1, min(n_ctx, len(full)) + 1)
                      if bounds[j] > 0 and ids_text[max(0, bounds[j] - 200):bounds[j]].rstrip(" \t").endswith("\n"))
            base = full.prefix(cut)
            cont = tok(source[len(base.text or ""):], add_special_tokens=False)["input_ids"][: args.ppl_tokens]
            for kind in args.kinds:
                for rep in range(args.edits_per_kind):
                    edits = make_edits(kind, base.text or "", donors, rng)
                    res: dict[str, dict[str, Any]] = {}
                    methods = list(METHODS) + (["pie_refresh"] if args.refresh_tail else []) + (
                        ["reencode_chunked"] if args.noise_floor else [])
                    for method in methods:
                        ctx = base.clone()
                        if method == "pie_refresh":
                            ctx.config = dataclasses.replace(ctx.config, refresh_tail=args.refresh_tail)
                        if method == "reencode_chunked":
                            ctx.config = dataclasses.replace(ctx.config, chunk_size=64)
                        _sync(dev)
                        t = time.perf_counter()
                        stats = ctx.edit(edits, method={"pie_refresh": "pie", "reencode_chunked": "reencode"}.get(
                            method, method))
                        _sync(dev)
                        dt = time.perf_counter() - t
                        gen = ctx.generate(args.gen_tokens)[0].tolist()
                        res[method] = {"time_s": dt, "gen": gen, "ppl": _ppl(ctx, cont), "stats": stats,
                                       "text": tok.decode(gen)}
                    ref = res["reencode"]
                    first_edit_tok = min(e.start for e in edits)
                    row: dict[str, Any] = {
                        "file": fname, "ctx": len(base), "kind": kind, "rep": rep,
                        "edit_char": first_edit_tok, "suffix_tokens": res["pie"]["stats"].rerotated,
                        "encoded_pie": res["pie"]["stats"].encoded, "encoded_reencode": ref["stats"].encoded,
                        "ppl_reencode": ref["ppl"],
                        "t_reencode_s": ref["time_s"],
                    }
                    for m in [x for x in ("splice", "pie", "pie_refresh", "reencode_chunked") if x in res]:
                        g = res[m]["gen"]
                        agree = sum(a == b for a, b in zip(g, ref["gen"])) / len(ref["gen"])
                        prefix = next((k for k, (a, b) in enumerate(zip(g, ref["gen"])) if a != b), len(ref["gen"]))
                        row.update({
                            f"agree_{m}": agree, f"prefix_{m}": prefix,
                            f"line_{m}": _first_line(res[m]["text"]) == _first_line(ref["text"]),
                            f"ppl_{m}": res[m]["ppl"], f"t_{m}_s": res[m]["time_s"],
                            f"speedup_{m}": ref["time_s"] / res[m]["time_s"],
                        })
                    rows.append(row)
                    print(f"  ctx {row['ctx']} {kind:7s} agree pie {row['agree_pie']:.2f} splice "
                          f"{row['agree_splice']:.2f} | t reenc {ref['time_s']:.2f}s pie {res['pie']['time_s']:.2f}s",
                          flush=True)
                    save_results(name, rows, extra)  # after every row: a cut-short run keeps what it measured
    summary = summarize(rows)
    print_table(rows, ["file", "ctx", "kind", "suffix_tokens", "agree_pie", "agree_splice", "line_pie", "line_splice",
                       "ppl_reencode", "ppl_pie", "ppl_splice", "t_reencode_s", "t_pie_s", "speedup_pie"],
                title="per edit")
    print_table(summary, title="summary (means; speedup: median of per-edit ratios)")
    save_results(name, rows, {**extra, "summary": summary})


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (context length, kind) and per context length over all kinds."""
    groups: dict[tuple[Any, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((max(1, round(r["ctx"] / 1024)) * 1024, r["kind"]), []).append(r)
        groups.setdefault((max(1, round(r["ctx"] / 1024)) * 1024, "all"), []).append(r)
    out = []
    for (ctx, kind), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] == "all", kv[0][1])):
        out.append({
            "ctx~": ctx, "kind": kind, "n": len(rs),
            "agree_pie": statistics.mean(r["agree_pie"] for r in rs),
            "agree_splice": statistics.mean(r["agree_splice"] for r in rs),
            "line_pie": statistics.mean(float(r["line_pie"]) for r in rs),
            "line_splice": statistics.mean(float(r["line_splice"]) for r in rs),
            "ppl_reencode": statistics.mean(r["ppl_reencode"] for r in rs),
            "ppl_pie": statistics.mean(r["ppl_pie"] for r in rs),
            "ppl_splice": statistics.mean(r["ppl_splice"] for r in rs),
            "t_reencode_s": statistics.mean(r["t_reencode_s"] for r in rs),
            "t_pie_s": statistics.mean(r["t_pie_s"] for r in rs),
            "speedup_pie_median": statistics.median(r["speedup_pie"] for r in rs),
        })
        if all("agree_reencode_chunked" in r for r in rs):
            out[-1].update({
                "agree_reencode_chunked": statistics.mean(r["agree_reencode_chunked"] for r in rs),
                "line_reencode_chunked": statistics.mean(float(r["line_reencode_chunked"]) for r in rs),
            })
        if all("agree_pie_refresh" in r for r in rs):
            out[-1].update({
                "agree_pie_refresh": statistics.mean(r["agree_pie_refresh"] for r in rs),
                "line_pie_refresh": statistics.mean(float(r["line_pie_refresh"]) for r in rs),
                "ppl_pie_refresh": statistics.mean(r["ppl_pie_refresh"] for r in rs),
                "speedup_pie_refresh_median": statistics.median(r["speedup_pie_refresh"] for r in rs),
            })
    return out


if __name__ == "__main__":
    main()
