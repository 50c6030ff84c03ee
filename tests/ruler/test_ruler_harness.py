"""The RULER harness end to end: lm-eval's niah_single_1 on a tiny random Llama with the character tokenizer, one
sample, dense and WindowKV, written as table, CSV, PNG and per-sample JSONL (``make test-ruler`` in .venv-ruler)."""

from __future__ import annotations

import csv
import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

from tasksieve.evaluation import models, niah, ruler  # noqa: E402
from tasksieve.evaluation.tiny import tiny_tokenizer  # noqa: E402


def test_parse_tasks_and_methods():
    assert ruler.parse_tasks("niah_single_1,vt,cwe") == ["niah_single_1", "ruler_vt", "ruler_cwe"]
    with pytest.raises(ValueError, match="offline"):
        ruler.parse_tasks("niah_single_2")
    with pytest.raises(ValueError, match="unknown task"):
        ruler.parse_tasks("mmlu")
    m = niah.parse_methods(ruler.method_specs("dense,windowkv@0.12,flexprefill:0.95:min_budget=2048,block_size=64"))
    assert list(m) == ["dense", "windowkv:0.12", "flexprefill:0.95:min_budget=2048,block_size=64"]
    assert m["dense"] is None and m["windowkv:0.12"].budget == 0.12 and m[list(m)[2]].min_budget == 2048


def test_ruler_end_to_end_tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = tiny_tokenizer()
    model = models.tiny_model("llama")
    methods = niah.parse_methods(ruler.method_specs("dense,windowkv:0.5"))
    # RULER sizes prompts with the (character) tokenizer: 1024 tokens leave ~730 for the prompt.
    steps = []
    rows, records = ruler.run_ruler(model, tok, methods, tasks=["niah_single_1"], lengths=[1024], samples=1,
                                    max_gen_toks=8, tokenizer_dir=tmp_path / "tok", progress=False,
                                    on_step=lambda rows, recs: steps.append(len(recs)))
    assert steps == [1, 2]
    assert [r["method"] for r in rows] == ["dense", "windowkv:0.5"]
    for r in rows:
        assert r["task"] == "niah_single_1" and r["length"] == 1024 and r["samples"] == 1
        assert 0.0 <= r["score"] <= 1.0
    assert [r["score"] for r in records] == [r["score"] for r in rows]  # lm-eval's per-sample metric
    assert rows[1]["kv_kept_pct"] < 100.0  # the press ran inside lm-eval's generate
    assert len(records) == 2 and records[0]["prompt_sha"] == records[1]["prompt_sha"]  # the same sample
    assert not ruler.hf.is_patched(model)

    cfg = ruler.run_config(model, tok, samples=1, max_gen_toks=8, tasks=["niah_single_1"], lengths=[1024])
    paths = ruler.write_results(rows, records, tmp_path / "out", cfg)
    with paths["csv"].open() as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == ruler.CSV_FIELDS
    assert [g["method"] for g in got] == ["dense", "windowkv:0.5"]
    assert all(0.0 <= float(g["score"]) <= 1.0 for g in got)
    md = paths["md"].read_text()
    assert "| niah_single_1 | 1024 |" in md and "windowkv:0.5" in md and "capped at 8 tokens" in md
    assert paths["png"].stat().st_size > 1000
    lines = [json.loads(x) for x in paths["jsonl"].read_text().splitlines()]
    assert {x["method"] for x in lines} == {"dense", "windowkv:0.5"} and all(x["references"] for x in lines)
    from importlib.metadata import version

    assert json.loads(paths["json"].read_text())["versions"]["lm_eval"] == version("lm_eval")


def test_resume_keeps_previous_answers_and_runs_the_rest(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = tiny_tokenizer()
    model = models.tiny_model("llama")
    kw = dict(tasks=["niah_single_1"], lengths=[1024], samples=1, max_gen_toks=8, tokenizer_dir=tmp_path / "tok",
              progress=False)
    _, first = ruler.run_ruler(model, tok, niah.parse_methods(ruler.method_specs("dense")), **kw)
    # a marker answer proves the dense record is reused, not recomputed
    prev = [dict(first[0], answer="kept from before")]
    steps = []
    rows, records = ruler.run_ruler(model, tok, niah.parse_methods(ruler.method_specs("dense,windowkv:0.5")),
                                    previous=prev, on_step=lambda r, recs: steps.append(len(recs)), **kw)
    assert steps == [2]  # only windowkv ran
    assert [r["method"] for r in records] == ["dense", "windowkv:0.5"]
    assert records[0]["answer"] == "kept from before"
    assert records[1]["prompt_sha"] == records[0]["prompt_sha"]
    with pytest.raises(ValueError, match="max_gen_toks"):
        ruler.run_ruler(model, tok, niah.parse_methods(ruler.method_specs("dense")), previous=prev,
                        **dict(kw, max_gen_toks=4))
