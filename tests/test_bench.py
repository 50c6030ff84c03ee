"""Fast tests of the benchmark harness (tasksieve.bench) and the kv_window family, CPU only.

The kv_window family runs with tiny shapes and tiny ceilings, so the whole file stays well under
20 s on 2 cores; the real shapes are for `python -m tasksieve.bench`.
"""

from __future__ import annotations

import csv
import time

import pytest
import torch

from tasksieve import reference
from tasksieve.evaluation import bench

TINY = dict(N=96, H=4, Hk=2, D=16, A=8, window=4, layers=2, budget=0.3)
TINY_B2 = dict(TINY, B=2, share=False, reduce="mean")


@pytest.fixture(scope="module")
def tiny_ceilings():
    return bench.measure_ceilings("cpu", quick=True, copy_mib=4, matmul_n=64)


def test_time_fn_cpu_sane():
    x = torch.randn(256, 256)
    t = bench.time_fn(lambda: x @ x, device="cpu", warmup=2, reps=9)
    assert set(t) >= {"median_ms", "p20_ms", "p80_ms"}
    assert t["reps"] == 9
    assert 0 < t["p20_ms"] <= t["median_ms"] <= t["p80_ms"] < 10_000


def test_time_fn_measures_sleep():
    t = bench.time_fn(lambda: time.sleep(0.004), device="cpu", warmup=1, reps=5)
    assert 3.5 <= t["median_ms"] < 200


def test_time_fn_rotates_inputs():
    seen = []
    bench.time_fn(lambda a: seen.append(a), device="cpu", warmup=2, reps=4,
                  args=[(1,), (2,), (3,)])
    assert seen == [1, 2, 3, 1, 2, 3]


def test_time_fn_time_cap_stops_early():
    t = bench.time_fn(lambda: time.sleep(0.01), device="cpu", warmup=0, reps=1000,
                      max_time_s=0.05, min_reps=3)
    assert 3 <= t["reps"] < 50


def test_quantile_interpolates():
    vals = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert bench._quantile(vals, 0.5) == 3.0
    assert bench._quantile(vals, 0.2) == pytest.approx(1.8)
    assert bench._quantile(vals, 0.8) == pytest.approx(4.2)
    assert bench._quantile([7.0], 0.2) == 7.0


def test_device_description_cpu():
    name = bench.device_name("cpu")
    n = torch.get_num_threads()
    assert f"({n} thread{'' if n == 1 else 's'})" in name
    assert bench.device_tag("cpu") == "cpu"


def test_ceilings_cpu(tiny_ceilings):
    assert tiny_ceilings["copy_gbps"] > 0 and tiny_ceilings["matmul_tflops"] > 0
    cases = [r["case"] for r in tiny_ceilings["rows"]]
    assert cases == ["copy_bandwidth", "matmul"]


def test_make_row_and_outputs(tmp_path, tiny_ceilings):
    ctx = bench.make_context("cpu", quick=True, ceilings=tiny_ceilings)
    t = {"median_ms": 2.0, "p20_ms": 1.5, "p80_ms": 2.5, "reps": 5}
    tb = {"median_ms": 6.0, "p20_ms": 5.0, "p80_ms": 7.0, "reps": 5}
    row = bench.make_row(ctx, family="demo", case="copy|like", impl="op", t=t, baseline="torch",
                         t_base=tb, dtype=torch.float32, shape="N8", nbytes=4e6, flops=2e9,
                         ceiling="copy", check="exact")
    assert row["speedup"] == pytest.approx(3.0)
    assert row["gbps"] == pytest.approx(2.0)  # 4 MB in 2 ms
    assert row["tflops"] == pytest.approx(1.0)
    assert row["pct_ceiling"] == pytest.approx(100 * 2.0 / tiny_ceilings["copy_gbps"])
    assert row["dtype"] == "float32" and row["device"] == ctx.device_name

    rows = tiny_ceilings["rows"] + [row]
    prov = bench.provenance(quick=True)
    csv_path = bench.write_csv(rows, tmp_path / "x.csv", prov)
    with open(csv_path) as f:
        got = list(csv.DictReader(f))
    assert len(got) == 3
    for col in ("device", "torch_version", "tasksieve_version", "git_commit", "timestamp"):
        assert col in got[0] and got[-1][col] != ""
    assert got[-1]["speedup"] == "3"

    table = bench.format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows)
    assert len({line.count("|") for line in lines}) == 1  # the '|' in a case name is escaped
    md = bench.write_markdown(rows, tmp_path / "x.md", prov, "title").read_text()
    assert "| 3.00x |" in md and prov["torch_version"] in md

    pytest.importorskip("matplotlib")
    png = bench.write_plot(rows, tmp_path / "x.png", "title")
    assert png is not None and png.stat().st_size > 1000


def test_families_registry():
    assert "kv_window" in bench.FAMILIES
    mod = bench.load_family("kv_window")
    assert callable(mod.run)
    with pytest.raises(KeyError):
        bench.load_family("nope")


def test_kv_window_tiny_run(tmp_path, tiny_ceilings):
    res = bench.run_benchmarks("cpu", quick=True, only=["kv_window"], out=tmp_path,
                               family_kwargs={"kv_window": {"shapes": [TINY, TINY_B2]}},
                               ceilings=tiny_ceilings, log=lambda *a: None)
    assert res["errors"] == {}
    rows = [r for r in res["rows"] if r["family"] == "kv_window"]
    cases = [r["case"] for r in rows]
    per_shape = ["window_scores", "select_windows", "gather_windows", "gather_windows_",
                 "group_total", "group_total_vs_prefill"]
    assert cases == per_shape * 2
    for r in rows:
        assert r["ms"] > 0 and r["base_ms"] > 0 and r["speedup"] > 0
        assert r["dtype"] == "float32" and "N96" in r["shape"] and r["baseline"]
    for shape_rows in (rows[:6], rows[6:]):
        by_case = {r["case"]: r for r in shape_rows}
        assert "MISMATCH" not in by_case["window_scores"]["check"]
        assert by_case["select_windows"]["check"] == "idx equal"
        assert by_case["gather_windows"]["check"] == "exact"
        assert by_case["gather_windows_"]["check"] == "exact"
        assert by_case["gather_windows"]["gbps"] > 0
        assert by_case["gather_windows"]["pct_ceiling"] > 0
    assert rows[2]["baseline"].startswith("index_select")  # shared selection, batch 1
    assert rows[8]["baseline"].startswith("torch.gather")  # per-head selection, batch 2
    assert by_case["group_total_vs_prefill"]["kind"] == "ratio"

    paths = res["paths"]
    assert paths["csv"].name == "kv_window_cpu_quick.csv"
    with open(paths["csv"]) as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        got = list(reader)
    for col in bench.ROW_FIELDS + bench.PROVENANCE_FIELDS:
        assert col in header
    assert len(got) == len(res["rows"])
    assert all(g["mode"] == "quick" and g["torch_version"] == torch.__version__ for g in got)
    assert paths["md"].exists()


def test_kv_window_shape_arithmetic():
    mod = bench.load_family("kv_window")
    s = mod.Shape(N=8192)
    assert (s.nw, s.tail) == (1020, 32)
    assert s.kept <= round(0.12 * 8192) and s.kept > round(0.12 * 8192) - s.window
    odd = mod.Shape(N=100, A=8, window=8)  # 92 = 11 windows + 4 left over
    assert (odd.nw, odd.tail) == (11, 12)
    rows = reference.gathered_token_index(100, torch.tensor([[[0, 3]]], dtype=torch.int32), 8, 12)
    assert rows[0, 0].tolist() == list(range(8)) + list(range(24, 32)) + list(range(88, 100))


def test_cli(tmp_path, monkeypatch, capsys, tiny_ceilings):
    assert bench.main(["--list"]) == 0
    assert "kv_window" in capsys.readouterr().out
    assert bench.main(["--only", "nope", "--device", "cpu", "--out", str(tmp_path)]) == 2
    if not torch.cuda.is_available():
        assert bench.main(["--device", "cuda"]) == 2

    # The full CLI path with tiny shapes and ceilings.
    mod = bench.load_family("kv_window")
    monkeypatch.setattr(mod, "default_shapes", lambda device, quick: [mod.Shape(**TINY)])
    monkeypatch.setattr(bench, "measure_ceilings", lambda device, quick: tiny_ceilings)
    rc = bench.main(["--quick", "--device", "cpu", "--only", "kv_window", "--out",
                     str(tmp_path), "--no-plot"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| kv_window | gather_windows |" in out
    assert (tmp_path / "kv_window_cpu_quick.csv").exists()
    assert not (tmp_path / "kv_window_cpu_quick.png").exists()


def test_flex_pipeline_tiny_run(tmp_path, tiny_ceilings):
    """Every stage row is timed and the pattern note reflects a real selection."""
    shape = {"N": 640, "H": 4, "Hk": 2, "D": 64, "bs": 64}
    res = bench.run_benchmarks("cpu", quick=True, only=["flex_pipeline"], out=tmp_path,
                               family_kwargs={"flex_pipeline": {"shapes": [shape]}},
                               ceilings=tiny_ceilings, plot=False, log=lambda *a: None)
    assert res["errors"] == {}
    rows = {r["case"]: r for r in res["rows"] if r["family"] == "flex_pipeline"}
    assert list(rows) == ["estimate", "classify", "select", "attention", "total", "selection_share",
                          "attention_throughput", "attention_vs_flex"]
    for case in ("estimate", "classify", "select", "attention", "total"):
        assert rows[case]["ms"] > 0 and rows[case]["base_ms"] > 0
    ratio = float(rows["attention"]["note"].split("%")[0])
    assert 0 < ratio <= 100
    share = rows["selection_share"]
    assert 0 < share["ms"] and share["base_ms"] == rows["total"]["ms"]
    assert rows["attention_throughput"]["tflops"] > 0
    assert "skipped on CPU" in rows["attention_vs_flex"]["note"]


def test_sanitizer_workload_self_test():
    """bench/sanitize_ops.py (the compute-sanitizer workload of device_check.sh) runs every case on the CPU
    kernels and matches: a broken case would otherwise only show up on a lent GPU."""
    import importlib.util

    path = bench.BENCH_DIR / "sanitize_ops.py"
    spec = importlib.util.spec_from_file_location("tasksieve_sanitize_ops", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--device", "cpu"]) == 0
