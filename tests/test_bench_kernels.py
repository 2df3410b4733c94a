"""Smoke test of bench/kernels.py: runs main() in --quick mode on two small shapes and checks the JSON.

It checks the schema and the error numbers only; speed is never asserted (CI machines are noisy).
"""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHAPES = "linear_m154_k768_n320,conv3x3_2x640x16x16_n640"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", REPO / "bench" / "kernels.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    bench = _load_bench()
    path = tmp_path_factory.mktemp("bench") / "kernels.json"
    lines = []
    result = bench.main(["--quick", "--reps", "2", "--shapes", SHAPES, "--json", str(path)], log=lines.append)
    return bench, result, json.loads(path.read_text()), lines


def test_json_written_matches_return_value(bench_run):
    _, result, data, _ = bench_run
    assert set(data) >= {"meta", "records", "targets"}
    assert data["records"] == json.loads(json.dumps(result["records"]))


def test_meta(bench_run):
    _, _, data, _ = bench_run
    meta = data["meta"]
    for key, typ in (("date", str), ("command", str), ("device", str), ("torch", str), ("threads", int),
                     ("cpu_model", str), ("reps", int), ("quick", bool)):
        assert isinstance(meta[key], typ), key
    assert meta["device"] == "cpu" and meta["quick"] is True and meta["threads"] >= 1


def test_records_schema(bench_run):
    _, _, data, _ = bench_run
    records = data["records"]
    names = {r["name"] for r in records}
    assert names == set(SHAPES.split(","))
    expected_modes = {("fp32", False), ("bf16", False), ("w8a8", False), ("w4a8", False), ("w4a8", True)}
    for name in names:
        assert {(r["mode"], r["keep_unpacked"]) for r in records if r["name"] == name} == expected_modes
    for r in records:
        assert isinstance(r["name"], str)
        assert r["kind"] in ("linear", "conv")
        assert isinstance(r["shape"], dict) and r["shape"]
        assert r["mode"] in ("fp32", "bf16", "fp16", "w8a8", "w4a8")
        assert isinstance(r["keep_unpacked"], bool)
        assert isinstance(r["backend"], str) and r["backend"]
        assert isinstance(r["ms"], float) and r["ms"] > 0 and math.isfinite(r["ms"])
        assert isinstance(r["ratio_vs_fp32"], float) and r["ratio_vs_fp32"] > 0
        assert isinstance(r["rel_err"], float) and 0 <= r["rel_err"] < 1
        if r["mode"] in ("fp32", "bf16", "fp16"):
            assert r["bytes_ratio_vs_fp16"] is None
            assert r["backend"] == "torch"
        else:
            assert isinstance(r["bytes_ratio_vs_fp16"], float) and 0 < r["bytes_ratio_vs_fp16"] < 1
        if r["mode"] == "fp32":
            assert r["ratio_vs_fp32"] == pytest.approx(1.0)
            assert r["rel_err"] < 1e-5
        if r["mode"] == "w8a8":
            assert r["rel_err"] < 0.02
        if r["mode"] == "w4a8":
            assert r["rel_err"] < 0.12
            assert isinstance(r["time_vs_w8a8"], float) and r["time_vs_w8a8"] > 0


def test_targets_and_table_printed(bench_run):
    _, _, data, lines = bench_run
    statuses = {t["target"]: t["status"] for t in data["targets"]}
    assert all(s in ("PASS", "FAIL", "SKIP") for s in statuses.values())
    # Shapes not run are reported as SKIP, not silently passed or failed.
    assert statuses["W8A8 linear_m2048_k320_n1280 ratio_vs_fp32 >= 3.0"] == "SKIP"
    assert statuses["W8A8 rel_err <= 0.02 (all shapes)"] == "PASS"
    text = "\n".join(lines)
    assert "| shape | kind | mode |" in text
    assert sum(line.startswith(("PASS:", "FAIL:", "SKIP:")) for line in lines) == len(data["targets"])


def test_shape_filter_rejects_unknown_names():
    bench = _load_bench()
    with pytest.raises(SystemExit):
        bench.select_shapes("no_such_shape", quick=True)
    assert [s.name for s in bench.select_shapes("linear_m154_k768_n320", quick=True)] == ["linear_m154_k768_n320"]
    quick_names = {s.name for s in bench.select_shapes(None, quick=True)}
    full_names = {s.name for s in bench.select_shapes(None, quick=False)}
    assert quick_names < full_names
