"""Prompt log-probabilities of a token sequence in vLLM, run by ``hf_posenc.export``'s verify in the Python
that has vLLM (it pins its own transformers). Standalone: imports vLLM only.

Usage: python vllm_probe.py REQUEST.json REPLY.json, REQUEST = {"model": folder, "ids": [...]}.
"""

import json
import os
import sys


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(sys.argv[1]) as handle:
        request = json.load(handle)
    ids = request["ids"]
    llm = LLM(
        model=request["model"],
        dtype="float32",
        enforce_eager=True,
        max_model_len=len(ids) + 1,
        seed=0,
        # on the CPU backend this is the share of host memory vLLM reserves (weights + KV cache)
        gpu_memory_utilization=request.get("memory_fraction", 0.25),
    )
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    out = llm.generate([TokensPrompt(prompt_token_ids=ids)], params)[0]
    logprobs = [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], ids[1:], strict=True)]
    with open(sys.argv[2], "w") as handle:
        json.dump({"logprobs": logprobs}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    # vLLM's engine teardown can abort the process ("terminate called without an active exception") after
    # the work is done: leave without it
    os._exit(0)


if __name__ == "__main__":  # vLLM starts a spawned engine process
    main()
