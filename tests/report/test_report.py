"""sakd evaluate, run reports, model card and export: numbers against direct float64 loops,
files against what loads back."""

import json
import math
import struct

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sakd.models import moe
from sakd.config import load_config
from sakd.data.text import heldout_texts, read_source
from sakd.errors import UserError
from sakd.evaluate.bpb import start_token_id
from sakd.report.run import (evaluate_command, format_evaluation, lm_eval_tasks, measure_expert_usage, write_model_card,
                         write_run_report)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@torch.no_grad()
def _direct_nats(model_dir, texts, seq_len):
    """Summed NLL (nats) and token count: the default sliding windows (eval.context_bytes), one window
    at a time, no padding, float64 log-softmax over the window's scored tokens only."""
    from sakd.evaluate.bpb import DEFAULT_CONTEXT_BYTES, token_byte_starts, window_plan

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nats, n = 0.0, 0
    for text in texts:
        ids, starts = token_byte_starts(tok, text)
        for c, s, e in window_plan(starts, seq_len, DEFAULT_CONTEXT_BYTES):
            window = [start_token_id(tok)] + ids[c:e]
            logits = model(input_ids=torch.tensor([window])).logits[0].double()[:, :len(tok)]
            for k in range(1 + s - c, len(window)):
                row = logits[k - 1]
                nats -= float(row[window[k]] - torch.logsumexp(row, 0))
                n += 1
    return nats, n


def test_evaluate_bpb_equals_direct_nll_over_bytes(tiny_assets):
    r = evaluate_command(str(tiny_assets["student"]), str(tiny_assets["teacher"]), str(tiny_assets["heldout"]),
                         max_bytes=1500, seq_len=64)
    texts = heldout_texts(read_source(str(tiny_assets["heldout"])).texts, 1500)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert r["heldout_bytes"] == n_bytes
    for side in ("student", "teacher"):
        nats, n_tok = _direct_nats(tiny_assets[side], texts, 64)
        m = r[side]
        assert n_tok > 64 and m["own_tokens"] == n_tok  # several windows, padded in a batch
        assert m["bits_per_byte"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
        assert m["ppl_per_own_token"] == pytest.approx(math.exp(nats / n_tok), rel=1e-4)
        f = tiny_assets[side] / "model.safetensors"
        assert m["weights_bytes"] == f.stat().st_size and m["stored_dtypes"] == ["F32"]
        assert 4 * m["parameters"] <= m["weights_bytes"] < 4 * m["parameters"] + 20_000
        assert m["tokens_per_s"] > 0 and m["bytes_per_s"] == pytest.approx(m["tokens_per_s"] * n_bytes / n_tok)
    # 3 experts, 1 active: 2/3 of each layer's expert weights (gate_up [E, 2I, H] + down [E, H, I]) sit idle
    H = I = 32
    assert r["teacher"]["active_parameters_per_token"] == r["teacher"]["parameters"] - 2 * 2 * (2 * I * H + H * I)
    assert r["student"]["active_parameters_per_token"] == r["student"]["parameters"]
    ret = r["retention"]
    assert 0 <= ret["top1_agreement"] <= ret["top5_agreement"] <= 1 and ret["kl_nats_per_position"] > 0
    json.dumps(r)  # --json must work
    text = format_evaluation(r)
    assert "bits/byte" in text and "not comparable across tokenizers" in text
    assert f"{r['teacher']['bits_per_byte']:.4f}" in text and "nats / 1:1 position" in text


def test_evaluate_refuses_bad_input(tiny_assets, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        evaluate_command(str(tiny_assets["student"]), None, str(tmp_path / "missing.txt"), max_bytes=100, seq_len=32)


def test_export_with_model_card_loads_back_with_identical_logits(tiny_assets, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_assets["student"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_assets["student"])
    out = tmp_path / "student"
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "generation_config.json").unlink(missing_ok=True)
    card = write_model_card(out, teacher="tiny-moe", data="sakd:shakespeare-train", method="shared-vocabulary KD",
                            metrics={"student_bpb_final": 2.5, "speed": (100.0, "tokens/s")},
                            command="sakd distill --config configs/demo.yaml train.max_steps=3")
    body = card.read_text()
    assert "tiny-moe" in body and "sakd distill --config configs/demo.yaml train.max_steps=3" in body
    assert "| student_bpb_final | 2.5000 | bits/byte |" in body and "| speed | 100.0000 | tokens/s |" in body
    # a number measured after the export (the CE-only run's) joins the table; a second time it replaces its row
    from sakd.report.model_card import add_card_metrics

    add_card_metrics(out, {"student_bpb_ce_only": 2.75})
    add_card_metrics(out, {"student_bpb_ce_only": 2.625})
    rows = [l for l in card.read_text().splitlines() if l.startswith("| ")]
    assert rows == ["| metric | value | unit |", "| student_bpb_final | 2.5000 | bits/byte |",
                    "| speed | 100.0000 | tokens/s |", "| student_bpb_ce_only | 2.6250 | bits/byte |"]
    assert card.read_text().replace("| student_bpb_ce_only | 2.6250 | bits/byte |\n", "") == body
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == model.config.eos_token_id
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    tok2 = AutoTokenizer.from_pretrained(out)
    ids = tok("Fair is foul, and foul is fair.", return_tensors="pt")["input_ids"]
    assert torch.equal(ids, tok2("Fair is foul, and foul is fair.", return_tensors="pt")["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, back(input_ids=ids).logits)


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24]), len(data)


def _history(steps=20, layers=("model.layers.0.mlp", "model.layers.1.mlp")):
    hist = []
    for s in range(1, steps + 1):
        rec = {"step": s, "lr": 1e-3 * s, "seconds": 0.1, "tokens_per_s": 1000.0 + s, "kd": 2.0 / s,
               "ce": 5.0 - 0.1 * s, "chunk": 0.5, "w_kd": 1.0, "w_ce": 0.5, "w_chunk": 0.5,
               "sar_kl": 1.0, "sar_router_kl": 0.01 * s}
        if s % 5 == 0 or s == 1:
            rec["moe_usage"] = {n: [0.6, 0.3, 0.1] for n in layers}
            rec["moe_router_kl"] = {n: 0.01 * s * (i + 1) for i, n in enumerate(layers)}
        hist.append(rec)
    return hist


def test_run_report_from_a_synthetic_history(tiny_assets, tmp_path):
    hist = _history()
    evals = [{"step": 0, "student_bpb": 6.0}, {"step": 10, "student_bpb": 4.0}, {"step": 20, "student_bpb": 3.0}]
    (tmp_path / "history.json").write_text(json.dumps({"history": hist, "evals": evals}))
    cfg = load_config(None, [f"model.teacher={tiny_assets['teacher']}", "moe.mode=sar", "data.source=x.txt"])
    result = {"steps": 20, "seconds": 12.0, "teacher_bpb": 2.0, "evals": evals}
    rep = write_run_report(tmp_path, cfg, result, extra={"student_bpb_ce_only": 3.5})
    assert set(rep["plots"]) == {"loss_terms", "heldout_bpb", "expert_usage", "router_shift"}, rep["notes"]
    md = (tmp_path / "report.md").read_text()
    for name in rep["plots"]:
        (w, h), size = _png_size(tmp_path / f"{name}.png")
        assert w >= 400 and h >= 150 and size > 8_000, name
        assert f"]({name}.png)" in md
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["config"]["moe"]["mode"] == "sar" and saved["teacher_bpb"] == 2.0
    assert saved["student_bpb_initial"] == 6.0 and saved["student_bpb_final"] == 3.0
    n = saved["metrics"]["steps_averaged"]  # 20 steps: the first and last 4
    assert n == 4
    assert saved["metrics"]["start"]["kd"] == pytest.approx(sum(2.0 / s for s in range(1, 5)) / 4)
    assert saved["metrics"]["end"]["ce"] == pytest.approx(sum(5.0 - 0.1 * s for s in range(17, 21)) / 4)
    assert "| kd | nats / 1:1 position |" in md and "| teacher | 2.0000 |" in md
    with pytest.raises(UserError, match="history.json"):
        write_run_report(tmp_path / "nowhere", cfg, result)


@torch.no_grad()
def test_expert_usage_measured_at_report_time_matches_the_routers(tiny_assets, tmp_path):
    """No moe_usage in the history: the report runs the teacher; usage == direct top-1 counts of W x."""
    teacher = AutoModelForCausalLM.from_pretrained(tiny_assets["teacher"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_assets["teacher"])
    texts = [tiny_assets["heldout"].read_text()[:1500]]
    cfg = load_config(None, [f"model.teacher={tiny_assets['teacher']}", "data.source=x.txt", "eval.seq_len=64",
                             "eval.batch_size=4"])
    inputs = {}
    hooks = [block.gate.register_forward_hook(lambda m, a, o, n=name: inputs.setdefault(n, []).append(a[0]))
             for name, block in moe.find_moe_blocks(teacher)]
    usage, what = measure_expert_usage(teacher, tok, texts, cfg)
    for h in hooks:
        h.remove()
    assert "slots" in what
    ids = tok(texts[0], add_special_tokens=False)["input_ids"]
    lengths = [len(ids[a:a + 63]) + 1 for a in range(0, len(ids), 63)]
    assert len(lengths) > 4  # more than one batch of 4 windows, the last ones padded
    for name, block in moe.find_moe_blocks(teacher):
        counts = torch.zeros(3, dtype=torch.float64)
        for i, x in enumerate(inputs[name]):  # one [B*L, H] per batch, padding rows included
            part = lengths[4 * i:4 * i + 4]
            x = x.reshape(len(part), max(part), -1).double()
            for b, n in enumerate(part):  # only real tokens count
                top = (x[b, :n] @ block.gate.weight.double().T).argmax(-1)
                counts += torch.bincount(top, minlength=3).double()
        assert usage[name] == pytest.approx((counts / sum(lengths)).tolist(), abs=1e-12)
    (tmp_path / "history.json").write_text(json.dumps({"history": [{"step": 1, "ce": 1.0, "w_ce": 1.0}],
                                                       "evals": [{"step": 1, "student_bpb": 5.0}]}))
    rep = write_run_report(tmp_path, cfg, {"teacher_bpb": None}, teacher=teacher, teacher_tokenizer=tok, texts=texts)
    assert "expert_usage" in rep["plots"] and "router_shift" not in rep["plots"]
    assert _png_size(tmp_path / "expert_usage.png")[1] > 8_000


def test_lm_eval_missing_is_a_user_error(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "lm_eval" else real(n, *a))
    with pytest.raises(UserError, match="pip install lm-eval"):
        lm_eval_tasks(tmp_path, ["hellaswag"])
