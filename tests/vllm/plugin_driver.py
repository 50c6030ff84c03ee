"""Runs one vLLM engine over the plugin's test scenarios and writes what it produced as JSON.

    python -m tests.vllm.plugin_driver MODEL_DIR OUT.json [--tp N] [--chunk TOKENS] [--scenarios a,b,...]

The plugin is configured by the environment (TASKSIEVE_FLEXPREFILL), so every configuration is its own process;
the tests compare the JSON files of two runs. Greedy, fp32, eager.
"""

from __future__ import annotations

import argparse
import json
import os
import random


def prompts(seed: int = 0) -> list[str]:
    """Char-level prompts (the tiny tokenizer: one token per character) of mixed lengths: short ones run dense,
    long ones sparse."""
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz ,."
    lengths = (40, 700, 300, 1000)
    return ["".join(rng.choice(alphabet) for _ in range(n)) for n in lengths]


def _record(outputs) -> list[dict]:
    rows = []
    for o in outputs:
        c = o.outputs[0]
        rows.append({
            "prompt_len": len(o.prompt_token_ids),
            "prompt_token_ids": list(o.prompt_token_ids),
            "tokens": list(c.token_ids),
            "logprobs": [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)],
            "prompt_logprobs": [None if lp is None else lp[t].logprob
                                for t, lp in zip(o.prompt_token_ids, o.prompt_logprobs or [])],
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=None, help="max_num_batched_tokens (forces chunked prefill)")
    ap.add_argument("--scenarios", default="batch")
    ap.add_argument("--max-tokens", type=int, default=6)
    ap.add_argument("--dtype", default="float32", help="bfloat16 / float16 on CUDA (the kernels' dtypes there)")
    ap.add_argument("--eager", type=int, default=1, help="0: let vLLM capture CUDA graphs (decode-only steps)")
    args = ap.parse_args()

    from vllm import LLM, SamplingParams

    kw = dict(dtype=args.dtype, enforce_eager=bool(args.eager), max_model_len=2048, seed=0, tensor_parallel_size=args.tp,
              enable_prefix_caching=True, worker_extension_cls="tasksieve.integrations.vllm.StatsExtension")
    if args.chunk:
        kw.update(max_num_batched_tokens=args.chunk, enable_chunked_prefill=True)
    llm = LLM(args.model, **kw)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, logprobs=1, prompt_logprobs=1)
    result = {}
    ps = prompts()
    for scenario in args.scenarios.split(","):
        if scenario == "batch":  # mixed short / long prompts in one batch
            result["batch"] = _record(llm.generate(ps, params, use_tqdm=False))
        elif scenario == "prefix":  # the second prompt extends the first: a prefix-cache hit, the rest paged
            # (no prompt logprobs here: vLLM recomputes the whole prompt of a request that asks for them)
            plain = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, logprobs=1)
            base = ps[3][:900]
            llm.generate([base], plain, use_tqdm=False)
            result["prefix"] = _record(llm.generate([base + ps[1][:150]], plain, use_tqdm=False))
        elif scenario == "decode_mix":  # a request decoding while a long prompt prefills in the same step
            engine = llm.llm_engine
            engine.add_request("decoding", ps[0], SamplingParams(max_tokens=24, temperature=0.0, logprobs=1))
            engine.step()
            engine.add_request("long", ps[1], params)
            done = {}
            while engine.has_unfinished_requests():
                for o in engine.step():
                    if o.finished:
                        done[o.request_id] = o
            rec = _record([done["long"]])
            c = done["decoding"].outputs[0]
            rec.append({"tokens": list(c.token_ids),
                        "logprobs": [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]})
            result["decode_mix"] = rec
        else:
            raise SystemExit(f"unknown scenario {scenario!r}")
    if os.environ.get("TASKSIEVE_FLEXPREFILL"):
        from tasksieve.integrations.vllm import stats

        s = stats(llm)
        s.pop("per_rank")
        result["stats"] = s
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
