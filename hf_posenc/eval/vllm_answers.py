"""Greedy answers and prompt log-probabilities from vLLM for ``hf-posenc eval --engine vllm``, run in the
Python that has vLLM (it pins its own transformers). Standalone: imports vLLM and the standard library only.

Usage: python vllm_answers.py CONFIG.json REPLY_FD. CONFIG = {"model": folder, "max_model_len": n,
"dtype": "float32", "memory_fraction": 0.25}. The model is loaded once; then each line of stdin is a request
and each answer one JSON line on file descriptor REPLY_FD (stdout is left to vLLM's logs):

- ``{"op": "generate", "prompts": [[ids]], "max_new_tokens": n, "stop_token_ids": [ids]}`` ->
  ``{"outputs": [[ids]]}``: greedy continuations, all prompts in one batch, stopping only at
  ``stop_token_ids`` (the ids transformers' ``generate`` stops at), token ids in and out (no tokenizer here);
- ``{"op": "logprobs", "windows": [[ids]]}`` -> ``{"logprobs": [[float]]}``: log p(ids[t+1] | ids[:t+1]);
- ``{"op": "quit"}`` or end of stdin: leave.

The first line written is ``{"ready": true, "version": vllm.__version__}`` once the engine is up; a failed
request answers ``{"error": "..."}`` and the process goes on.
"""

import json
import os
import sys
import traceback


def serve(llm, request: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    if request["op"] == "generate":
        params = SamplingParams(
            max_tokens=request["max_new_tokens"],
            temperature=0.0,
            ignore_eos=True,  # stop only at the ids transformers stops at
            stop_token_ids=request.get("stop_token_ids") or [],
            detokenize=False,
        )
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"]]
        outs = llm.generate(prompts, params, use_tqdm=False)
        return {"outputs": [list(out.outputs[0].token_ids) for out in outs]}
    if request["op"] == "logprobs":
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
        windows = request["windows"]
        outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in windows], params, use_tqdm=False)
        return {
            "logprobs": [
                [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], ids[1:], strict=True)]
                for out, ids in zip(outs, windows, strict=True)
            ]
        }
    raise ValueError(f"unknown op {request['op']!r}")


def main() -> None:
    import vllm
    from vllm import LLM

    with open(sys.argv[1]) as handle:
        config = json.load(handle)
    reply = os.fdopen(int(sys.argv[2]), "w")

    def send(message: dict) -> None:
        reply.write(json.dumps(message) + "\n")
        reply.flush()

    llm = LLM(
        model=config["model"],
        dtype=config.get("dtype", "float32"),
        enforce_eager=True,
        max_model_len=config["max_model_len"],
        seed=0,
        skip_tokenizer_init=True,  # token ids in and out: hf_posenc tokenizes and decodes as transformers does
        # on the CPU backend this is the share of host memory vLLM reserves (weights + KV cache)
        gpu_memory_utilization=config.get("memory_fraction", 0.25),
    )
    send({"ready": True, "version": vllm.__version__})
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("op") == "quit":
            break
        try:
            send(serve(llm, request))
        except Exception as exc:  # answered, so the caller reports it with vLLM's log
            send({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]})
    reply.close()
    # vLLM's engine teardown can abort the process after the work is done: leave without it
    os._exit(0)


if __name__ == "__main__":  # vLLM starts a spawned engine process
    main()
