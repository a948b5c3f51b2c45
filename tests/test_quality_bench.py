"""benchmarks/quality.py: the steps-to-reach rule, the lr choice, the table, and a real (tiny) end-to-end run
that writes the JSON and the PNG."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from moesaic.data.corpus import builtin_files


@pytest.fixture(scope="module")
def quality(load_benchmark):
    return load_benchmark("quality")


def test_steps_to_reach_first_evaluated_step_at_or_below_target(quality):
    curve = [[10, 5.0], [20, 4.2], [30, 3.9], [40, 4.0], [50, 3.7]]
    assert quality.steps_to_reach(curve, 4.2) == 20  # equal counts as reached
    assert quality.steps_to_reach(curve, 3.95) == 30  # first crossing, even if it goes back up later
    assert quality.steps_to_reach(curve, 3.7) == 50
    assert quality.steps_to_reach(curve, 3.69) is None
    assert quality.steps_to_reach([], 1.0) is None


def _run(model, lr, seed, final, curve, steps=50):
    return dict(model=model, lr=lr, seed=seed, steps=steps, final_val=final, val_curve=curve, active=1, total=2,
                seconds=1.0)


def test_summarize_picks_lr_by_mean_over_seeds_and_compares_seed_by_seed(quality):
    results = [
        # dense: lr 1e-3 wins on the mean (4.05 < 4.10) though seed 1 alone is better at 2e-3
        _run("dense", 1e-3, 0, 4.0, [[25, 4.5], [50, 4.0]]), _run("dense", 1e-3, 1, 4.1, [[25, 4.6], [50, 4.1]]),
        _run("dense", 2e-3, 0, 4.2, [[25, 4.4], [50, 4.2]]), _run("dense", 2e-3, 1, 4.0, [[25, 4.5], [50, 4.0]]),
        _run("moe", 1e-3, 0, 3.9, [[10, 4.6], [20, 4.05], [30, 3.99], [50, 3.9]]),
        _run("moe", 1e-3, 1, 4.2, [[10, 4.6], [20, 4.4], [30, 4.3], [50, 4.2]]),
        _run("moe", 2e-3, 0, 4.5, [[50, 4.5]]), _run("moe", 2e-3, 1, 4.5, [[50, 4.5]]),
    ]
    best = quality.summarize(results)
    assert best["dense"]["lr"] == 1e-3 and best["moe"]["lr"] == 1e-3
    assert best["dense"]["val_mean"] == pytest.approx(4.05)
    # seed 0 reaches dense seed 0's 4.0 at step 30 (60 %); seed 1 never reaches dense seed 1's 4.1
    assert [(x["seed"], x["step"], x["target"]) for x in best["moe"]["reach"]] == [(0, 30, 4.0), (1, None, 4.1)]
    assert best["moe"]["reach"][0]["fraction"] == pytest.approx(0.6)
    # interpolated between (20, 4.05) and (30, 3.99): the crossing of 4.0 at step 28.33
    assert best["moe"]["reach"][0]["fraction_interpolated"] == pytest.approx((20 + 10 * 0.05 / 0.06) / 50)
    assert best["moe"]["reach"][1]["fraction_interpolated"] is None
    table = quality.format_table(best)
    assert "s0: 30/50 (60%; interp. 56.7%)" in table and "s1: never" in table


def test_recipes_keep_the_active_size_and_unknown_models_fail(quality):
    moe, dense = quality.model_config("small", "moe"), quality.model_config("small", "dense")
    assert dense.num_experts == 0 and moe.num_experts == 16 and moe.router == "sigmoid_topk"
    active = moe.top_k * moe.expert_ffn + moe.shared_ffn
    for name in ("mixtral", "fine-shared", "fine-sigmoid"):
        c = quality.model_config("small", name)
        assert c.top_k * c.expert_ffn + c.shared_ffn == active and c.d_model == moe.d_model
    assert quality.model_config("small", "fine-sigmoid").router == "sigmoid_topk"
    assert quality.model_config("small", "mixtral").z_loss_coef == 0.0
    h = quality.model_config("h200", "fine-shared")  # the H200 runs' shapes
    assert (h.num_experts, h.top_k, h.expert_ffn, h.shared_ffn) == (32, 6, 256, 512)
    with pytest.raises(ValueError, match="unknown model"):
        quality.model_config("small", "nope")


def test_tiny_end_to_end_writes_json_and_plot(quality, tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    files = sorted((p for p in builtin_files() if 2000 < p.stat().st_size < 12000), key=lambda p: p.name)[:20]
    for i, p in enumerate(files):
        shutil.copy(p, corpus / f"{i:03d}_{p.name}")
    monkeypatch.setenv("MOESAIC_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "res" / "q.json"
    a = quality.parser().parse_args([
        "--preset", "tiny", "--models", "moe,dense", "--steps", "3", "--batch-size", "2", "--seq-len", "16",
        "--lrs", "1e-2", "--seeds", "0,1", "--eval-every", "1", "--eval-windows", "2", "--device", "cpu",
        "--data", str(corpus), "--in-process", "--json", str(out), "--work", str(tmp_path / "work")])
    report = quality.run_benchmark(a, log=lambda s: None)
    saved = json.loads(out.read_text())
    assert len(saved["runs"]) == 4 and set(saved["summary"]) == {"moe", "dense"}
    for r in saved["runs"]:
        assert [s for s, _ in r["val_curve"]] == [1, 2, 3] and r["final_val"] == r["val_curve"][-1][1]
        assert r["flops_per_token"] > 0
        assert not Path(r["out"]).exists()  # run folders are scratch, removed unless --keep-runs
    reach = saved["summary"]["moe"]["reach"]
    assert [x["seed"] for x in reach] == [0, 1]
    for x in reach:  # recomputed from the saved curves
        moe_run = next(r for r in saved["runs"] if r["model"] == "moe" and r["seed"] == x["seed"])
        assert x["step"] == quality.steps_to_reach(moe_run["val_curve"], x["target"])
    png = out.with_suffix(".png")
    assert report["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_merge_takes_earlier_runs_only_with_the_same_settings(quality, tmp_path):
    args = ["--steps", "100", "--batch-size", "16", "--seq-len", "128", "--lrs", "2e-3", "--seeds", "0",
            "--models", "fine-sigmoid"]
    earlier = vars(quality.parser().parse_args(args))
    runs = [_run("moe", 2e-3, 0, 4.0, [[100, 4.0]]), _run("fine-sigmoid", 2e-3, 0, 9.0, [[100, 9.0]])]
    prev = tmp_path / "prev.json"
    prev.write_text(json.dumps({"settings": earlier, "runs": runs, "command": "quality.py first"}))
    a = quality.parser().parse_args([*args, "--merge", str(prev)])
    got, commands = quality.merged_runs(a)
    assert [r["model"] for r in got] == ["moe", "fine-sigmoid"] and commands == ["quality.py first"]
    a = quality.parser().parse_args([args[0], "200", *args[2:], "--merge", str(prev)])
    with pytest.raises(ValueError, match="steps"):
        quality.merged_runs(a)


def test_budget_fraction_runs_get_their_own_shorter_schedule_and_compare_by_final_loss(quality, tmp_path):
    a = quality.parser().parse_args(["--models", "moe,dense", "--steps", "100", "--lrs", "1e-3", "--seeds", "0",
                                     "--budget-fractions", "0.7"])
    jobs = quality.make_jobs(a, tmp_path)
    by_name = {j["model"]: j for j in jobs}
    assert set(by_name) == {"moe", "dense", "moe@0.7"}  # no budget run of the dense twin
    assert by_name["moe@0.7"]["steps"] == 70 and by_name["moe@0.7"]["recipe"] == "moe"
    assert by_name["moe@0.7"]["warmup_steps"] == by_name["moe"]["warmup_steps"]  # same warmup, shorter cosine
    results = [_run("dense", 1e-3, 0, 4.0, [[50, 4.5], [100, 4.0]], steps=100),
               _run("moe", 1e-3, 0, 3.8, [[50, 4.2], [80, 4.0], [100, 3.8]], steps=100),
               _run("moe@0.7", 1e-3, 0, 3.95, [[35, 4.3], [70, 3.95]], steps=70)]
    best = quality.summarize(results)
    assert best["moe"]["reach"][0]["fraction"] == pytest.approx(0.8)
    short = best["moe@0.7"]["reach"][0]
    assert short["step"] == 70 and short["fraction"] == pytest.approx(0.7)  # a fraction of the dense steps
    assert "s0: 70/100 (70%;" in quality.format_table(best)
    with pytest.raises(ValueError, match="strictly between"):
        quality.make_jobs(quality.parser().parse_args(["--budget-fractions", "1.5"]), tmp_path)


def test_model_overrides_make_ablations_and_bad_fields_fail(quality):
    c = quality.model_config("h200", "moe:num_experts=32,routed_scaling_factor=1.0,router=softmax_topk")
    assert (c.num_experts, c.routed_scaling_factor, c.router) == (32, 1.0, "softmax_topk")
    assert c.top_k == quality.model_config("h200", "moe").top_k
    with pytest.raises(ValueError, match="field=value"):
        quality.model_config("h200", "moe:num_experts")
    with pytest.raises(ValueError):
        quality.model_config("h200", "moe:no_such_field=1")
    a = quality.parser().parse_args(["--models", "moe;moe:num_experts=32;dense", "--seeds", "0", "--lrs", "1e-3"])
    assert [j["model"] for j in quality.make_jobs(a, __import__("pathlib").Path("/tmp"))] == [
        "moe", "moe:num_experts=32", "dense"]


def test_sweep_seed_picks_each_lr_on_one_seed_then_trains_the_other_seeds_at_it(quality, tmp_path, monkeypatch):
    import moesaic.data.tokens as tokens

    monkeypatch.setattr(tokens, "prepare_data", lambda *a, **k: None)
    finals = {("moe", 1e-3): 3.9, ("moe", 2e-3): 3.8, ("dense", 1e-3): 4.0, ("dense", 2e-3): 4.1}
    calls = []

    def fake_run_all(jobs, parallel, in_process=False, log=print):
        calls.append(sorted((j["model"], j["lr"], j["seed"]) for j in jobs))
        return [_run(j["model"], j["lr"], j["seed"], finals[j["model"], j["lr"]] + 0.01 * j["seed"],
                     [[50, 4.5], [100, finals[j["model"], j["lr"]] + 0.01 * j["seed"]]], steps=100)
                | dict(tokens_per_step=8, flops_per_token=6, preset="small", data="x") for j in jobs]

    monkeypatch.setattr(quality, "run_all", fake_run_all)
    a = quality.parser().parse_args(["--models", "moe,dense", "--steps", "100", "--lrs", "1e-3,2e-3", "--seeds",
                                     "0,1,2", "--sweep-seed", "0", "--json", str(tmp_path / "q.json"),
                                     "--work", str(tmp_path / "w")])
    report = quality.run_benchmark(a, log=lambda s: None)
    assert calls[0] == sorted((m, lr, 0) for m in ("moe", "dense") for lr in (1e-3, 2e-3))  # the sweep, seed 0
    assert calls[1] == sorted([("moe", 2e-3, 1), ("moe", 2e-3, 2), ("dense", 1e-3, 1), ("dense", 1e-3, 2)])
    best = report["summary"]
    assert best["moe"]["lr"] == 2e-3 and best["dense"]["lr"] == 1e-3
    assert best["moe"]["sweep"] == {"0.001": 3.9, "0.002": 3.8}  # seed 0 alone
    assert sorted(best["moe"]["val_per_seed"]) == ["0", "1", "2"]
    with pytest.raises(ValueError, match="sweep-seed"):
        quality.make_jobs(quality.parser().parse_args(["--seeds", "0,1", "--sweep-seed", "5"]), tmp_path)


def test_merge_reuses_earlier_runs_and_runs_only_the_missing_jobs(quality, tmp_path, monkeypatch):
    """The budget-fraction runs added to a finished sweep: only they train; with one lr each they need no
    sweep wave, so all their seeds go in the first wave; the table compares them with the merged dense runs."""
    import moesaic.data.tokens as tokens

    monkeypatch.setattr(tokens, "prepare_data", lambda *a, **k: None)
    extra = dict(tokens_per_step=8, flops_per_token=6, preset="small", data="x")
    base = ["--models", "moe,dense", "--steps", "100", "--seeds", "0,1", "--sweep-seed", "0",
            "--work", str(tmp_path / "w")]
    earlier = [_run(m, lr, s, 4.0 + (m == "dense") * 0.2 + lr, [[50, 4.5], [100, 4.0 + (m == "dense") * 0.2]],
                    steps=100) | extra for m in ("moe", "dense") for lr, seeds in ((1e-3, (0, 1)), (2e-3, (0,)))
               for s in seeds]
    prev = tmp_path / "prev.json"
    settings = vars(quality.parser().parse_args([*base, "--lrs", "1e-3,2e-3"]))
    prev.write_text(json.dumps({"settings": settings, "runs": earlier, "command": "quality.py sweep"}))
    calls = []

    def fake_run_all(jobs, parallel, in_process=False, log=print):
        calls.append(sorted((j["model"], j["lr"], j["seed"]) for j in jobs))
        return [_run(j["model"], j["lr"], j["seed"], 4.1, [[35, 4.4], [70, 4.1]], steps=70) | extra for j in jobs]

    monkeypatch.setattr(quality, "run_all", fake_run_all)
    a = quality.parser().parse_args([*base, "--lrs", "1e-3", "--budget-fractions", "0.7", "--merge", str(prev),
                                     "--json", str(tmp_path / "q.json")])
    report = quality.run_benchmark(a, log=lambda s: None)
    assert calls[0] == [("moe@0.7", 1e-3, 0), ("moe@0.7", 1e-3, 1)] and calls[1:] == [[]]
    best = report["summary"]
    assert best["moe"]["lr"] == 1e-3 and best["dense"]["lr"] == 1e-3  # from the merged sweep
    assert [x["step"] for x in best["moe@0.7"]["reach"]] == [70, 70]  # 4.1 <= the dense finals (4.2)
    assert report["earlier_commands"] == ["quality.py sweep"] and len(report["runs"]) == len(earlier) + 2
