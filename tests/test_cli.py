"""The command line: help texts describe every option; `sakd align --json` reports the alignment."""

import json
import subprocess
import sys

from sakd.config import field_help


def _run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "sakd.cli", *args], capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=300, **kw)


def test_help_lists_every_verb_and_config_key():
    top = _run("--help")
    assert top.returncode == 0
    for verb in ("distill", "demo", "align", "evaluate", "pretrain", "cache-teacher", "plan", "push"):
        assert verb in top.stdout
    distill = _run("distill", "--help")
    assert distill.returncode == 0
    for key, help_, _ in field_help():
        assert key in distill.stdout, key
    demo = _run("demo", "--help")
    assert "--compare" in demo.stdout and "--steps" in demo.stdout and "--out" in demo.stdout


def test_align_json_on_two_trained_tokenizers(tiny_assets):
    from transformers import AutoTokenizer

    from sakd.align.tokens import align, encode_with_bytes

    r = _run("align", "--teacher-tokenizer", str(tiny_assets["teacher"]), "--student-tokenizer",
             str(tiny_assets["student"]), "--text", str(tiny_assets["heldout"]), "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    text = tiny_assets["heldout"].read_text(encoding="utf-8")
    s_tok = AutoTokenizer.from_pretrained(tiny_assets["student"])
    t_tok = AutoTokenizer.from_pretrained(tiny_assets["teacher"])
    s, t = encode_with_bytes(s_tok, text), encode_with_bytes(t_tok, text)
    chunks = align(s, t)
    one = sum(1 for c in chunks if c[1] - c[0] == 1 and c[3] - c[2] == 1)
    assert rep["student_tokens"] == len(s.ids) and rep["teacher_tokens"] == len(t.ids)
    assert rep["chunks"] == len(chunks) and rep["one_to_one_chunks"] == one
    assert abs(rep["student_tokens_in_one_to_one"] - one / len(s.ids)) < 1e-12
    assert rep["student_vocab"] == len(s_tok) and rep["teacher_vocab"] == len(t_tok)
    assert 0 < rep["shared_vocab"] < rep["student_vocab"]


def test_align_missing_text_is_exit_2(tmp_path):
    r = _run("align", "--teacher-tokenizer", "x", "--student-tokenizer", "y", "--text", str(tmp_path / "no.txt"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_align_teacher_mass_on_the_shared_vocabulary(tiny_assets):
    """--teacher-model: mean teacher probability on the shared vocabulary at the positions that predict
    1:1 chunks, against a direct computation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sakd.evaluate.alignment import align_report
    from sakd.align.tokens import align, encode_with_bytes
    from sakd.align.vocab import build_vocab_map

    rep = align_report(str(tiny_assets["teacher"]), str(tiny_assets["student"]), tiny_assets["heldout"],
                       teacher_model=str(tiny_assets["teacher"]), max_len=4096)
    text = tiny_assets["heldout"].read_text(encoding="utf-8")
    s_tok = AutoTokenizer.from_pretrained(tiny_assets["student"])
    t_tok = AutoTokenizer.from_pretrained(tiny_assets["teacher"])
    s, t = encode_with_bytes(s_tok, text), encode_with_bytes(t_tok, text)
    shared_t = build_vocab_map(s_tok, t_tok).shared_t
    model = AutoModelForCausalLM.from_pretrained(tiny_assets["teacher"]).eval()
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([t.ids])).logits[0].double(), -1)
    pos = [c[2] - 1 for c in align(s, t) if c[1] - c[0] == 1 and c[3] - c[2] == 1 and c[2] >= 1]
    want = float(probs[pos][:, shared_t].sum(-1).mean())
    assert 0 < want < 1
    assert abs(rep["teacher_mass_on_shared_at_one_to_one"] - want) < 1e-5
