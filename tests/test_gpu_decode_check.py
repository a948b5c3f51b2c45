"""The CPU side of benchmarks/gpu_decode_check.py (the lead runs it on the H200): arguments, the
compact reference, the report / winners logic on synthetic results, and (slow) the whole flow on the
tiny shape under the Triton interpreter."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from moesaic.kernels.reference import moe_experts_reference
from moesaic.kernels.triton import launch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_decode_check.py"
spec = importlib.util.spec_from_file_location("gpu_decode_check", SCRIPT)
gdc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gdc)


def test_help_and_argument_errors(capsys, tmp_path):
    with pytest.raises(SystemExit) as ex:
        gdc.main(["--help"])
    assert ex.value.code == 0 and "fused small-T path" in capsys.readouterr().out
    for argv, msg in [(["--budget-s", "0"], "budget"), (["--max-cands", "0"], "max-cands"),
                      (["--device", "cpu"], "only --shapes tiny"), (["--shapes", "Llama"], "invalid choice")]:
        with pytest.raises(SystemExit) as ex:
            gdc.main([str(tmp_path / "o")] + argv)
        assert ex.value.code == 2 and msg in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            gdc.main([str(tmp_path / "o")])
        assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written on a bad command line


def test_compact_reference_matches_the_reference():
    g = torch.Generator().manual_seed(0)
    x, w13, w2 = torch.randn(5, 16, generator=g), torch.randn(6, 24, 16, generator=g), torch.randn(6, 16, 12, generator=g)
    ids = torch.tensor([[0, 5], [-1, 2], [2, 2], [7, -1], [-1, -1]])
    w = torch.rand(5, 2, generator=g)
    torch.testing.assert_close(gdc.reference(x, w13, w2, ids, w), moe_experts_reference(x, w13, w2, ids, w))


def _row(t, floor, **labs):
    row = {"T": t, "key": f"T{t}_D2048_F768_E128_K8_bfloat16", "floor_us": floor, "log": []}
    for lab, (cfg, us) in labs.items():
        row[lab] = {"config": cfg.to_dict(), "us": us}
    if labs:
        lab, (cfg, us) = min(labs.items(), key=lambda p: p[1][1])
        row["winner"] = {"label": lab, "config": cfg.to_dict(), "us": us}
    return row


def test_report_picks_winners_and_merges_the_shipped_table(tmp_path, capsys):
    fused = launch.fused_candidates()[0]
    dec = launch.heuristic(1, 2048, 768, 128, 8)
    ok = {"T": 1, "drop": 0.0, "config": fused.to_dict(), "ok": True, "call_spread": 3e-7}
    skipped = {"T": 8, "drop": 0.2, "config": fused.to_dict(), "ok": False, "error": "skipped: budget"}
    failed = {"T": 8, "drop": 0.0, "config": fused.to_dict(), "ok": False, "rel_err": [0.5, 0.5, 0.5]}
    res = {"shape": "Qwen3-30B-A3B", "device_tag": "NVIDIA_H200", "check": [ok, skipped, failed],
           "time": [_row(1, 17.8, fused=(fused, 20.0), decode=(dec, 37.1)), _row(8, 120.0)]}
    (tmp_path / "Qwen3-30B-A3B.json").write_text(json.dumps(res))
    out = gdc.report(tmp_path, ["Qwen3-30B-A3B", "OLMoE-1B-7B"], {"Qwen3-30B-A3B/time": 0})
    text = capsys.readouterr().out
    assert "| Qwen3-30B-A3B | 1 | 17.8 | - | 37.1 (0.48) | 20.0 (0.89) |" in text
    assert "1/2 fused runs within 1e-2 of the reference (1 skipped: budget)" in text and "FAILED" in text
    key = "T1_D2048_F768_E128_K8_bfloat16"
    assert out["checks_failed"] == 1 and set(out["winners"]) == {key}
    win = json.loads((tmp_path / "winners_NVIDIA_H200.json").read_text())
    assert launch.MoEConfig.from_dict(win["entries"][key]) == fused and win["entries"][key]["time_us"] == 20.0
    merged = json.loads((tmp_path / "NVIDIA_H200.json").read_text())["entries"]
    assert merged[key]["path"] == "fused" and len(merged) > 1  # the shipped entries are kept


@pytest.mark.slow
def test_smoke_run_on_cpu(tmp_path, capsys):
    """The whole flow (two phases in subprocesses) on the tiny shape under the interpreter (~1 min)."""
    gdc.main([str(tmp_path), "--device", "cpu", "--shapes", "tiny", "--max-cands", "1", "--budget-s", "150"])
    res = json.loads((tmp_path / "decode_check.json").read_text())
    assert res["checks_failed"] == 0 and res["process_codes"] == {"tiny/check": 0, "tiny/time": 0}
    assert {r["T"] for r in res["shapes"][0]["time"]} == {1, 8}
