"""model.teacher_device_map: the teacher loaded through transformers' big-model loading (Accelerate's hooks)
with part of its layers offloaded to disk gives the same logits as the teacher in memory, under every routing
mode of sakd.models.moe (whose router patch must run inside Accelerate's hook, where the offloaded router
weights exist); `sakd cache-teacher` writes the same bytes and a live distillation the same losses with the
map as without; bad values end in one line."""

import subprocess
import sys

import pytest
import torch

from sakd.config import load_config
from sakd.errors import UserError
from sakd.models import moe
from sakd.models.load import load_teacher
from sakd.models.placement import big_model_placement
from tests.conftest import ROOT, tiny_overrides

CPU = torch.device("cpu")


def _disk_map(folder) -> dict:
    """The tiny teacher (2 layers, tied head) with its second layer on disk."""
    return big_model_placement({"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                                "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"},
                               offload_folder=str(folder))


@pytest.fixture(scope="module")
def pair(tiny_assets, tmp_path_factory):
    """(teacher in memory, the same teacher with layer 1 offloaded to disk), fp32."""
    ref = load_teacher(str(tiny_assets["teacher"]), CPU, "float32")
    off = load_teacher(str(tiny_assets["teacher"]), CPU, "float32",
                       placement=_disk_map(tmp_path_factory.mktemp("offload")))
    return ref, off


def _ids(n: int = 3, length: int = 17) -> torch.Tensor:
    return torch.randint(0, 600, (n, length), generator=torch.Generator().manual_seed(0))


def test_layers_really_are_offloaded(pair):
    _, off = pair
    on_meta = {n for n, p in off.named_parameters() if p.device.type == "meta"}
    assert on_meta and all(n.startswith("model.layers.1.") for n in on_meta)
    assert "model.layers.1.mlp.gate.weight" in on_meta  # the router itself: loaded only inside its forward
    assert off.hf_device_map["model.layers.1"] == "disk"


@pytest.mark.parametrize("mode", ["topk", "ka", "all"])
def test_offloaded_teacher_gives_the_same_logits_under_each_routing(pair, mode):
    # Before the router patch moved inside Accelerate's hook ("_old_forward"), ka and all read the offloaded
    # router weight as a meta tensor: logits off by up to 0.04.
    ref, off = pair
    ids = _ids()
    got = {}
    for name, model in (("ref", ref), ("off", off)):
        g = torch.Generator().manual_seed(5)
        kw = {"sample_prob": 0.5, "generator": g, "experts": 2} if mode == "ka" else {}
        with torch.no_grad(), moe.routing(model, mode, **kw) as stats:
            got[name] = model(input_ids=ids).logits
        got[name + "_usage"] = stats.summary()
    assert got["off"].device.type == "cpu" and got["off"].dtype == torch.float32
    assert torch.allclose(got["off"], got["ref"], rtol=0, atol=1e-6), (got["off"] - got["ref"]).abs().max()
    assert got["off_usage"] == got["ref_usage"]  # the routing telemetry read the real router weights too


def test_routing_restores_the_hooked_router(pair):
    _, off = pair
    gate = off.model.layers[1].mlp.gate
    before = dict(gate.__dict__)
    with moe.routing(off, "all"):
        assert gate.__dict__["_old_forward"] is not before["_old_forward"]
    assert gate.__dict__.get("_old_forward") is before["_old_forward"]
    assert gate.__dict__.get("forward") is before.get("forward")


def test_max_memory_forces_offload_with_the_same_logits(tiny_assets, tmp_path, pair):
    ref, _ = pair
    placement = big_model_placement("auto", {"cpu": 40_000}, str(tmp_path / "off"))
    off = load_teacher(str(tiny_assets["teacher"]), CPU, "float32", placement=placement)
    assert "disk" in set(off.hf_device_map.values())
    with torch.no_grad():
        assert torch.allclose(off(input_ids=_ids()).logits, ref(input_ids=_ids()).logits, rtol=0, atol=1e-6)


def test_cache_teacher_writes_the_same_bytes_with_the_map(tiny_assets, tmp_path):
    from sakd.teacher_cache.builder import build_cache
    from tests.teacher_cache.test_cache_build import _same_cache

    kw = dict(shard_spans=2, batch_size=2, log=lambda *_: None)
    base = tiny_overrides(tiny_assets, tmp_path / "run", **{"data.max_examples": 12})
    build_cache(load_config(None, base), tmp_path / "plain", **kw)
    mapped = base + ['model.teacher_device_map={model.embed_tokens: cpu, model.layers.0: cpu, model.layers.1: disk, '
                     'model.norm: cpu, model.rotary_emb: cpu, lm_head: cpu}',
                     f"model.teacher_offload_folder={tmp_path / 'off'}"]
    build_cache(load_config(None, mapped), tmp_path / "mapped", **kw)
    assert any((tmp_path / "off").iterdir())  # weights really were read from the offload folder
    _same_cache(tmp_path / "mapped", tmp_path / "plain")


def test_live_distillation_with_the_map_matches_the_teacher_in_memory(tiny_assets, tmp_path):
    from sakd.train.distill import distill

    quiet = dict(log=lambda *_: None, progress=False)
    extra = {"train.max_steps": 2, "data.max_examples": 16, "moe.mode": "ka", "moe.sample_prob": 0.5}
    plain = distill(load_config(None, tiny_overrides(tiny_assets, tmp_path / "a", **extra)), **quiet)
    mapped = distill(load_config(None, tiny_overrides(
        tiny_assets, tmp_path / "b", **extra, **{"model.teacher_device_map": "auto",
                                                "model.teacher_max_memory": "{cpu: 40000}",
                                                "model.teacher_offload_folder": tmp_path / "off"})), **quiet)
    assert mapped["teacher_bpb"] == pytest.approx(plain["teacher_bpb"], rel=1e-6)
    assert mapped["student_bpb_final"] == pytest.approx(plain["student_bpb_final"], rel=1e-6)


@pytest.mark.parametrize("overrides, fragment", [
    (["model.teacher_device_map=gpu0"], "model.teacher_device_map='gpu0'"),
    (["model.teacher_device_map={model.layers.1: gpu}"], "is not a device"),
    (["model.teacher_device_map={model.layers.1: disk}"], "model.teacher_offload_folder"),
    (["model.teacher_max_memory={0: 10GiB}"], "without model.teacher_device_map"),
    (["model.teacher_offload_folder=/tmp/x"], "without model.teacher_device_map"),
    (["model.teacher_device_map=auto", "model.teacher_max_memory={0: lots}"], "is not a size"),
    (["model.teacher_device_map=auto", "model.teacher_max_memory={tpu: 1GB}"], "is not a device"),
    (["model.teacher_device_map=auto", "moe.mode=sar"], "moe.mode=sar"),
])
def test_bad_values_are_config_errors(overrides, fragment):
    with pytest.raises(UserError, match=".*" + fragment.replace("[", r"\[").replace("{", r"\{")):
        load_config(None, overrides)


@pytest.mark.parametrize("device_map, fragment", [
    ("{model.layers.0: cpu}", "parameter 'model.embed_tokens.weight' falls under no key"),  # transformers: silent
    ("{'': cpu, model.layer.1: disk}", "'model.layer.1' is not a module of the teacher"),    # transformers: ignored
])
def test_a_map_that_does_not_fit_the_teacher_is_one_line(tiny_assets, tmp_path, device_map, fragment):
    r = subprocess.run([sys.executable, "-W", "ignore", "-m", "sakd.cli", "cache-teacher", "--out",
                        str(tmp_path / "c"), *tiny_overrides(tiny_assets, tmp_path / "run", **{"data.max_examples": 4}),
                        f"model.teacher_device_map={device_map}", f"model.teacher_offload_folder={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith("sakd cache-teacher: error: model.teacher_device_map: ") and fragment in lines[0]


def test_fp32_recompute_works_through_the_offload_hooks(tiny_assets, tmp_path):
    # train.nonfinite_teacher=recompute casts each module's weights to fp32 around its forward; an offloaded
    # module's weights arrive inside Accelerate's hook, cast to the (then fp32) parameter's dtype
    from sakd.models.load import fp32_forward

    ref = load_teacher(str(tiny_assets["teacher"]), CPU, "float16")
    off = load_teacher(str(tiny_assets["teacher"]), CPU, "float16", placement=_disk_map(tmp_path))
    with torch.no_grad(), fp32_forward(ref):
        want = ref(input_ids=_ids()).logits
    with torch.no_grad(), fp32_forward(off):
        got = off(input_ids=_ids()).logits
    assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want)
    assert {p.dtype for p in off.parameters()} == {torch.float16}  # back to 16 bits, offloaded ones included
    with torch.no_grad():
        assert torch.equal(off(input_ids=_ids()).logits, ref(input_ids=_ids()).logits)
