"""Serves one exported checkpoint folder with vLLM's engine and writes greedy tokens and logprobs as JSON.

    python -m tests.vllm.premoe_driver MODEL_DIR OUT.json [--tp N] [--max-tokens 8] [--prompts P.json]

Nothing of tasksieve runs in the engine (TASKSIEVE_FLEXPREFILL must be unset): this is plain vLLM on a folder
``tasksieve prune`` / ``tasksieve export`` wrote. Each engine is its own process (vLLM spawns workers; engines must
not share process state). Greedy, fp32, eager. The prompts are given as token ids, so vLLM and transformers see
exactly the same input.
"""

from __future__ import annotations

import argparse
import json
import random


def prompt_ids(vocab: int, seed: int = 0, lengths=(5, 17, 40, 64)) -> list[list[int]]:
    """Fixed prompts as token ids in [4, vocab) (no special tokens), mixed lengths, one batch."""
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(n)] for n in lengths]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--prompts", default=None, help="JSON list of token-id lists (default: prompt_ids(vocab))")
    args = ap.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(args.model, dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
              tensor_parallel_size=args.tp)
    if args.prompts:
        with open(args.prompts) as f:
            ids = json.load(f)
    else:
        ids = prompt_ids(llm.llm_engine.model_config.hf_config.vocab_size)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, logprobs=1, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], params, use_tqdm=False)
    rows = []
    for p, o in zip(ids, outs):
        c = o.outputs[0]
        rows.append({"prompt": p, "tokens": list(c.token_ids),
                     "logprobs": [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]})
    with open(args.out, "w") as f:
        json.dump({"rows": rows, "num_experts": _experts(llm)}, f)


def _experts(llm) -> int:
    cfg = llm.llm_engine.model_config.hf_config
    return int(getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", 0))


if __name__ == "__main__":
    main()
