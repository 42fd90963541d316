"""Reliability of `sakd distill`: exact resume after SIGKILL / SIGTERM / a crash inside a checkpoint
write, atomic checkpoints, fallback past a corrupt checkpoint, full disk, non-finite teacher outputs,
train.max_time. The guarantees are listed in docs/reliability.md.

End-to-end tests run the real CLI in a subprocess (signals, exit codes, os._exit). Faults inside the
checkpoint writer are injected into that subprocess by a ``sitecustomize`` module put first on
PYTHONPATH, which wraps ``torch.save`` / ``safetensors.torch.save_file`` before sakd imports them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sakd.train.checkpoint import list_checkpoints, load_latest, save_checkpoint
from sakd.errors import UserError
from tests.conftest import ROOT, assert_user_error, tiny_overrides

# Both configurations train every kind of state that must come back on resume: student + AdamW +
# schedule + data position + torch RNG, and either the SAR router (own AdamW) with hidden-state
# projectors, or the KA sampling generator with the contrastive projector and the chunk loss.
CONFIGS = {
    "sar+hidden": {"moe.mode": "sar", "moe.router_lr": 0.01, "loss.hidden.weight": 0.5, "loss.ce_weight": 0.5},
    "ka+contrastive": {"moe.mode": "ka", "moe.sample_prob": 0.5, "loss.contrastive.weight": 0.5,
                       "loss.chunk_weight": 0.5},
}
STEPS = 12
EXACT = {"train.max_steps": STEPS, "train.save_every": 1, "train.deterministic": "true"}
# per-step log entries that measure the wall clock, not the computation
CLOCK_KEYS = {"seconds", "tokens_per_s", "data_wait_s"}  # wall-clock measurements, not training state


def _env(**extra) -> dict:
    # One thread: these models are tiny, and on a busy machine two threads per process are ~30x slower.
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def _cmd(overrides, *flags) -> list[str]:
    return [sys.executable, "-m", "sakd.cli", "distill", "--no-progress", *flags, *map(str, overrides)]


def run_cli(overrides, *flags, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(overrides, *flags), capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env=env or _env())


def wait_for(cond, timeout=300.0, every=0.02):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(every)
    return False


def newest_step(out: Path) -> int:
    found = list_checkpoints(out / "checkpoints")
    return int(found[-1].name.split("-")[1]) if found else 0


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "student" / "model.safetensors"))


def history(out: Path) -> list[dict]:
    return [{k: v for k, v in rec.items() if k not in CLOCK_KEYS}
            for rec in json.loads((out / "history.json").read_text())["history"]]


def assert_same_run(a: Path, b: Path) -> None:
    """Bitwise: every student tensor, the SAR router if any, every logged loss term of every step."""
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k}: max |diff| {(wa[k] - wb[k]).abs().max():.3e}"
    if (a / "router.safetensors").exists():
        ra, rb = load_file(str(a / "router.safetensors")), load_file(str(b / "router.safetensors"))
        assert ra.keys() == rb.keys() and all(torch.equal(ra[k], rb[k]) for k in ra)
    ha, hb = history(a), history(b)
    assert [h["step"] for h in hb] == list(range(1, STEPS + 1))
    assert ha == hb


def tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def baselines(tiny_assets, tmp_path_factory):
    """name -> output folder of an uninterrupted run (computed once per configuration)."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            out = tmp_path_factory.mktemp("baseline") / name
            r = run_cli(tiny_overrides(tiny_assets, out, **CONFIGS[name], **EXACT))
            assert r.returncode == 0, r.stderr[-3000:]
            init = load_file(str(tiny_assets["student"] / "model.safetensors"))
            moved = [k for k, v in final_weights(out).items() if not torch.equal(v, init[k])]
            assert moved, "the baseline did not train"
            cache[name] = out
        return cache[name]

    return get


# ----------------------------------------------------------------------------- exact resume

@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_sigkill_at_a_random_step_then_resume_is_bitwise_exact(name, tiny_assets, tmp_path, baselines):
    base = baselines(name)
    k = random.Random(f"sigkill/{name}").randint(2, 6)  # seeded: the same step on every run of the test
    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_assets, out, **CONFIGS[name], **EXACT)
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(_cmd(overrides), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=_env())
        try:
            wait_for(lambda: newest_step(out) >= k or proc.poll() is not None)
            assert proc.poll() is None, "the run ended before it could be killed"
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = newest_step(out)
    assert k <= killed_at < STEPS and not (out / "student").exists()

    r = run_cli(overrides, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    resumed_from = int(re.search(r"resume: continuing from step-(\d+)", r.stdout).group(1))
    assert resumed_from == killed_at  # a step-* folder exists only once complete (atomic rename)
    assert_same_run(base, out)


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_exits_0_and_resume_is_exact(tiny_assets, tmp_path, baselines):
    base = baselines("sar+hidden")
    out = tmp_path / "run"
    # eval_every=1 prints "step N: held-out ..." after each step (evaluation does not change training);
    # save_every=0: the checkpoint seen afterwards can only come from the SIGTERM handling.
    overrides = tiny_overrides(tiny_assets, out, **{**CONFIGS["sar+hidden"], **EXACT, "train.save_every": 0,
                                                    "train.eval_every": 1})
    with open(tmp_path / "stderr.log", "w") as err:
        proc = subprocess.Popen(_cmd(overrides), stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT, env=_env())
        try:
            seen = []
            for line in proc.stdout:
                seen.append(line)
                if line.startswith("step 2:"):
                    proc.send_signal(signal.SIGTERM)
                    break
            rest, _ = proc.communicate(timeout=300)
        finally:
            proc.kill()
            proc.wait()
    stdout = "".join(seen) + rest
    assert proc.returncode == 0, stdout[-3000:]
    m = re.search(r"stopping at step (\d+): SIGTERM received; checkpoint saved", stdout)
    assert m, stdout[-3000:]
    k = int(m.group(1))
    assert 2 <= k < STEPS
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [f"step-{k:06d}"]
    assert "SIGTERM" in json.loads((out / "result.json").read_text())["stopped"]
    assert not (out / "student").exists()  # an interrupted run exports nothing

    r = run_cli(overrides, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resume: continuing from step-{k:06d} (step {k})" in r.stdout
    assert json.loads((out / "result.json").read_text())["stopped"] is None
    assert_same_run(base, out)


def test_max_time_stops_cleanly_with_a_checkpoint(tiny_assets, tmp_path):
    from sakd.config import load_config
    from sakd.train.distill import distill

    out = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(tiny_assets, out, **{"train.max_steps": 1000, "train.max_time": "1s"}))
    logs = []
    result = distill(cfg, progress=False, log=logs.append)
    steps = result["steps"]
    assert 1 <= steps < 1000 and "train.max_time=1s reached" in result["stopped"]
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [f"step-{steps:06d}"]
    assert any(l.startswith(f"stopping at step {steps}: train.max_time=1s reached") for l in logs)
    assert not (out / "student").exists()


# ----------------------------------------------------------------------------- atomic checkpoints

FAULTS = '''
import io, os, errno
import torch, safetensors.torch
from safetensors import SafetensorError

KIND, AT = os.environ["SAKD_FAULT"], int(os.environ["SAKD_FAULT_AT"])
_calls = {"n": 0}
_torch_save, _real_save_file = torch.save, safetensors.torch.save_file

def _save(obj, f, *a, **kw):
    if not str(f).endswith("state.pt"):
        return _torch_save(obj, f, *a, **kw)
    _calls["n"] += 1
    if _calls["n"] < AT:
        return _torch_save(obj, f, *a, **kw)
    buf = io.BytesIO()
    _torch_save(obj, buf, *a, **kw)
    with open(f, "wb") as fh:  # half of the real bytes reach the disk
        fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    if KIND == "crash":  # power loss / SIGKILL in the middle of the write
        os._exit(137)
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")  # torch's ENOSPC

def _save_file(tensors, filename, *a, **kw):
    if KIND == "enospc-safetensors" and _calls["n"] + 1 >= AT:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    return _real_save_file(tensors, filename, *a, **kw)

torch.save, safetensors.torch.save_file = _save, _save_file
'''


def _fault_env(tmp_path: Path, kind: str, at: int) -> dict:
    d = tmp_path / "faults"
    d.mkdir(exist_ok=True)
    (d / "sitecustomize.py").write_text(FAULTS)
    return _env(PYTHONPATH=os.pathsep.join([str(d), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                SAKD_FAULT=kind, SAKD_FAULT_AT=str(at))


@pytest.mark.slow
def test_crash_inside_a_checkpoint_write_keeps_the_previous_ones_and_resume_is_exact(tiny_assets, tmp_path,
                                                                                     baselines):
    base = baselines("sar+hidden")
    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_assets, out, **CONFIGS["sar+hidden"], **EXACT)
    r = run_cli(overrides, env=_fault_env(tmp_path, "crash", at=3))  # dies half-way through step 3's state.pt
    assert r.returncode == 137, r.stderr[-3000:]
    ckpt = out / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpt)] == ["step-000001", "step-000002"]
    leftovers = [p.name for p in ckpt.iterdir() if p.name.startswith(".tmp-step-000003-")]
    assert len(leftovers) == 1  # the half-written one exists, but never under a step-* name
    path, _, state = load_latest(ckpt)
    assert path.name == "step-000002" and state["step"] == 2

    r = run_cli(overrides, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resume: continuing from step-000002 (step 2)" in r.stdout
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".")]  # the dead writer's folder is gone
    assert_same_run(base, out)


@pytest.mark.slow
def test_disk_full_while_saving_exits_2_and_keeps_earlier_checkpoints(tiny_assets, tmp_path):
    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_assets, out, **{"train.max_steps": 4, "train.save_every": 1})
    r = run_cli(overrides, env=_fault_env(tmp_path, "enospc-torch", at=2))
    ckpt = out / "checkpoints"
    assert [p.name for p in ckpt.iterdir()] == ["step-000001"]  # no temporary folder left behind
    assert load_latest(ckpt)[2]["step"] == 1
    assert_user_error(r, "cannot write checkpoint", "step-000002", "free disk space", "earlier checkpoints are intact")


@pytest.mark.parametrize("fault", ["OSError", "SafetensorError", "torch.save RuntimeError", "not a write failure"])
def test_failed_save_leaves_no_trace_and_the_previous_checkpoint_intact(tmp_path, monkeypatch, fault):
    import sakd.train.checkpoint as ck
    from safetensors import SafetensorError

    ckpt = tmp_path / "checkpoints"
    tensors = {"student": {"w": torch.arange(6.0).reshape(2, 3)}}
    save_checkpoint(ckpt, 1, tensors, {"step": 1, "x": [1, 2]}, keep=2)
    before = tree_hashes(ckpt)
    errors = {"OSError": OSError(28, "No space left on device"),
              "SafetensorError": SafetensorError("Error while serializing: I/O error: No space left on device "
                                                 "(os error 28)"),
              "torch.save RuntimeError": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos"),
              "not a write failure": TypeError("cannot pickle 'generator' object")}

    def failing_save(obj, f, *a, **kw):
        Path(f).write_bytes(b"half a file")
        raise errors[fault]

    monkeypatch.setattr(ck.torch, "save", failing_save)
    expected = TypeError if fault == "not a write failure" else UserError
    with pytest.raises(expected) as info:
        save_checkpoint(ckpt, 2, tensors, {"step": 2}, keep=2)
    if expected is UserError:
        assert "step-000002" in str(info.value) and "free disk space" in str(info.value)
    assert tree_hashes(ckpt) == before and sorted(p.name for p in ckpt.iterdir()) == ["step-000001"]


def test_save_keeps_the_newest_k_orders_by_step_and_removes_dead_writers_leftovers(tmp_path):
    ckpt = tmp_path / "checkpoints"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (ckpt / f".tmp-step-000005-{dead}").mkdir(parents=True)  # a writer that died mid-save
    (ckpt / f".tmp-step-000005-{dead}" / "state.pt").write_bytes(b"half")
    (ckpt / f".tmp-step-000006-{os.getpid()}").mkdir()  # this process: a save in progress, not ours to remove
    for step in (999_999, 1_000_000, 1_000_001):
        save_checkpoint(ckpt, step, {"student": {"w": torch.full((2,), float(step))}}, {"step": step}, keep=2)
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == [f".tmp-step-000006-{os.getpid()}", "step-1000000", "step-1000001"]
    assert [p.name for p in list_checkpoints(ckpt)] == ["step-1000000", "step-1000001"]  # numeric, not by name
    path, tensors, state = load_latest(ckpt)
    assert path.name == "step-1000001" and state["step"] == 1_000_001 and tensors["student"]["w"][0] == 1_000_001


@pytest.mark.parametrize("damage", ["truncate state.pt", "delete COMPLETE", "truncate student.safetensors",
                                    "COMPLETE names another step", "empty folder"])
def test_load_latest_skips_a_damaged_newest_checkpoint_with_a_warning(tmp_path, damage):
    ckpt = tmp_path / "checkpoints"
    for step in (1, 2):
        save_checkpoint(ckpt, step, {"student": {"w": torch.full((100,), float(step))}}, {"step": step}, keep=3)
    new = ckpt / "step-000002"
    if damage == "truncate state.pt":
        (new / "state.pt").write_bytes((new / "state.pt").read_bytes()[:20])
    elif damage == "delete COMPLETE":
        (new / "COMPLETE").unlink()
    elif damage == "truncate student.safetensors":
        (new / "student.safetensors").write_bytes((new / "student.safetensors").read_bytes()[:-50])
    elif damage == "COMPLETE names another step":
        (new / "COMPLETE").write_text("7")
    else:
        shutil.rmtree(new)
        new.mkdir()
    logs = []
    with pytest.warns(UserWarning, match="step-000002 is unreadable.*falling back"):
        path, tensors, state = load_latest(ckpt, log=logs.append)
    assert path.name == "step-000001" and state["step"] == 1 and torch.equal(tensors["student"]["w"],
                                                                               torch.ones(100))
    assert len(logs) == 1 and logs[0].startswith("warning: checkpoint")


@pytest.mark.slow
def test_resume_falls_back_past_a_corrupt_newest_checkpoint_and_stays_exact(tiny_assets, tmp_path, baselines):
    base = baselines("sar+hidden")
    out = tmp_path / "run"
    shutil.copytree(base / "checkpoints", out / "checkpoints")  # the last two: STEPS - 1 and STEPS
    state = out / "checkpoints" / f"step-{STEPS:06d}" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    r = run_cli(tiny_overrides(tiny_assets, out, **CONFIGS["sar+hidden"], **EXACT), "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(rf"warning: checkpoint \S+step-{STEPS:06d} is unreadable .*falling back", r.stdout), r.stdout
    assert f"resume: continuing from step-{STEPS - 1:06d} (step {STEPS - 1})" in r.stdout
    assert_same_run(base, out)


@pytest.mark.slow
def test_a_checkpoint_from_before_per_process_rng_states_resumes_exactly(tiny_assets, tmp_path, baselines):
    """The loop writes the RNG states and the KA stream once, per process (``rng_ranks``, ``ka_rng_ranks``); a
    checkpoint of the earlier format, with the main process's ``rng`` / ``ka_rng`` alone, still resumes bit for
    bit (the KA expert draws of the remaining step come from the saved stream)."""
    base = baselines("ka+contrastive")
    out = tmp_path / "run"
    step = out / "checkpoints" / f"step-{STEPS - 1:06d}"
    shutil.copytree(base / "checkpoints" / step.name, step)
    state = torch.load(step / "state.pt", weights_only=False)
    assert not {"rng", "ka_rng"} & set(state)
    assert len(state["rng_ranks"]) == len(state["ka_rng_ranks"]) == 1
    state["rng"], state["ka_rng"] = state.pop("rng_ranks")[0], state.pop("ka_rng_ranks")[0]
    torch.save(state, step / "state.pt")
    r = run_cli(tiny_overrides(tiny_assets, out, **CONFIGS["ka+contrastive"], **EXACT), "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resume: continuing from step-{STEPS - 1:06d} (step {STEPS - 1})" in r.stdout
    assert "KA sampling stream" not in r.stdout  # the saved KA stream was taken back, not restarted
    assert_same_run(base, out)


@pytest.mark.slow
def test_resume_with_another_configuration_is_refused_and_keeps_the_checkpoints(tiny_assets, tmp_path, baselines):
    base = baselines("sar+hidden")
    out = tmp_path / "run"
    shutil.copytree(base / "checkpoints", out / "checkpoints")
    before = {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    changed = {**CONFIGS["sar+hidden"], **EXACT, "loss.kd_weight": 0.25}
    r = run_cli(tiny_overrides(tiny_assets, out, **changed), "--resume")
    assert_user_error(r, "was written with another configuration", "loss.kd_weight", "-> 0.25", "train.output_dir")
    assert {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()} == before
    # what a resumed run may change (how long it runs, how often it saves and evaluates) is accepted
    from sakd.train.distill import _check_resume_config
    from sakd.config import load_config, to_dict

    saved = to_dict(load_config(None, tiny_overrides(tiny_assets, out, **CONFIGS["sar+hidden"], **EXACT)))
    later = to_dict(load_config(None, tiny_overrides(tiny_assets, tmp_path / "elsewhere", **{
        **CONFIGS["sar+hidden"], **EXACT, "train.max_steps": 50, "train.save_every": 7, "eval.max_bytes": 999})))
    _check_resume_config(out, saved, later)


# ----------------------------------------------------------------------------- bad numbers, bad folders

def _poisoned_teacher(tiny_assets, folder: Path, token: str = "Ġnot") -> Path:
    """A copy of the tiny teacher whose INPUT embedding of ``token`` is +inf: every example containing
    that token gives non-finite teacher logits (10 of the 64 training spans contain it), the others do
    not. The output head is untied first (a copy), else the inf would be in every logit row."""
    from transformers import AutoTokenizer

    shutil.copytree(tiny_assets["teacher"], folder)
    tid = AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids(token)
    config = json.loads((folder / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(config))
    w = load_file(str(folder / "model.safetensors"))
    w["lm_head.weight"] = w["model.embed_tokens.weight"].clone()
    w["model.embed_tokens.weight"][tid] = float("inf")
    save_file(w, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("ce_weight", [
    0.5,
    0.0,
])
def test_non_finite_teacher_outputs_are_skipped_counted_and_never_reach_the_student(tiny_assets, tmp_path,
                                                                                   ce_weight):
    from sakd.config import load_config
    from sakd.train.distill import distill

    assets = dict(tiny_assets, teacher=_poisoned_teacher(tiny_assets, tmp_path / "teacher"))
    out = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(assets, out, **{"train.max_steps": 6, "train.save_every": 2,
                                                           "loss.ce_weight": ce_weight}))
    result = distill(cfg, progress=False, log=lambda *_: None)
    assert result["steps"] == 6
    counted = json.loads((out / "result.json").read_text())["counters"]["nonfinite_teacher"]
    assert 0 < counted < 6  # some micro-batches hit the poisoned token, some did not
    files = [out / "student" / "model.safetensors"] + sorted((out / "checkpoints").rglob("*.safetensors"))
    for f in files:
        for k, v in load_file(str(f)).items():
            assert torch.isfinite(v).all(), (f, k)
    init = load_file(str(tiny_assets["student"] / "model.safetensors"))
    assert any(not torch.equal(v, init[k]) for k, v in final_weights(out).items())  # it did train


def test_output_dir_that_cannot_be_created_exits_2_with_one_line(tiny_assets, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    r = run_cli(tiny_overrides(tiny_assets, blocker / "run"))
    assert_user_error(r, "train.output_dir", str(blocker / "run"), "is not writable")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_dir_exits_2_with_one_line(tiny_assets, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        r = run_cli(tiny_overrides(tiny_assets, parent / "run"))
    finally:
        parent.chmod(0o755)
    assert_user_error(r, "train.output_dir", "is not writable")


def test_every_process_checks_the_shared_output_dir_at_once_without_tripping_over_the_others(tmp_path):
    """Under `accelerate launch` every process checks train.output_dir at the same moment. A probe file
    with one fixed name raced: one process unlinked the file another had just written, which then
    reported the folder "not writable" and took the whole launch down (seen in CI, intermittently).
    Here 4 threads check the same folder 200 times, released together by a barrier each time."""
    import threading
    from types import SimpleNamespace

    from sakd.train.distill import _output_dir

    cfg = SimpleNamespace(train=SimpleNamespace(output_dir=str(tmp_path / "run")))
    errors: list[str] = []
    barrier = threading.Barrier(4)

    def check() -> None:
        for _ in range(200):
            barrier.wait()
            try:
                _output_dir(cfg, False)
            except UserError as e:
                errors.append(str(e))

    threads = [threading.Thread(target=check) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [], (len(errors), errors[:1])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []  # no probe left behind
