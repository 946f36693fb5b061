"""DPO with LoRA where each preference pair's prompt is computed once: ``PrefixSharingDPOTrainer``.

``PrefixSharingDPOTrainer`` is ``trl.DPOTrainer`` plus one keyword, ``prefix_sharing=PrefixSharingConfig(...)``:
the policy's and the reference's forwards compute the prompt a chosen and a rejected row share once (same loss,
metrics and gradients as ``trl.DPOTrainer`` up to rounding). The recipe prints the loss per step and what sharing
saved (``longkit.hf_patches.prefix_sharing.patch.last_plan``: tokens in the batch vs tokens computed).

Data (local, deterministic, no download): functions of the Python standard library on this machine that have a
docstring. For each one, ``prompt`` = its ``def`` line(s) and docstring (at most ``--prompt-lines`` lines),
``chosen`` = the next ``--completion-lines`` non-empty lines of its real body, ``rejected`` = as many body lines of
another function of the set (re-indented to fit): the model is taught to prefer the function's own code.

Models: ``--model tiny`` (default) is a random 2-layer Llama with a word-level tokenizer built from the data
(words, punctuation runs, spaces and newlines are tokens, so decoding gives the text back): it runs anywhere in
under a minute and shows the mechanics, not learning. ``--model default`` is longkit's embedded SmolLM2-135M-Instruct
(:func:`longkit.models.load_default`) with its own tokenizer; any other value is a transformers model directory or
Hub name. LoRA (PEFT) is on the attention projections; the reference is the policy with its adapters disabled
(TRL's default with ``peft_config``), which shares prompts too.

    # CPU, toy size (< 1 min)
    python recipes/prefix_sharing_dpo.py
    python recipes/prefix_sharing_dpo.py --model default --max-steps 20 --batch-size 4
    # real sizes, one GPU (bf16 is switched on there): a 1B model, TRL's default batch of 8 pairs, 1024 tokens
    python recipes/prefix_sharing_dpo.py --model meta-llama/Llama-3.2-1B-Instruct --batch-size 8 \\
        --max-length 1024 --prompt-lines 60 --completion-lines 20 --lora-r 16 --lr 5e-5 --max-steps 200
    # an 8B model: the same with --model meta-llama/Llama-3.1-8B-Instruct --batch-size 4 --lora-r 16
    # (LoRA keeps the 8B weights frozen: ~16 GB of bf16 weights + activations, gradient checkpointing on by default)

Prefix sharing pays where prompts are long relative to responses; with ``--no-pack`` each pair is one padded row
instead of one packed row for the whole batch. See ``benchmarks/prefix_sharing.py`` for throughput numbers.
"""

from __future__ import annotations

import argparse
import ast
import re
import sysconfig
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import torch

MODULES = ("textwrap.py", "argparse.py", "inspect.py", "shutil.py", "tarfile.py", "subprocess.py", "typing.py",
           "zipfile.py", "pathlib.py", "functools.py", "ftplib.py", "imaplib.py", "smtplib.py", "calendar.py")
SPECIAL = ["<pad>", "</s>", "<s>", "<unk>"]
PIECES = r"\w+|[^\w\s]+|\n| +|\t"  # the tiny tokenizer's pieces; concatenated they give the text back


def stdlib_functions(limit: int, prompt_lines: int, completion_lines: int) -> list[dict[str, str]]:
    """Up to ``limit`` documented stdlib functions as ``{"name", "head", "body", "indent"}``: ``head`` = the
    ``def`` line(s) + docstring (cut to ``prompt_lines``, no final newline), ``body`` = the next
    ``completion_lines`` non-empty lines (with their indentation, newline-terminated), ``indent`` = the body's
    indentation. Deterministic (a fixed module list, functions in source order)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out: list[dict[str, str]] = []
    for name in MODULES:
        path = stdlib / name
        if not path.is_file():
            continue
        src = path.read_text(encoding="utf-8", errors="replace")
        lines = src.splitlines()
        funcs = [n for n in ast.walk(ast.parse(src)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for fn in sorted(funcs, key=lambda n: n.lineno):
            if ast.get_docstring(fn) is None or len(fn.body) < 2:
                continue
            doc_end = fn.body[0].end_lineno
            head = lines[fn.lineno - 1:doc_end][:prompt_lines]
            body = [ln for ln in lines[doc_end:fn.end_lineno] if ln.strip()][:completion_lines]
            if len(body) < completion_lines or len(head) < 3:
                continue
            indent = body[0][:len(body[0]) - len(body[0].lstrip())]
            out.append({"name": f"{name[:-3]}.{fn.name}", "head": "\n".join(head), "body": "\n".join(body) + "\n",
                        "indent": indent})
            if len(out) == limit:
                return out
    if len(out) < 2:
        raise SystemExit(f"found {len(out)} documented functions in {stdlib}; lower --completion-lines")
    return out


def reindent(body: str, indent: str) -> str:
    """``body`` moved to start at ``indent`` (its relative indentation kept)."""
    return textwrap.indent(textwrap.dedent(body), indent)


def preference_pairs(funcs: list[dict[str, str]]) -> dict[str, list[str]]:
    """prompt = head; chosen = the function's own next lines; rejected = those of the function half the list away.

    The prompt ends before the newline that ends the docstring and the responses start with it: BPE tokenizers merge
    a newline with the next line's indentation, so a prompt ending in a newline would not be a token prefix of
    prompt + response (TRL then cuts the prompt where they diverge)."""
    n = len(funcs)
    rejected = [funcs[(i + n // 2) % n] for i in range(n)]
    return {"prompt": [f["head"] for f in funcs], "chosen": ["\n" + f["body"] for f in funcs],
            "rejected": ["\n" + reindent(r["body"], f["indent"]) for f, r in zip(funcs, rejected)]}


def word_tokenizer(texts: list[str]) -> Any:  # noqa: ANN401
    """A word-level tokenizer over the pieces of ``texts`` (+ pad/eos/bos/unk), decoding back to the same text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in re.findall(PIECES, t)})
    vocab = {w: i for i, w in enumerate(SPECIAL + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PIECES), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)


def build_model(name: str, texts: list[str], seed: int) -> tuple[Any, Any]:
    """``(model, tokenizer)``: ``tiny`` (random Llama + word tokenizer over ``texts``), ``default`` (SmolLM2) or a
    transformers model directory / Hub name. fp32 on CPU, bf16 on a GPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if name == "tiny":
        tok = word_tokenizer(texts)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg).to(dtype), tok
    if name == "default":
        from longkit.models import load_default

        model, tok = load_default(dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="sdpa")
        tok = AutoTokenizer.from_pretrained(name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


class PlanReport:
    """Counts what prefix sharing saved over every shared forward of ``model`` (policy and reference passes), and
    prints the loss of each logged step with the last forward's plan (a ``transformers.TrainerCallback``)."""

    def __init__(self, model: Any, metrics: tuple[str, ...] = ()) -> None:  # noqa: ANN401
        from transformers import TrainerCallback

        from longkit.hf_patches.prefix_sharing.patch import last_plan

        self.last_plan = last_plan
        self.model = model
        self.metrics = metrics  # logged values printed beside the loss
        self.totals = {"shared_forwards": 0, "other_forwards": 0, "tokens": 0, "padded": 0, "computed": 0}
        self.losses: list[float] = []
        model.base_model.register_forward_hook(self._count, with_kwargs=True)  # the backbone longkit patched
        report = self

        class _Callback(TrainerCallback):
            def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **_: Any) -> None:  # noqa: ANN401
                if logs and "loss" in logs:
                    report.losses.append(float(logs["loss"]))
                    shown = "".join(f"  {k} {logs[k]:.4g}" for k in report.metrics if k in logs)
                    print(f"step {state.global_step}: loss {logs['loss']:.4f}{shown}  | {report.describe()}",
                          flush=True)

        self.callback = _Callback()

    def _count(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:  # noqa: ANN401
        plan = self.last_plan(self.model)
        if plan is None:
            self.totals["other_forwards"] += 1
            return
        self.totals["shared_forwards"] += 1
        self.totals["tokens"] += plan.tokens
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.totals["padded"] += plan.tokens if ids is None else ids.numel()
        self.totals["computed"] += plan.input_ids.numel()

    def describe(self) -> str:
        plan = self.last_plan(self.model)
        if plan is None:
            return "last forward ran unshared"
        computed = plan.input_ids.numel()
        return (f"last forward: {len(plan.groups)} groups, {plan.tokens} tokens in the batch, {computed} computed "
                f"({1 - computed / plan.tokens:.0%} saved)")

    def summary(self) -> str:
        t = self.totals
        if not t["shared_forwards"]:
            return f"no forward shared a prefix ({t['other_forwards']} forwards ran unshared)"
        return (f"{t['shared_forwards']} shared forwards: {t['tokens']} tokens in their batches ({t['padded']} "
                f"padded), {t['computed']} computed: {1 - t['computed'] / t['tokens']:.0%} fewer than the batch's "
                f"tokens, {1 - t['computed'] / t['padded']:.0%} fewer than the padded batch the stock forward "
                f"computes; {t['other_forwards']} forwards ran unshared (generation steps, batches with no shared "
                "prefix)")


def trainer_precision() -> dict[str, Any]:
    """TRL's device arguments: CPU when there is no GPU, bf16 where the GPU has it."""
    if not torch.cuda.is_available():
        return {"use_cpu": True, "bf16": False}
    return {"bf16": torch.cuda.is_bf16_supported()}


def add_common_arguments(ap: argparse.ArgumentParser, unit: str) -> None:
    """The options both prefix-sharing recipes take (``unit``: what one packed group is, for the help texts)."""
    ap.add_argument("--model", default="tiny", help="'tiny' (random, < 1 min on CPU), 'default' (SmolLM2-135M) or a "
                                                    "model directory / Hub name")
    ap.add_argument("--examples", type=int, default=64, help=f"{unit}s taken from the standard library")
    ap.add_argument("--prompt-lines", type=int, default=16, help="prompt: def line(s) + docstring, at most this many")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--min-shared-tokens", type=int, default=16, help="PrefixSharingConfig.min_shared_tokens")
    ap.add_argument("--no-pack", action="store_true", help=f"one padded row per {unit} instead of one packed row")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-dir", help="TRL's output directory (default: a temporary one)")
    ap.add_argument("--save", help="save the LoRA adapter here at the end")


def lora_and_sharing(args: argparse.Namespace) -> dict[str, Any]:
    """The trainer keywords both recipes pass: LoRA on the attention projections and the prefix-sharing options."""
    from peft import LoraConfig

    from longkit.hf_patches.prefix_sharing import PrefixSharingConfig

    return {"peft_config": LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
            "prefix_sharing": PrefixSharingConfig(min_shared_tokens=args.min_shared_tokens, pack=not args.no_pack)}


def train_and_report(trainer: Any, report: PlanReport, save: str | None) -> dict[str, Any]:  # noqa: ANN401
    """Train with the report's one line per step instead of TRL's log dictionaries; save the adapter if asked."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    trainer.train()
    print(report.summary())
    if save:
        trainer.save_model(save)
        print(f"saved the LoRA adapter to {save}")
    return {"losses": report.losses, **report.totals}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(ap, "preference pair")
    ap.add_argument("--completion-lines", type=int, default=4, help="chosen / rejected: this many body lines")
    ap.add_argument("--max-steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=4, help="preference pairs per step")
    ap.add_argument("--max-length", type=int, default=512, help="tokens per row (TRL cuts the end)")
    ap.add_argument("--beta", type=float, default=0.1, help="DPO's beta")
    args = ap.parse_args(argv)

    import datasets
    from trl import DPOConfig

    from longkit.hf_patches.prefix_sharing import PrefixSharingDPOTrainer

    datasets.disable_progress_bars()
    funcs = stdlib_functions(args.examples, args.prompt_lines, args.completion_lines)
    data = preference_pairs(funcs)
    model, tok = build_model(args.model, data["prompt"] + data["chosen"] + data["rejected"], args.seed)
    print(f"{len(funcs)} preference pairs from the standard library, e.g. {funcs[0]['name']}:\n"
          f"--- prompt\n{data['prompt'][0]}\n--- chosen{data['chosen'][0]}--- rejected{data['rejected'][0]}---")
    report = PlanReport(model, metrics=("rewards/accuracies", "rewards/margins"))
    config = DPOConfig(
        output_dir=args.output_dir or tempfile.mkdtemp(prefix="longkit_dpo_"), max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, learning_rate=args.lr, beta=args.beta,
        max_length=args.max_length, logging_steps=1, report_to=[], save_strategy="no", seed=args.seed,
        disable_tqdm=True, **trainer_precision())
    trainer = PrefixSharingDPOTrainer(
        model=model, args=config, train_dataset=datasets.Dataset.from_dict(data), processing_class=tok,
        callbacks=[report.callback], **lora_and_sharing(args))
    return train_and_report(trainer, report, args.save)

if __name__ == "__main__":
    main()
