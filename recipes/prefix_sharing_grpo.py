"""GRPO with LoRA where the completions of one prompt share its computation: ``PrefixSharingGRPOTrainer``.

``PrefixSharingGRPOTrainer`` is ``trl.GRPOTrainer`` plus ``prefix_sharing=PrefixSharingConfig(...)``: in the
training forward (and the reference / old-policy forwards when TRL runs them) the ``num_generations`` completions
of a prompt compute the prompt once; generation is unchanged. The recipe prints the loss and reward per step and
what sharing saved (``longkit.hf_patches.prefix_sharing.patch.last_plan``).

``steps_per_generation=1``: TRL generates ``per_device_train_batch_size x steps_per_generation`` completions,
shuffles them and cuts them into ``steps_per_generation`` forwards. With 1, every completion of a prompt is in the
same forward, so its prompt is computed once instead of ``num_generations`` times; with more, a prompt's
completions are spread over several forwards and share less (each forward still shares what it holds).

Data (local, deterministic): the documented functions of recipes/prefix_sharing_dpo.py (Python standard library on
this machine); each prompt is an instruction, then a function's ``def`` line(s) and docstring: the model continues
the function. Reward (rule-based, deterministic, on the completion text): half the fraction of its non-empty
lines that parse as Python on their own (a line ending in ``:`` gets `` pass`` appended: ``if x:`` counts, a
broken expression does not), plus half if it contains ``return``.

Models as in recipes/prefix_sharing_dpo.py: ``--model tiny`` (default; random 2-layer Llama + word tokenizer over
the data: the reward stays near its random level, the recipe shows the mechanics), ``--model default``
(SmolLM2-135M-Instruct) or a model directory / Hub name. LoRA on the attention projections; ``--beta > 0`` adds
TRL's KL term, whose reference forward (the policy with adapters disabled) shares prompts too.

    # CPU, toy size (< 1 min): 2 prompts x 4 completions per step
    python recipes/prefix_sharing_grpo.py
    python recipes/prefix_sharing_grpo.py --model default --max-steps 10 --max-completion-length 48
    # real sizes, one GPU (bf16 there; TRL generates with transformers unless you configure vLLM):
    python recipes/prefix_sharing_grpo.py --model meta-llama/Llama-3.2-1B-Instruct --num-generations 8 \\
        --prompts-per-step 4 --max-completion-length 256 --prompt-lines 60 --lora-r 16 --lr 1e-5 --max-steps 200
    # an 8B model: --model meta-llama/Llama-3.1-8B-Instruct --prompts-per-step 2 (LoRA: the 8B weights stay frozen)
"""

from __future__ import annotations

import argparse
import ast
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prefix_sharing_dpo import (  # noqa: E402
    PlanReport,
    add_common_arguments,
    build_model,
    lora_and_sharing,
    stdlib_functions,
    train_and_report,
    trainer_precision,
)

INSTRUCTION = "# Continue this function from the Python standard library.\n"


def _parses(line: str) -> bool:
    code = line.strip()
    if code.endswith(":"):
        code += " pass"
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


def python_reward(completions: list[str], **_: Any) -> list[float]:
    """Per completion: 0.5 x (fraction of non-empty lines that parse alone) + 0.5 x (contains ``return``)."""
    out = []
    for text in completions:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        valid = sum(map(_parses, lines)) / len(lines) if lines else 0.0
        out.append(0.5 * valid + 0.5 * float("return" in text))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(ap, "prompt group")
    ap.add_argument("--num-generations", type=int, default=4, help="completions per prompt (G)")
    ap.add_argument("--prompts-per-step", type=int, default=2, help="prompts per step (x G completions)")
    ap.add_argument("--max-completion-length", type=int, default=24)
    ap.add_argument("--max-steps", type=int, default=8)
    ap.add_argument("--beta", type=float, default=0.0, help="KL coefficient (TRL's default 0: no reference forward)")
    args = ap.parse_args(argv)

    import datasets
    from trl import GRPOConfig

    from longkit.hf_patches.prefix_sharing import PrefixSharingGRPOTrainer

    datasets.disable_progress_bars()
    funcs = stdlib_functions(args.examples, args.prompt_lines, completion_lines=2)
    prompts = [INSTRUCTION + f["head"] + "\n" for f in funcs]
    # the tiny model's vocabulary also covers real bodies, so it can generate code-like pieces
    model, tok = build_model(args.model, prompts + [f["body"] for f in funcs], args.seed)
    print(f"{len(prompts)} prompts from the standard library, e.g. {funcs[0]['name']}:\n{prompts[0]}---")
    report = PlanReport(model, metrics=("reward", "reward_std"))
    config = GRPOConfig(
        output_dir=args.output_dir or tempfile.mkdtemp(prefix="longkit_grpo_"), max_steps=args.max_steps,
        per_device_train_batch_size=args.prompts_per_step * args.num_generations,
        num_generations=args.num_generations,
        steps_per_generation=1,  # all completions of a prompt in one forward (module docstring)
        max_completion_length=args.max_completion_length, learning_rate=args.lr, beta=args.beta, temperature=1.0,
        logging_steps=1, report_to=[], save_strategy="no", seed=args.seed, disable_tqdm=True,
        **trainer_precision())
    trainer = PrefixSharingGRPOTrainer(
        model=model, reward_funcs=python_reward, args=config,
        train_dataset=datasets.Dataset.from_dict({"prompt": prompts}), processing_class=tok,
        callbacks=[report.callback], **lora_and_sharing(args))
    return train_and_report(trainer, report, args.save)

if __name__ == "__main__":
    main()
