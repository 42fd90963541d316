"""sakd.models.placement: the bytes a device map leaves on the card, against a hand count of the tiny
Qwen3-MoE's parameters; Accelerate's planner for auto stays within the card budget; `sakd plan` counts only
those weights and adds the offloaded block streamed in for its forward."""

from sakd.config import load_config
from sakd.models.placement import bytes_on_card
from sakd.models.tiny import qwen3_moe_config
from sakd.plan import GiB, plan

H, KV, HD, E, I, V = 256, 2 * 64, 64, 3, 512, 1000  # hidden, kv width (2 heads x 64), head dim, experts, ffn, vocab
LAYER = H * H + 2 * H * KV + H * H + 2 * HD + E * H + E * (2 * I * H + I * H) + 2 * H  # q k v o, qk-norms, router, experts, norms
TOTAL = V * H + 4 * LAYER + H  # tied embeddings once, 4 layers, final norm


def _config():
    return qwen3_moe_config(V, hidden=H, layers=4, heads=4, experts=E, experts_per_tok=1, intermediate=I)


def _map(l2="cpu", l3="disk") -> dict:
    return {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cuda:0", "model.layers.2": l2,
            "model.layers.3": l3, "model.norm": 0, "model.rotary_emb": 0, "lm_head": 0}


def test_a_dict_map_leaves_what_it_names_on_the_card():
    r = bytes_on_card(_config(), _map(), None, 2, 16 * GiB)
    assert r["total"] == 2 * TOTAL
    assert r["on_card"] == 2 * (TOTAL - 2 * LAYER)
    assert r["offloaded_block"] == 2 * LAYER
    r = bytes_on_card(_config(), _map(l2=1, l3=1), None, 4, 16 * GiB)  # a second card: nothing offloaded
    assert r["on_card"] == 4 * (TOTAL - 2 * LAYER) and r["offloaded_block"] == 0


def test_auto_fills_the_card_budget_with_whole_layers():
    budget = 2 * (V * H + 2 * LAYER) + 4096  # embeddings + two layers (+ change) in fp16
    r = bytes_on_card(_config(), "auto", {0: budget, "cpu": "10GiB"}, 2, 16 * GiB)
    # Accelerate keeps room on the card for the largest offloaded layer (streamed in for its forward)
    assert r["offloaded_block"] == 2 * LAYER
    assert budget - 2 * r["offloaded_block"] < r["on_card"] + r["offloaded_block"] <= budget
    assert r["on_card"] == 2 * (V * H + LAYER)  # embeddings + one layer, by hand


def test_plan_counts_only_the_weights_on_the_card(tmp_path):
    _config().save_pretrained(tmp_path / "t")
    base = [f"model.teacher={tmp_path / 't'}", "model.student=HuggingFaceTB/SmolLM-135M", "model.teacher_dtype=float16"]
    whole = plan(load_config(None, base))
    mapped = plan(load_config(None, base + ["model.teacher_device_map=" + str(_map()).replace("'", ""),
                                            f"model.teacher_offload_folder={tmp_path}"]))
    assert whole["components"]["teacher_weights"] == 2 * TOTAL
    assert mapped["components"]["teacher_weights"] == 2 * (TOTAL - 2 * LAYER)
    assert mapped["components"]["teacher_forward"] - whole["components"]["teacher_forward"] == 2 * LAYER
    # a mapped teacher runs whole (heads.teacher_head: no fused head, its head may be offloaded)
    assert whole["teacher_head"] == "shared" and mapped["teacher_head"] is None
    assert whole["persistent_bytes"] - mapped["persistent_bytes"] == \
        2 * 2 * LAYER + whole["components"]["teacher_head_shared"]
