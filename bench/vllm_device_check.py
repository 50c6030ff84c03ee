"""The vLLM plugin on a GPU (step `vllm` of bench/device_check.sh): vLLM's FlashAttention backend with and without
tasksieve's FlexPrefill on a tiny random Llama (head_dim 64, bf16), through tests/vllm/plugin_driver.py.

Exit 98 when vLLM is not installed (the GPU machine may have no official vLLM build): the step is then reported
as skipped, not failed. Checks: gamma = 1 gives vLLM's own greedy tokens (bf16: logprobs within 0.05) with the
sparse path taken; gamma 0.9 computes fewer blocks than causal.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    if importlib.util.find_spec("vllm") is None:
        print("vLLM is not installed on this machine: the plugin's GPU check is skipped (CPU: make test-vllm)")
        return 98
    from tasksieve.evaluation.models import tiny_model
    from tasksieve.evaluation.tiny import tiny_tokenizer

    work = Path(tempfile.mkdtemp(prefix="ts-vllm-"))
    model = tiny_model("llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                       max_position_embeddings=2048)
    model.save_pretrained(work / "model")
    tiny_tokenizer().save_pretrained(work / "model")
    runs = {}
    for name, flex in (("dense", None), ("g1", {"gamma": 1.0, "block_size": 64, "dense_below": 128}),
                       ("sparse", {"gamma": 0.9, "block_size": 64, "min_budget": 128, "dense_below": 128})):
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        env.pop("TASKSIEVE_FLEXPREFILL", None)
        if flex:
            env["TASKSIEVE_FLEXPREFILL"] = json.dumps(flex)
        out = work / f"{name}.json"
        proc = subprocess.run([sys.executable, "-m", "tests.vllm.plugin_driver", str(work / "model"), str(out),
                               "--dtype", "bfloat16", "--chunk", "512", "--scenarios", "batch,decode_mix"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode:
            print(proc.stderr[-3000:])
            return 1
        runs[name] = json.loads(out.read_text())
    ok = True
    for sc in ("batch", "decode_mix"):
        for i, (a, b) in enumerate(zip(runs["dense"][sc], runs["g1"][sc])):
            diff = max((abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])), default=0.0)
            same = a["tokens"] == b["tokens"]
            print(f"gamma=1 {sc}[{i}]: tokens equal {same}, logprob diff {diff:.2e}")
            ok &= same and diff < 0.05
    for name in ("g1", "sparse"):
        s = runs[name]["stats"]
        print(f"{name}: {s}")
    ok &= runs["g1"]["stats"]["sparse_requests"] > 0
    ok &= runs["sparse"]["stats"]["computed_blocks"] < runs["sparse"]["stats"]["causal_blocks"]
    print("vllm plugin on GPU:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
