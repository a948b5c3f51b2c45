"""benchmarks/moe_layer.py on CPU (the peers on the tiny shape): alternating repeats, the median reported, the
JSON written, and a bad --repeats refused."""

from __future__ import annotations

import json
import statistics

import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("moe_layer")


def test_repeats_alternate_and_report_the_median(bench, tmp_path, monkeypatch):
    order = []
    real = bench.bench

    def spy(fn, device, rep_ms=100):
        order.append(fn)
        return real(fn, device, rep_ms)

    monkeypatch.setattr(bench, "bench", spy)
    out = tmp_path / "ml.json"
    bench.main(["--device", "cpu", "--tokens", "1", "--repeats", "3", "--rep-ms", "2", "--json", str(out)])
    row = json.loads(out.read_text())["rows"][0]
    timed = {n: m for n, m in row["impls"].items() if "time_s" in m}
    assert "sorted" in timed
    for m in timed.values():
        assert len(m["times_s"]) == 3 and m["time_s"] == statistics.median(m["times_s"])
        assert m["efficiency"] == pytest.approx(row["floor_s"] / m["time_s"])
        assert m["rel_err_vs_reference"] < 1e-4  # fp32 on CPU
    n = len(timed)
    rounds = order[2:]  # after the two ceiling measurements (copy, matmul)
    assert len(rounds) == 3 * n and rounds[:n] == rounds[n:2 * n] == rounds[2 * n:]  # every implementation once a round


def test_bad_repeats_is_refused(bench):
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--repeats", "0"])
