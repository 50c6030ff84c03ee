"""PreMoe exports served by vLLM's CPU engine with no tasksieve code in the engine (``make test-vllm``; fp32, tiny
random models made here).

A tiny Mixtral and a tiny Qwen3-MoE go through the documented commands, ``tasksieve profile`` (two small text tasks)
-> ``tasksieve prune --keep 0.5`` (4 of 8 experts in every layer; prune exports the folder). vLLM serves the folder
(tests/vllm/premoe_driver.py, one engine per process, TASKSIEVE_FLEXPREFILL unset) and its greedy tokens and
logprobs must equal transformers' on the same folder, at tensor parallel 1 and 2. Four engine starts in all.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import importlib.util

import pytest
import torch

# No conftest here: a second conftest.py would replace the suite's own `conftest` module. vLLM's CPU engine only
# (on a GPU machine bench/vllm_device_check.py checks the plugin), and only where vLLM is really installed: without
# it, this folder itself would import as a namespace package named "vllm".
_VLLM = importlib.util.find_spec("vllm")
if _VLLM is None or _VLLM.origin is None or torch.cuda.is_available():
    pytest.skip("needs vLLM's CPU engine (make test-vllm)", allow_module_level=True)


from tasksieve import premoe  # noqa: E402
from tasksieve.cli import main as cli  # noqa: E402
from tasksieve.evaluation.tiny import tiny_moe_model, tiny_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-4
MAX_TOKENS = 8
# vLLM CPU's attention takes head sizes 32, 64, 80, ...: the tiny configs' head_dim 16 is widened to 32
FAMILIES = {"mixtral": dict(hidden_size=128), "qwen3_moe": dict(hidden_size=128, head_dim=32)}


def _texts(alphabet: str, seed: int, n: int = 6, length: int = 300) -> str:
    rng = random.Random(seed)
    return "\n\n".join("".join(rng.choice(alphabet) for _ in range(length)) for _ in range(n))


def prompts(vocab: int = 128, seed: int = 0) -> list[list[int]]:
    """Token-id prompts (no special ids), mixed lengths, one batch: vLLM and transformers see the same input."""
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(n)] for n in (5, 17, 40, 64, 100)]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """family -> the pruned folder ``tasksieve prune`` wrote (profile on two tasks, keep 0.5, task ``code``)."""
    root = tmp_path_factory.mktemp("premoe-vllm")
    tasks = {"prose": _texts("abcdefghij klmnopqrst,.", 1), "code": _texts("0123456789()[]{}=+-*:_\n", 2)}
    for name, text in tasks.items():
        (root / f"{name}.txt").write_text(text)
    out = {}
    for family, overrides in FAMILIES.items():
        base = root / f"{family}-base"
        tiny_moe_model(family, **overrides).save_pretrained(base)
        tiny_tokenizer().save_pretrained(base)
        store = root / f"{family}-store.safetensors"
        assert cli(["profile", "--model", str(base), "--task", f"prose={root / 'prose.txt'}",
                    "--task", f"code={root / 'code.txt'}", "--out", str(store), "--seq-len", "128",
                    "--no-progress"]) == 0
        pruned = root / f"{family}-pruned"
        assert cli(["prune", "--model", str(base), "--store", str(store), "--keep", "0.5", "--task", "code",
                    "--out", str(pruned)]) == 0
        out[family] = pruned
    return out


@torch.no_grad()
def hf_greedy(folder, ids_list, n: int) -> list[dict]:
    """transformers on the folder: greedy tokens (no EOS stop, like vLLM's ignore_eos) and each step's full
    log-probability row (to tell a tie from a difference)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True).eval()
    rows = []
    for prompt in ids_list:
        ids, toks, lps = list(prompt), [], []
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float()
            lp = torch.log_softmax(logits, dim=-1)
            t = int(lp.argmax())
            toks.append(t)
            lps.append(lp)
            ids.append(t)
        rows.append({"tokens": toks, "lp_rows": lps})
    return rows


def run_vllm(folder, out_dir, name, ids_list, tp=1) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("TASKSIEVE_FLEXPREFILL", None)  # plain vLLM: nothing of tasksieve in the engine
    if tp > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % (os.cpu_count() or 1)) for i in range(tp))
    prompts_file = Path(out_dir) / f"{name}.prompts.json"
    prompts_file.write_text(json.dumps(ids_list))
    out = Path(out_dir) / f"{name}.json"
    cmd = [sys.executable, "-m", "tests.vllm.premoe_driver", str(folder), str(out), "--tp", str(tp),
           "--max-tokens", str(MAX_TOKENS), "--prompts", str(prompts_file)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


def assert_vllm_equals_hf(hf_rows, vllm_rows, what: str) -> None:
    """Tokens equal, logprobs within TOL. A different token is allowed only where HF itself has a tie (the two
    tokens' logprobs within TOL); the continuations then differ, so that row is compared up to there."""
    assert len(hf_rows) == len(vllm_rows)
    ties = 0
    for i, (h, v) in enumerate(zip(hf_rows, vllm_rows)):
        assert len(v["tokens"]) == MAX_TOKENS, f"{what}[{i}]: vLLM stopped early"
        for step, (tv, lpv) in enumerate(zip(v["tokens"], v["logprobs"])):
            row, th = h["lp_rows"][step], h["tokens"][step]
            diff = abs(float(row[tv]) - lpv)
            assert diff <= TOL, f"{what}[{i}] step {step}: logprob of token {tv} differs by {diff:.3g}"
            if tv != th:
                gap = float(row[th] - row[tv])
                assert gap <= TOL, (f"{what}[{i}] step {step}: vLLM picked {tv}, HF {th} (HF logprob gap {gap:.3g}, "
                                    "not a tie)")
                ties += 1
                break
    assert ties <= 1, f"{what}: {ties} rows diverged at ties; expected the tokens to be equal"


@pytest.fixture(scope="module")
def hf_refs(exports):
    ids = prompts()
    return {family: hf_greedy(folder, ids, MAX_TOKENS) for family, folder in exports.items()}


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_pruned_export_vllm_equals_hf(family, tp, exports, hf_refs, tmp_path):
    """The pruned folder, unchanged, in vLLM: 4 experts per layer (config and weights), HF's tokens and logprobs."""
    folder = exports[family]
    cfg = json.loads((folder / "config.json").read_text())
    attr = "num_local_experts" if family == "mixtral" else "num_experts"
    assert cfg[attr] == 4 and cfg["tasksieve_original_num_experts"] == 8
    assert premoe.check_vllm(folder, tensor_parallel_size=tp)["num_experts"] == 4
    run = run_vllm(folder, tmp_path, f"{family}-tp{tp}", prompts(), tp=tp)
    assert run["num_experts"] == 4, "vLLM did not read the pruned expert count"
    assert_vllm_equals_hf(hf_refs[family], run["rows"], f"{family} tp{tp}")


def test_non_uniform_keep_is_refused_naming_the_fix(tmp_path):
    """A per-layer keep (4 experts in layer 0, 6 in layer 1) has no HF config and no vLLM layout: export and
    check_vllm refuse it naming the family, the per-layer counts and the uniform-keep fix; nothing is written."""
    model = tiny_moe_model("mixtral", hidden_size=128)
    rng = random.Random(0)
    texts = ["".join(rng.choice("abcdef 0123") for _ in range(200)) for _ in range(3)]
    store = premoe.profile(model, {"t": texts}, tiny_tokenizer(), progress=False)
    premoe.prune(model, store["t"], keep=[4, 6])
    for call in (lambda: premoe.export(model, tmp_path / "never"), lambda: premoe.check_vllm(model)):
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        for part in ("'mixtral'", "[4, 6]", "num_local_experts", "vLLM", "keep=0.5"):
            assert part in msg, (part, msg)
    assert not (tmp_path / "never").exists()
