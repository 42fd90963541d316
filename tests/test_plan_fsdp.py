"""sakd plan --processes N with train.distributed=fsdp: the student's weights, gradients and AdamW states
per process are 1/N of one process's, plus the FSDP units gathered in full; DDP keeps them whole."""

from sakd.config import load_config
from sakd.models.tiny import llama_config, qwen3_moe_config
from sakd.plan import format_plan, plan


def _cfg(tmp_path, *extra):
    llama_config(8192, hidden=256, layers=4, heads=4, intermediate=688).save_pretrained(tmp_path / "s")
    qwen3_moe_config(8192, hidden=256, layers=4, heads=4, experts=3, experts_per_tok=1,
                     intermediate=512).save_pretrained(tmp_path / "t")
    return load_config(None, [f"model.student={tmp_path / 's'}", f"model.teacher={tmp_path / 't'}",
                              "train.batch_size=4", "data.seq_len=128", *extra])


def test_fsdp_divides_the_student_state_by_the_processes(tmp_path):
    cfg = _cfg(tmp_path, "train.distributed=fsdp")
    one, four = plan(cfg, processes=1), plan(cfg, processes=4)
    c1, c4 = one["components"], four["components"]
    n = one["student"]["params"]  # tied: 8192 x 256 embeddings once + 4 layers
    assert c1["student_weights"] == 4 * n and c4["student_weights"] == n  # fp32: 4 bytes, a quarter each
    assert c4["optimizer_states"] == 2 * 4 * n // 4 and c4["student_gradients"] == 4 * n // 4
    head = 8192 * 256  # tied: the embeddings are the output layer, one unit with the final norm
    layer = (n - head) / 4
    assert c4["fsdp_gathered_units"] == int(4 * (head + 2 * layer))
    assert "fsdp_gathered_units" not in c1 or c1["fsdp_gathered_units"] == 0
    # the teacher is replicated: the same on every process
    assert c4["teacher_weights"] == c1["teacher_weights"] > 0
    saved = (c1["student_weights"] + c1["optimizer_states"]) - (c4["student_weights"] + c4["optimizer_states"])
    assert four["persistent_bytes"] == one["persistent_bytes"] - saved + c4["fsdp_gathered_units"]
    assert "sharded 4 ways (FSDP2)" in format_plan(four)


def test_ddp_keeps_the_whole_student_on_each_process(tmp_path):
    cfg = _cfg(tmp_path)
    one, four = plan(cfg, processes=1), plan(cfg, processes=4)
    assert one["components"] == four["components"] and one["peak_bytes"] == four["peak_bytes"]
    assert "DDP: each holds the whole student" in format_plan(four)
