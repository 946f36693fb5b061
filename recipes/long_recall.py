"""Find a fact hidden in the middle of a long document: LM-Infinite plus memory blocks.

LM-Infinite alone keeps perplexity flat past the pretraining length, but a query sees only the first ``n_global``
and the last ``n_local`` tokens. ``memory=`` groups the tokens in between into blocks and lets each chunk of queries
also attend to the ``topk`` blocks most relevant to it (InfLLM), at a distance the model saw in pretraining.

This script hides a secret number at ``--depth`` of a long filler made of Python standard-library sources, asks for it,
and answers with LM-Infinite + memory (and, with ``--compare``, with LM-Infinite alone). It prints each answer, the
time and the cache's memory (device and host bytes).

    python recipes/long_recall.py --help
    python recipes/long_recall.py --tokens 3000 --n-local 512                 # toy size, CPU (about a minute)
    python recipes/long_recall.py --tokens 32000 --device cuda --compare       # 4x the default model's length
    python recipes/long_recall.py --model /path/to/llama --tokens 128000 --device cuda --offload
"""

from __future__ import annotations

import argparse
import random
import sysconfig
import time
from pathlib import Path

import torch

import longkit
from longkit import LMInfiniteConfig
from longkit.config import MemoryConfig


def filler(tok, n_tokens: int, seed: int) -> list[int]:
    """``n_tokens`` ids of stdlib sources (top-level ``.py`` files in name order), from a seed-chosen offset."""
    ids: list[int] = []
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        ids += tok(p.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
        if len(ids) >= 3 * n_tokens:
            break
    start = random.Random(seed).randrange(0, max(1, len(ids) - n_tokens))
    return ids[start:start + n_tokens]


def main(argv: list[str] | None = None) -> dict[str, str]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF model directory (default: the embedded SmolLM2-135M)")
    ap.add_argument("--tokens", type=int, default=12000, help="filler tokens in the prompt")
    ap.add_argument("--depth", type=float, default=0.5, help="where the key sits, as a fraction of the filler")
    ap.add_argument("--seed", type=int, default=0, help="picks the key and the filler's offset")
    ap.add_argument("--n-global", type=int, default=10)
    ap.add_argument("--n-local", type=int, default=2048, help="LM-Infinite window")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--topk", type=int, default=16, help="blocks retrieved per query chunk and KV head")
    ap.add_argument("--offload", action="store_true", help="blocks in pinned host memory, an LRU cache on the GPU")
    ap.add_argument("--compare", action="store_true", help="also answer with LM-Infinite alone")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model is None:
        from longkit.models import default_model_dir

        args.model = str(default_model_dir())
    tok = AutoTokenizer.from_pretrained(args.model)
    tok.model_max_length = 1 << 30
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    model = model.to(args.device).eval()

    key = str(random.Random(args.seed).randint(10000, 99999))
    fill = filler(tok, args.tokens, args.seed)
    cut = int(args.depth * len(fill))
    # "secret number", not "pass key": in Python sources "pass" is a keyword, which misleads the model
    body = (tok.decode(fill[:cut]) + f"\nThe secret number is {key}. Remember it. {key} is the secret number.\n"
            + tok.decode(fill[cut:]))
    messages = [{"role": "user", "content": "There is a secret number hidden in the text below. Find it.\n\n" + body
                 + "\nWhat is the secret number?"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + "The secret number is"
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], device=args.device)[None]
    print(f"prompt: {ids.shape[1]} tokens (pretraining length {model.config.max_position_embeddings}), key {key} at "
          f"depth {args.depth}")

    lm = LMInfiniteConfig(n_global=args.n_global, n_local=args.n_local)
    mem = MemoryConfig(block_size=args.block_size, topk=args.topk, offload=args.offload)
    runs = {"LM-Infinite + memory": dict(lm_infinite=lm, memory=mem)}
    if args.compare:
        runs["LM-Infinite"] = dict(lm_infinite=lm)
    answers = {}
    for name, features in runs.items():
        with longkit.patched(model, **features):
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                     return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
            dt = time.perf_counter() - t0
        answer = tok.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)
        cache = out.past_key_values
        size = cache.nbytes() if hasattr(cache, "nbytes") else {}
        mib = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in size.items())
        print(f"{name:>22}: {'FOUND' if key in answer else 'missed'} {answer!r}  ({dt:.1f} s"
              + (f"; cache {mib}" if mib else "") + ")")
        answers[name] = answer
    return answers


if __name__ == "__main__":
    main()
