"""Every bad input to `sakd distill` ends with exit code 2 and ONE line on stderr naming the file, key or
value (no traceback), a failing run never damages an earlier run's output, invalid UTF-8 is replaced and
counted, and --debug puts the traceback in sakd-debug.log. The table is in docs/reliability.md.

The CLI runs as a real subprocess (`python -m sakd.cli`); the cases are independent, so they are started
together (a few at a time) once per module and each test reads its own outcome.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import ROOT, assert_user_error, tiny_overrides


def _env() -> dict:
    # one thread per process: tiny models, and several of these run at once on a busy machine
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


def run_cli(args, cwd=ROOT, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sakd.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=_env(), timeout=timeout)


def tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "sakd-debug.log"}


# ----------------------------------------------------------------------------- the bad inputs

@pytest.fixture(scope="module")
def bad(tiny_assets, tmp_path_factory):
    """Bad files and folders, built once."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

    d = tmp_path_factory.mktemp("bad")
    (d / "unknown_key.yaml").write_text("train:\n  lrr: 0.1\n")
    (d / "wrong_type.yaml").write_text("train:\n  weight_decay: heavy\n")
    (d / "not_yaml.yaml").write_text("train: [lr: 1\n")
    (d / "empty.txt").write_bytes(b"")
    (d / "blank.txt").write_text(" \n\t\n   \n")
    (d / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (d / "bad.jsonl").write_text('{"text": "To be, or not to be"}\n{not json}\n')
    pq.write_table(pa.table({"id": [1, 2], "body_text": ["a b c", "d e f"]}), d / "no_text.parquet")
    pq.write_table(pa.table({"id": [1, 2], "label": ["a", "b"]}), d / "which_column.parquet")
    (d / "empty_folder").mkdir()
    # a folder with the student's tokenizer and a DistilBERT encoder: not a causal language model
    tok = AutoTokenizer.from_pretrained(tiny_assets["student"])
    tok.save_pretrained(d / "encoder")
    DistilBertModel(DistilBertConfig(vocab_size=len(tok), dim=32, n_layers=1, n_heads=2,
                                     hidden_dim=64)).save_pretrained(d / "encoder")
    # a Llama config and tokenizer but no weights
    tok.save_pretrained(d / "config_only")
    (d / "config_only" / "config.json").write_text((tiny_assets["student"] / "config.json").read_text())
    # the tiny student with one layer instead of two (same tensor shapes, fewer tensors)
    from transformers import AutoModelForCausalLM

    from sakd.models.tiny import llama_config

    tok.save_pretrained(d / "one_layer_student")
    AutoModelForCausalLM.from_config(llama_config(len(tok), hidden=32, layers=1, heads=4, intermediate=64)
                                     ).save_pretrained(d / "one_layer_student")
    return d


def _ov(assets, out, **extra) -> list[str]:
    return tiny_overrides(assets, out, **extra)


# name -> (arguments after `distill` (a function of assets, bad dir, out dir), fragments the line must hold
#          (strings, or functions of assets and bad dir), whether model weights are loaded before the error)
CASES = {
    "missing config file": (lambda a, b, o: ["--config", b / "nope.yaml"],
                            ["config file", "nope.yaml", "does not exist"], False),
    "invalid YAML": (lambda a, b, o: ["--config", b / "not_yaml.yaml"], ["not_yaml.yaml", "not valid YAML"], False),
    "unknown key in YAML": (lambda a, b, o: ["--config", b / "unknown_key.yaml", *_ov(a, o)],
                            ["unknown config key 'train.lrr'"], False),
    "unknown key in override": (lambda a, b, o: [*_ov(a, o), "train.lrr=0.1"], ["unknown config key 'train.lrr'"],
                                False),
    "unknown section in override": (lambda a, b, o: [*_ov(a, o), "trian.lr=0.1"], ["unknown config key 'trian'"],
                                    False),
    "override without =": (lambda a, b, o: [*_ov(a, o), "train.lr"], ["override 'train.lr'", "key=value"], False),
    "wrong type in YAML": (lambda a, b, o: ["--config", b / "wrong_type.yaml", *_ov(a, o)],
                           ["train.weight_decay='heavy'", "expected a number"], False),
    "wrong type in override": (lambda a, b, o: [*_ov(a, o), "train.max_steps=ten"],
                               ["train.max_steps='ten'", "expected an integer"], False),
    "zero batch size": (lambda a, b, o: _ov(a, o, **{"train.batch_size": 0}), ["train.batch_size=0", ">= 1"], False),
    "zero temperature": (lambda a, b, o: _ov(a, o, **{"loss.temperature": 0}), ["loss.temperature=0", "> 0"], False),
    "negative temperature": (lambda a, b, o: _ov(a, o, **{"loss.temperature": -1}),
                             ["loss.temperature=-1", "> 0"], False),
    "all weights zero": (lambda a, b, o: _ov(a, o, **{"loss.kd_weight": 0}), ["all loss weights are zero"], False),
    "unknown choice": (lambda a, b, o: _ov(a, o, **{"moe.mode": "best"}), ["moe.mode='best'", "topk"], False),
    "bad duration": (lambda a, b, o: _ov(a, o, **{"train.max_time": "soon"}),
                     ["train.max_time='soon'", "not a duration"], False),
    "teacher path does not exist": (lambda a, b, o: _ov(a, o, **{"model.teacher": b / "no_such_teacher"}),
                                    ["no_such_teacher", "does not exist"], False),
    "teacher folder is not a model": (lambda a, b, o: _ov(a, o, **{"model.teacher": b / "empty_folder",
                                                                   "model.teacher_tokenizer": a["teacher"]}),
                                      ["cannot load the teacher", "empty_folder"], False),
    "moe.mode=ka with a dense teacher": (lambda a, b, o: _ov(a, o, **{"model.teacher": a["student"],
                                                                      "moe.mode": "ka"}),
                                         ["moe.mode=ka needs an MoE teacher", lambda a, b: repr(str(a["student"]))], True),
    "student is not a causal LM": (lambda a, b, o: _ov(a, o, **{"model.student": b / "encoder"}),
                                   ["student", "encoder", "is not a causal language model"], True),
    "student folder without weights": (lambda a, b, o: _ov(a, o, **{"model.student": b / "config_only"}),
                                       ["cannot load the student", "config_only"], True),
    "missing data file": (lambda a, b, o: _ov(a, o, **{"data.source": b / "nope.txt"}),
                          ["data file", "nope.txt", "does not exist"], False),
    "empty data file": (lambda a, b, o: _ov(a, o, **{"data.source": b / "empty.txt"}),
                        ["empty.txt", "holds no text"], False),
    "whitespace-only data file": (lambda a, b, o: _ov(a, o, **{"data.source": b / "blank.txt"}),
                                  ["blank.txt", "holds no text"], False),
    "binary data file": (lambda a, b, o: _ov(a, o, **{"data.source": b / "binary.txt"}),
                         ["binary.txt", "looks binary"], False),
    "JSONL line that is not JSON": (lambda a, b, o: _ov(a, o, **{"data.source": b / "bad.jsonl"}),
                                    ["bad.jsonl", "line 2 is not JSON"], False),
    "parquet without the text column": (lambda a, b, o: _ov(a, o, **{"data.source": b / "no_text.parquet",
                                                                     "data.text_column": "text"}),
                                        ["no_text.parquet", "no column 'text'", "id, body_text"], False),
    "parquet with no recognisable text column": (lambda a, b, o: _ov(a, o, **{"data.source": b / "which_column.parquet"}),
                                                 ["which_column.parquet", "data.text_column"], False),
}


@pytest.fixture(scope="module")
def outcomes(tiny_assets, bad, tmp_path_factory):
    """Every case run once, three at a time (independent processes, separate output folders)."""
    root = tmp_path_factory.mktemp("runs")

    def go(item):
        i, (name, (args, _, _)) = item
        return name, run_cli(["distill", "--no-progress", *args(tiny_assets, bad, root / f"case{i}")])

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(pool.map(go, enumerate(CASES.items())))


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_with_one_line_naming_it(name, outcomes, tiny_assets, bad):
    _, fragments, _ = CASES[name]
    assert_user_error(outcomes[name], *(f(tiny_assets, bad) if callable(f) else str(f) for f in fragments))


# ----------------------------------------------------------------------------- a run that works

@pytest.fixture(scope="module")
def finished_run(tiny_assets, tmp_path_factory):
    """A complete run on a training file with 3 invalid UTF-8 bytes (checkpoints + exported student)."""
    d = tmp_path_factory.mktemp("finished")
    raw = tiny_assets["train"].read_bytes()
    cut = raw.index(b"\n", len(raw) // 2)
    (d / "train.txt").write_bytes(raw[:cut] + b" \xff caf\xe9 \xc3" + raw[cut:])  # 3 bytes that are not UTF-8
    out = d / "run"
    assets = dict(tiny_assets, train=d / "train.txt")
    r = run_cli(["distill", "--no-progress", *_ov(assets, out, **{"train.save_every": 1})])
    return out, assets, r


def test_invalid_utf8_is_replaced_counted_and_the_run_succeeds(finished_run):
    out, assets, r = finished_run
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"data: 3 invalid UTF-8 bytes in {assets['train']} were replaced by U+FFFD" in r.stdout
    assert json.loads((out / "result.json").read_text())["steps"] == 3
    assert (out / "student" / "model.safetensors").is_file()


@pytest.mark.parametrize("how", ["without --resume", "--resume with a missing data file",
                                 "--resume with an unknown key"])
def test_a_failing_run_does_not_touch_an_earlier_output(finished_run, tmp_path, how):
    out, assets, first = finished_run
    assert first.returncode == 0, first.stderr[-3000:]
    before = tree_hashes(out)
    assert any(k.startswith("checkpoints/step-") for k in before) and "student/model.safetensors" in before
    if how == "without --resume":
        r = run_cli(["distill", "--no-progress", *_ov(assets, out)])
        assert_user_error(r, str(out), "already holds checkpoints", "--resume")
    elif how == "--resume with a missing data file":
        r = run_cli(["distill", "--no-progress", "--resume", *_ov(assets, out, **{"data.source": tmp_path / "x.txt"})])
        assert r.returncode == 2 and "x.txt" in r.stderr and "does not exist" in r.stderr, r.stderr[-3000:]
    else:
        r = run_cli(["distill", "--no-progress", "--resume", *_ov(assets, out), "train.lrr=1"])
        assert_user_error(r, "unknown config key 'train.lrr'")
    assert tree_hashes(out) == before


def test_resume_with_another_student_is_refused(finished_run, bad, tmp_path):
    src, assets, first = finished_run
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "run"
    shutil.copytree(src, out)
    before = tree_hashes(out)
    r = run_cli(["distill", "--no-progress", "--resume",
                 *_ov(dict(assets, student=bad / "one_layer_student"), out)])
    assert tree_hashes(out) == before  # in particular the exported student is not overwritten
    assert_user_error(r, "does not fit model.student", "one_layer_student")


# ----------------------------------------------------------------------------- --debug

def test_debug_writes_the_traceback_to_sakd_debug_log_in_the_run_folder(tiny_assets, tmp_path):
    out = tmp_path / "run"
    r = run_cli(["distill", "--no-progress", "--debug", *_ov(tiny_assets, out, **{"data.source": tmp_path / "x.txt"})],
                cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    log = (out / "sakd-debug.log").read_text()
    assert log.startswith("Traceback (most recent call last):") and "sakd.errors.UserError: data file" in log
    assert "x.txt" in log and not (tmp_path / "sakd-debug.log").exists()


def test_debug_before_the_verb_also_writes_the_log(tmp_path):
    r = run_cli(["--debug", "distill", "--config", tmp_path / "nope.yaml"], cwd=tmp_path)
    assert r.returncode == 2
    assert "config file" in (tmp_path / "sakd-debug.log").read_text()  # no run folder yet: the current folder


def test_without_debug_no_log_is_written(tmp_path):
    r = run_cli(["distill", "--config", tmp_path / "nope.yaml"], cwd=tmp_path)
    assert r.returncode == 2 and not (tmp_path / "sakd-debug.log").exists()
