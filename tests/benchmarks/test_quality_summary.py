"""benchmarks/quality.py's summary: means, spreads and paired differences against hand-computed values."""

import importlib.util
import json
import math

import pytest
import torch

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_bench", ROOT / "benchmarks" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(method, seed, bpb):
    return {"method": method, "seed": seed, "bpb": bpb, "teacher_bpb": 2.0, "seconds_per_step": 1.0 + seed,
            "run_seconds": 10.0, "cpu_seconds": 9.0}


def test_paired_differences_cancel_the_seed_spread(quality):
    # seed 1 is a hard data order for everyone (+0.3): the means spread, the paired differences do not
    runs = [_run("ce", 0, 3.0), _run("ce", 1, 3.3), _run("shared_kl", 0, 2.9), _run("shared_kl", 1, 3.2),
            _run("ka", 0, 2.88), _run("ka", 1, 3.22)]
    teacher, ce, rows = quality.summarise(runs, ["ce", "shared_kl", "ka"])
    assert teacher == 2.0 and ce == pytest.approx(3.15)
    kl, ka = rows[1], rows[2]
    assert kl["bpb_mean"] == pytest.approx(3.05) and kl["bpb_std"] == pytest.approx(0.3 / math.sqrt(2))
    assert kl["delta_vs_ce_per_seed"] == pytest.approx([-0.1, -0.1])
    assert kl["delta_vs_ce_mean"] == pytest.approx(-0.1) and kl["delta_vs_ce_std"] == pytest.approx(0.0, abs=1e-12)
    assert kl["gap_closed_pct"] == pytest.approx(100 * 0.1 / 1.15)
    assert ka["delta_vs_shared_kl_mean"] == pytest.approx(0.0, abs=1e-12)        # -0.02 and +0.02
    assert ka["delta_vs_shared_kl_std"] == pytest.approx(0.04 / math.sqrt(2))
    assert kl["seconds_per_step"] == pytest.approx(1.5)                           # median over seeds


def _split_run(method, regime, seed, val, test, steps=10, cpu=20.0):
    return {"method": method, "regime": regime, "seed": seed, "bpb_validation": val, "bpb_test": test,
            "seconds_per_step": 1.0, "run_seconds": 10.0, "cpu_seconds": cpu, "steps": steps}


def test_gains_are_paired_and_the_kept_fraction_divides_by_the_same_tokenizer_gain(quality):
    runs = [_run("ce", 0, 3.0), _run("ce", 1, 3.2), _run("mapped_kl", 0, 2.88), _run("mapped_kl", 1, 3.136),
            _run("ceiling_ce", 0, 2.8), _run("ceiling_ce", 1, 2.9), _run("ceiling_kd", 0, 2.66),
            _run("ceiling_kd", 1, 2.784)]
    _, _, rows = quality.summarise(runs, ["ce", "mapped_kl", "ceiling_ce", "ceiling_kd"])
    by = {r["method"]: r for r in rows}
    assert by["mapped_kl"]["gain_pct_per_seed"] == pytest.approx([4.0, 2.0])        # 100 (3 - 2.88) / 3, ...
    assert by["mapped_kl"]["gain_pct_mean"] == pytest.approx(3.0)
    assert by["mapped_kl"]["gain_pct_std"] == pytest.approx(math.sqrt(2))
    assert by["ceiling_kd"]["baseline"] == "ceiling_ce"                               # its own tokenizer's CE
    assert by["ceiling_kd"]["gain_pct_per_seed"] == pytest.approx([5.0, 4.0])
    assert by["mapped_kl"]["kept_same_tokenizer_gain"] == pytest.approx(3.0 / 4.5)
    for m in ("ce", "ceiling_ce"):
        assert by[m]["baseline"] is None and by[m]["gain_pct_mean"] is None
    assert by["ceiling_kd"]["kept_same_tokenizer_gain"] is None


def test_rows_per_split_and_the_selection_follows_validation_only(quality):
    # on validation mapped_kl and ka_mapped win; on test the order is reversed: the choice must not move
    val = {"ce": 3.0, "shared_kl": 2.95, "mapped_kl": 2.9, "ka_mapped": 2.85, "sar_mapped": 2.88}
    test = {"ce": 3.0, "shared_kl": 2.8, "mapped_kl": 2.9, "ka_mapped": 2.95, "sar_mapped": 2.7}
    runs = [_split_run(m, "full", s, val[m] + 0.01 * s, test[m] + 0.01 * s) for m in val for s in (0, 1)]
    runs += [_split_run("ce", "data_limited", s, 9.0, 8.0) for s in (0, 1)]
    res = {"runs": runs, "teacher": {"validation": 1.5, "test": 2.0},
           "methods": {"full": list(val), "data_limited": ["ce", "mapped_kl"]}}
    quality.summarise_all(res)
    assert res["split"] == "test" and res["validation"]["split"] == "validation"
    assert {r["method"]: r["bpb_mean"] for r in res["rows"]} == pytest.approx({m: v + 0.005 for m, v in test.items()})
    assert [r["method"] for r in res["data_limited"]["rows"]] == ["ce"]               # no mapped_kl run there
    assert res["data_limited"]["rows"][0]["bpb_mean"] == pytest.approx(8.0)
    assert res["validation"]["data_limited_rows"][0]["bpb_mean"] == pytest.approx(9.0)
    assert res["selection"]["chosen"] == {"loss.logit": "mapped_kl", "moe.mode": "ka"}
    assert res["selection"]["kd_beats_ce_on_validation"] is True
    assert res["teacher_bpb"] == 2.0


def test_estimate_schedules_longest_first_on_the_workers(quality, tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "COST", {"a": 1.0, "b": 0.5})
    import quality_summary
    monkeypatch.setattr(quality_summary, "COST", {"a": 1.0, "b": 0.5})
    fixed, teacher = quality_summary.RUN_FIXED_SECONDS, quality_summary.TEACHER_SECONDS
    tasks = [("a", "full", 0), ("a", "full", 1), ("b", "full", 0), ("b", "data_limited", 0)]
    cpu, wall = quality.estimate(tasks, {"full": 100, "data_limited": 20}, jobs=2)
    costs = [fixed + 100, fixed + 100, fixed + 50, fixed + 10, teacher]
    assert cpu == pytest.approx(sum(costs))
    assert wall == pytest.approx(max(2 * fixed + 150, 2 * fixed + 110 + teacher))
    assert quality.estimate(tasks, {"full": 100, "data_limited": 20}, jobs=1)[1] == pytest.approx(sum(costs))
    # per-step costs measured from an earlier result file: (cpu - fixed) / steps, median over its runs
    f = tmp_path / "quick.json"
    f.write_text(json.dumps({"runs": [_split_run("a", "full", 0, 3, 3, steps=10, cpu=fixed + 7),
                                      _split_run("a", "full", 1, 3, 3, steps=10, cpu=fixed + 9),
                                      _split_run("a", "full", 2, 3, 3, steps=10, cpu=fixed + 30)]}))
    assert quality.costs_from(f) == {"a": pytest.approx(0.9)}


def test_every_row_pins_its_method_and_the_ceiling_student_is_the_demo_shape(quality, tmp_path):
    paths = {"train_full": "/x/train.jsonl", "validation": "/x/val.jsonl", "test": "/x/test.jsonl"}
    path, info = quality.ceiling_init(tmp_path / "ceiling")
    paths["ceiling_init"] = path
    from safetensors.torch import load_file

    again, _ = quality.ceiling_init(tmp_path / "again")
    a, b = load_file(f"{path}/model.safetensors"), load_file(f"{again}/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)          # deterministic
    assert info["vocab_size"] == 8192 and info["extra_parameters"] == (8192 - 2048) * 128
    from sakd.demo.run import DEMO_CONFIG
    bad = quality.check_methods(list(quality.METHODS), str(DEMO_CONFIG), paths, ())
    assert set(bad) <= {"mapped_kl", "ka_mapped", "sar_mapped"}, bad                  # until mapped_kl exists
    for m in quality.METHODS:
        if m in bad:
            continue
        cfg = quality.demo_config(m, base=str(DEMO_CONFIG), steps=5, seed=1, out_dir=tmp_path / m, paths=paths)
        assert cfg.loss.ce_weight == 1 and cfg.data.source == "/x/train.jsonl"
        assert cfg.data.eval_source == "/x/val.jsonl"
        assert cfg.loss.hidden.weight == cfg.loss.attention.weight == cfg.loss.contrastive.weight == 0
        assert cfg.moe.mode == {"ka_mapped": "ka", "sar_mapped": "sar", "ka": "ka", "sar": "sar"}.get(m, "topk")
        assert (cfg.model.student == path) == m.startswith("ceiling")
        assert cfg.loss.chunk_weight == (0.5 if m == "shared_kl+chunk" else 0)
        assert (cfg.loss.kd_weight == 0) == (m in ("ce", "ceiling_ce"))


def test_summarise_mode_reads_old_and_new_files_and_refuses_others(quality, tmp_path, capsys):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"runs": [_run("ce", 0, 3.0), _run("shared_kl", 0, 2.9)]}))
    assert quality.main(["--summarise", str(old)]) == 0
    assert "| shared_kl | 2.9000 | +3.33 vs ce |" in capsys.readouterr().out
    new = tmp_path / "new.json"
    new.write_text(json.dumps({"runs": [_split_run("ce", "full", 0, 3.0, 3.1), _split_run("shared_kl", "full", 0, 2.9,
                                                                                          3.0)],
                               "teacher": {"validation": 1.5, "test": 2.0}, "methods": {"full": ["ce", "shared_kl"]}}))
    assert quality.main(["--summarise", str(new)]) == 0
    saved = json.loads(new.read_text())
    assert saved["split"] == "test" and saved["rows"][1]["bpb_mean"] == pytest.approx(3.0)
    assert saved["selection"]["chosen"] == {"loss.logit": "shared_kl"}
    (tmp_path / "junk.json").write_text("[1, 2]")
    for bad in ("junk.json", "missing.json"):
        with pytest.raises(SystemExit, match=r"^quality.py: error: --summarise .*not a quality result file"):
            quality.main(["--summarise", str(tmp_path / bad)])
    with pytest.raises(SystemExit, match=r"^quality.py: error: --steps=0 must be >= 1$"):
        quality.main(["--steps", "0", "--estimate"])


def test_benchmark_splits_are_disjoint_and_the_limited_text_is_a_leading_part_of_every_play():
    from sakd.data.corpus import HELD_OUT_PLAYS, VALIDATION_PLAYS, benchmark_splits, leading_part, load_plays

    full, small = benchmark_splits(), benchmark_splits(0.1)
    assert tuple(full["test"]) == HELD_OUT_PLAYS and tuple(full["validation"]) == VALIDATION_PLAYS
    assert not set(full["train"]) & {*HELD_OUT_PLAYS, *VALIDATION_PLAYS}
    assert len(full["train"]) + 4 == len(load_plays())
    assert small["train"].keys() == full["train"].keys()
    for name, text in small["train"].items():
        assert full["train"][name].startswith(text) and text.endswith("\n")
        assert 0.08 * len(full["train"][name]) < len(text) <= 0.1 * len(full["train"][name])
    assert leading_part("ab\n\ncd\n\nef", 0.8) == "ab\n\ncd\n"       # cut at the last paragraph break
    assert leading_part("ab\n\ncd\n\nef", 0.7) == "ab\n" and leading_part("abc", 1.0) == "abc"


def test_resume_takes_a_finished_run_only_under_the_same_configuration(quality, tmp_path):
    """--resume: asset paths of another checkout, and a key added since at its default, are no change; a
    changed value is; a run reused without timings gives a row whose timing means skip it."""
    from sakd.config import load_config, to_dict

    cfg = to_dict(load_config(None, ["model.teacher=/a/checkout/assets/demo/teacher", "loss.logit=mapped_kl"]))
    old = json.loads(json.dumps(cfg))
    old["model"]["teacher"] = "/another/clone/assets/demo/teacher"
    del old["loss"]["baseline"]                                   # the key did not exist then
    assert quality.config_changes(old, cfg) == []
    old["loss"]["logit"] = "shared_kl"
    assert quality.config_changes(old, cfg) == ["loss.logit"]
    new = json.loads(json.dumps(cfg))
    new["loss"]["baseline"] = "uld"                               # added since, NOT at its default
    assert quality.config_changes(json.loads(json.dumps(old)) | {"loss": {**old["loss"], "logit": "mapped_kl"}},
                                  new) == ["loss.baseline"]
    from quality_summary import summarise
    runs = [_run("ce", 0, 3.0), _run("ce", 1, 3.2), {**_run("mapped_kl", 0, 2.9), "run_seconds": None,
                                                      "cpu_seconds": None}, _run("mapped_kl", 1, 3.0)]
    rows = {r["method"]: r for r in summarise(runs, ["ce", "mapped_kl"])[2]}
    assert rows["mapped_kl"]["cpu_seconds_mean"] == 9.0 and rows["mapped_kl"]["run_seconds_mean"] == 10.0
    assert rows["mapped_kl"]["bpb_mean"] == pytest.approx(2.95, abs=1e-12)
