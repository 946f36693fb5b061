"""Run one vLLM ``LLM`` for the integration tests, in its own process: ``python _llm_job.py job.json out.json``.

A fresh process per engine keeps tests independent (vLLM loads plugins once per process and spawns
its engine core and workers from here) and lets a test read the stderr of a failing start.

job.json: ``{"model", "dtype", "max_model_len", "speculative_config", "additional_config",
"rounds": [[{"prompt_token_ids": [...], "max_tokens": n}, ...], ...], "drafter_state": bool}``.
Each round is one ``LLM.generate`` call (greedy, ignore_eos). out.json gets the output token ids per
round, vLLM's speculative-decoding counters, and (``drafter_state``) each worker's drafter snapshot.
"""

from __future__ import annotations

import json
import sys


def main(job_path: str, out_path: str) -> None:
    job = json.load(open(job_path))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import longkit.vllm_plugins as plugins
    from longkit.vllm_plugins.spec import spec_decode_counters

    llm = LLM(
        model=job["model"],
        dtype=job.get("dtype", "float32"),
        max_model_len=job.get("max_model_len", 1024),
        enforce_eager=True,
        seed=0,
        disable_log_stats=False,
        speculative_config=job.get("speculative_config"),
        additional_config=job.get("additional_config") or {},
        max_num_seqs=job.get("max_num_seqs", 8),
    )
    result: dict = {"plugin_registered_main": plugins.is_registered(), "rounds": []}
    for rnd in job["rounds"]:
        prompts = [TokensPrompt(prompt_token_ids=r["prompt_token_ids"]) for r in rnd]
        params = [SamplingParams(temperature=0.0, max_tokens=r["max_tokens"], ignore_eos=True) for r in rnd]
        outs = llm.generate(prompts, params, use_tqdm=False)
        result["rounds"].append([list(o.outputs[0].token_ids) for o in outs])
    result["spec"] = spec_decode_counters(llm)
    if job.get("drafter_state"):
        from longkit.vllm_plugins.spec.proposer import worker_drafter_state

        # One tiny extra request makes the engine deliver the last round's finish notices to the
        # worker (vLLM sends them with the next scheduler step), so freed state can be checked.
        llm.generate([TokensPrompt(prompt_token_ids=[1, 2, 3])], SamplingParams(max_tokens=1), use_tqdm=False)
        result["drafter"] = llm.collective_rpc(worker_drafter_state)
    json.dump(result, open(out_path, "w"))


if __name__ == "__main__":  # vLLM spawns workers: the guard is required
    main(sys.argv[1], sys.argv[2])
