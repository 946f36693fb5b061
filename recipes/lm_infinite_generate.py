"""Answer a question about a document longer than the model's pretraining length, with LM-Infinite.

Loads a causal LM (default: the embedded SmolLM2-135M-Instruct, 8k pretraining length), puts a long text
(default: a Python standard-library source file) in the prompt, and generates with
``longkit.apply_patches(model, lm_infinite=...)``: Λ-shaped attention with the distance limit and a bounded
KV cache of ``n_global + n_local`` tokens per layer. Prints the answer, the time and the cache size.

    python recipes/lm_infinite_generate.py --help
    python recipes/lm_infinite_generate.py --tokens 2000 --n-local 512           # quick, CPU
    python recipes/lm_infinite_generate.py --model /path/to/llama --tokens 32000 --device cuda --decode cuda_graph
"""

from __future__ import annotations

import argparse
import time

import torch

import longkit
from longkit import LMInfiniteConfig


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF model directory (default: the embedded SmolLM2)")
    ap.add_argument("--document", default=None, help="text file (default: a stdlib source file)")
    ap.add_argument("--tokens", type=int, default=12000, help="document tokens kept in the prompt")
    ap.add_argument("--question", default="Summarise in one sentence what the code above implements.")
    ap.add_argument("--n-global", type=int, default=10)
    ap.add_argument("--n-local", type=int, default=None, help="default: max_position_embeddings")
    ap.add_argument("--decode", default="eager", choices=["eager", "static", "cuda_graph"],
                    help="cuda_graph: fixed-shape cache + CUDA-graph decode steps (CUDA only)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, args.dtype)
    if args.model is None:
        from longkit.models import default_model_dir

        args.model = str(default_model_dir())
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
    if args.document:
        text = open(args.document, encoding="utf-8", errors="replace").read()
    else:
        from longkit.models import find_text_document

        _, text = find_text_document(args.tokens, tok)
    doc_ids = tok(text, add_special_tokens=False).input_ids[: args.tokens]
    messages = [{"role": "user", "content": tok.decode(doc_ids) + "\n\n" + args.question}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = prompt["input_ids"].to(args.device)

    longkit.apply_patches(model, lm_infinite=LMInfiniteConfig(n_global=args.n_global, n_local=args.n_local,
                                                                  decode=args.decode))
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                             do_sample=False, return_dict_in_generate=True)
    dt = time.perf_counter() - t0
    answer = tok.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)
    cache = out.past_key_values
    print(f"prompt: {ids.shape[1]} tokens (pretraining length {model.config.max_position_embeddings})")
    print(f"cache: {type(cache).__name__}, {cache.get_seq_length()} tokens seen, "
          f"{getattr(cache, 'stored_tokens', lambda: cache.get_seq_length())()} stored per layer")
    print(f"time: {dt:.1f} s\nanswer: {answer}")
    return answer


if __name__ == "__main__":
    main()
