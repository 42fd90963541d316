"""Evaluation (``sakd evaluate``) and the run report (report.json / report.md; plots in sakd/report/plots.py,
the model card in sakd/report/model_card.py).

Units are always named: bits per UTF-8 byte for held-out quality (comparable across
tokenizers), perplexity per token of a model's OWN tokenizer (not comparable across
tokenizers), parameters as counts, weights in bytes at the stored dtype, throughput in
tokens of the model's own tokenizer per second and in UTF-8 bytes of text per second.
Plots are drawn with matplotlib's Agg canvas (no display, no pyplot global state).
"""

from __future__ import annotations

import json
import math
import struct
import time
from pathlib import Path

import torch

from sakd.errors import UserError
from sakd.report.model_card import format_number, lm_eval_tasks, write_model_card  # noqa: F401 (sakd.report.run's public names)
from sakd.report.plots import (TERM_UNITS, plot_expert_usage, plot_heldout_bpb, plot_loss_terms,  # noqa: F401
                        plot_router_shift)

EVAL_UNITS = {
    "bits_per_byte": "held-out NLL in bits / UTF-8 bytes of the text (lower is better; comparable across tokenizers)",
    "ppl_per_own_token": "exp(mean NLL in nats per token of this model's own tokenizer); NOT comparable across "
                         "tokenizers",
    "parameters": "count (tied embeddings counted once)",
    "active_parameters_per_token": "count: total minus (E - k)/E of the routed-expert parameters (MoE); "
                                   "= parameters for a dense model",
    "weights_bytes": "bytes of *.safetensors files on disk, at the stored dtype",
    "tokens_per_s": "tokens of this model's own tokenizer scored per second (forward passes over windows, "
                    "after a warm-up pass, including tokenization)",
    "bytes_per_s": "UTF-8 bytes of text scored per second (same passes)",
    "seconds": "wall-clock seconds of the timed scoring pass",
}


# ----------------------------------------------------------------------------- model facts

def active_parameters(model) -> int:
    """Parameters used per token: all of them for a dense model; for an MoE model the total
    minus (E - k)/E of every routed block's expert parameters (shared experts always count)."""
    from sakd.models import moe
    from sakd.models.load import count_parameters

    total = count_parameters(model)
    inactive = 0.0
    for _, block in moe.find_moe_blocks(model):
        E = block.gate.weight.shape[0]
        k = int(getattr(block.gate, "top_k", E))
        inactive += (E - k) / E * sum(p.numel() for p in block.experts.parameters())
    return int(round(total - inactive))


def weights_on_disk(name: str) -> tuple[int | None, list[str]]:
    """(bytes of the *.safetensors files, sorted stored dtypes read from their headers), or (None, [])."""
    from sakd.models.load import local_model_folder

    folder = local_model_folder(name, allow_patterns=["*.safetensors", "*.json"])  # None: the size is unknown
    files = sorted(folder.glob("*.safetensors")) if folder else []
    if not files:
        return None, []
    dtypes = set()
    for f in files:
        with open(f, "rb") as fh:  # safetensors: u64 little-endian header length, then a JSON header
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        dtypes |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return sum(f.stat().st_size for f in files), sorted(dtypes)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def model_metrics(model, tokenizer, name: str, texts: list[str], *, seq_len: int, batch_size: int = 8,
                  device="cpu") -> dict:
    """Held-out bits per byte, per-own-token perplexity, sizes and scoring throughput of one model."""
    from sakd.evaluate.bpb import nll_bits
    from sakd.models.load import count_parameters

    model.eval()
    warm = texts[0][:4 * seq_len]  # warm-up: kernels, allocator, lazy initialisation
    nll_bits(model, tokenizer, [warm], seq_len, batch_size, device)
    _sync(device)
    t0 = time.perf_counter()
    bits, n_bytes, n_tokens = nll_bits(model, tokenizer, texts, seq_len, batch_size, device)
    _sync(device)
    dt = max(time.perf_counter() - t0, 1e-9)
    size, dtypes = weights_on_disk(name)
    return {
        "name": name,
        "bits_per_byte": bits / max(n_bytes, 1),
        "ppl_per_own_token": math.exp(bits * math.log(2) / max(n_tokens, 1)),
        "nll_bits": bits, "bytes": n_bytes, "own_tokens": n_tokens,
        "parameters": count_parameters(model),
        "active_parameters_per_token": active_parameters(model),
        "weights_bytes": size, "stored_dtypes": dtypes, "run_dtype": str(next(model.parameters()).dtype),
        "tokens_per_s": n_tokens / dt, "bytes_per_s": n_bytes / dt, "seconds": dt,
    }


# ----------------------------------------------------------------------------- sakd evaluate

def evaluate_command(student: str, teacher: str | None, data: str, *, max_bytes: int = 200_000, seq_len: int = 512,
                     batch_size: int = 8, device: str | None = None) -> dict:
    """``sakd evaluate``: metrics of the student (and the teacher), retention when a teacher is given.

    Returns {"data", "heldout_bytes", "seq_len_tokens", "batch_size", "device", "student": {...},
    "teacher": {...} (optional), "retention": {...} (optional), "units": {...}}."""
    from sakd.data.text import heldout_texts, read_source
    from sakd.models.load import load_student, load_teacher, load_tokenizer

    if max_bytes <= 0 or seq_len < 2:
        raise UserError(f"--max-bytes={max_bytes} must be > 0 and --seq-len={seq_len} at least 2")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from sakd.data.chat_formats import source_format

    s_tok = load_tokenizer(student, "student")
    fmt = source_format(data, "auto")
    if fmt != "text":  # conversations: each model's own (saved) chat template, assistant content scored only
        from sakd.data.chat import configure_template
        from sakd.data.chat_dataset import heldout_conversations
        from sakd.data.chat_formats import read_conversations

        texts = heldout_conversations(read_conversations(data, fmt), max_bytes)
        configure_template(s_tok, None, "student")
        name = data
    else:
        src = read_source(data)
        texts, name = heldout_texts(src.texts, max_bytes), src.name
    if not texts:
        raise UserError(f"--data {data!r}: the first {max_bytes} bytes hold no complete word; raise --max-bytes")
    out = {"data": name, "format": fmt, "heldout_bytes": sum(len(t.encode("utf-8")) for t in texts),
           "seq_len_tokens": seq_len, "batch_size": batch_size, "device": str(dev)}
    s_model = load_student(student, dev).eval()
    out["student"] = model_metrics(s_model, s_tok, student, texts, seq_len=seq_len, batch_size=batch_size, device=dev)
    if teacher:
        from sakd.evaluate.retention import retention

        t_tok = load_tokenizer(teacher, "teacher")
        if fmt != "text":
            configure_template(t_tok, None, "teacher")
        t_model = load_teacher(teacher, dev)
        out["teacher"] = model_metrics(t_model, t_tok, teacher, texts, seq_len=seq_len, batch_size=batch_size,
                                       device=dev)
        out["retention"] = retention(t_model, t_tok, s_model, s_tok, texts, seq_len=seq_len, batch_size=batch_size)
    out["units"] = dict(EVAL_UNITS)
    return out


def format_evaluation(result: dict) -> str:
    """A plain-text table of ``evaluate_command``'s result, every row with its unit."""
    sides = [s for s in ("student", "teacher") if s in result]
    rows = [("held-out bits per byte", "bits/byte", "bits_per_byte", ",.4f"),
            ("perplexity per token *", "per own token", "ppl_per_own_token", ",.2f"),
            ("parameters", "count", "parameters", ","),
            ("active parameters per token", "count", "active_parameters_per_token", ","),
            ("weights on disk", "MB (stored dtype)", "weights_mb", ",.2f"),
            ("scoring throughput", "own tokens/s", "tokens_per_s", ",.0f"),
            ("scoring throughput", "bytes/s", "bytes_per_s", ",.0f")]
    lines = [f"held-out text: {result['data']} ({result['heldout_bytes']:,} UTF-8 bytes), windows of "
             f"{result['seq_len_tokens']} tokens, batch {result['batch_size']}, device {result['device']}", ""]
    if result.get("format", "text") != "text":
        lines[0:1] = [f"held-out conversations ({result['format']}): {result['data']} ({result['heldout_bytes']:,} "
                      "UTF-8 bytes of message content); bits per byte over the assistant's content only, each model "
                      "with its own chat template; retention over the contents joined as text"]
    head = f"{'metric':<30} {'unit':<18}" + "".join(f" {s:>14}" for s in sides)
    lines += [head, "-" * len(head)]
    for label, unit, key, spec in rows:
        vals = []
        for s in sides:
            m = result[s]
            v = m["weights_bytes"] / 1e6 if key == "weights_mb" and m.get("weights_bytes") else m.get(key)
            vals.append(format_number(v, spec) if not isinstance(v, int) else f"{v:,}")
        lines.append(f"{label:<30} {unit:<18}" + "".join(f" {v:>14}" for v in vals))
    dts = "   ".join(f"{s}: {','.join(result[s]['stored_dtypes']) or 'n/a'}" for s in sides)
    lines += [f"stored dtypes: {dts}",
              "* per token of that model's own tokenizer: not comparable across tokenizers (compare bits per byte)."]
    r = result.get("retention")
    if r:
        lines += ["", "retention (teacher -> student, byte-aligned positions only):"]
        for label, key, unit in [
                ("KL(teacher || student), shared vocab", "kl_nats_per_position", "nats / 1:1 position"),
                ("top-1 agreement", "top1_agreement", "fraction of 1:1 positions"),
                ("top-5 agreement", "top5_agreement", "fraction of 1:1 positions"),
                ("teacher mass outside shared vocab", "teacher_mass_outside_shared", "fraction"),
                ("chunk log-likelihood gap", "chunk_gap_nats_per_chunk", "nats / multi-token chunk"),
                ("chunk log-likelihood gap", "chunk_gap_bits_per_byte", "bits / byte of those chunks"),
                ("student tokens in 1:1 chunks", "frac_student_tokens_one_to_one", "fraction"),
                ("1:1 positions / multi-token chunks", None, "count")]:
            v = f"{r['one_to_one_positions']:,} / {r['multi_token_chunks']:,}" if key is None else format_number(r[key])
            lines.append(f"  {label:<40} {v:>14}  {unit}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- expert usage

def usage_from_history(history: list[dict], mode: str) -> tuple[list[tuple[str, dict]], str]:
    """Heatmap panels from the loop's per-step ``moe_usage`` (``moe_top1`` under all/sar when
    logged: with every expert used, slot shares are uniform and say nothing)."""
    key, what = "moe_usage", "share of expert slots (as routed in distillation)"
    if mode in ("all", "sar") and any(isinstance(r.get("moe_top1"), dict) for r in history):
        key, what = "moe_top1", "share of tokens whose router's first choice is the expert"
    logged = [(r["step"], r[key]) for r in history if isinstance(r.get(key), dict)]
    if not logged:
        return [], what
    panels = [(f"step {logged[0][0]}", logged[0][1])]
    if len(logged) > 1:
        panels.append((f"step {logged[-1][0]}", logged[-1][1]))
    return panels, what


@torch.no_grad()
def measure_expert_usage(teacher, tokenizer, texts: list[str], cfg, *, router_state: dict | None = None,
                         max_batches: int = 4) -> tuple[dict[str, list[float]], str]:
    """Run the teacher over a few held-out batches inside ``moe.routing`` under the teacher's evaluation
    routing (``moe.evaluation_mode``: topk for topk/ka, all for all/sar) and return ({layer: [E] fractions}, what they are). Under all/sar
    the router's first-choice share is returned (every expert is used, slot shares are uniform).
    ``router_state`` (e.g. router.safetensors of a SAR run) is loaded for the measurement only."""
    from sakd.models import moe
    from sakd.evaluate.bpb import pad_windows, scoring_windows

    mode = moe.evaluation_mode(cfg.moe.mode)
    dev = next(teacher.parameters()).device
    L, B = cfg.eval.seq_len, cfg.eval.batch_size
    windows = scoring_windows(tokenizer, texts, L)[:B * max_batches]
    saved = moe.router_state(teacher) if router_state else None
    was_training = teacher.training
    teacher.eval()
    try:
        if router_state:
            moe.load_router_state(teacher, router_state)
        with moe.routing(teacher, mode) as r:
            for a in range(0, len(windows), B):
                ids, mask = pad_windows(windows[a:a + B])
                r.set_token_mask(mask.to(dev))
                teacher(input_ids=ids.to(dev), attention_mask=mask.long().to(dev))
            stats = r.stats()
    finally:
        if saved is not None:
            moe.load_router_state(teacher, saved)
        teacher.train(was_training)
    key = "top1" if mode == "all" else "usage"
    what = ("share of tokens whose router's first choice is the expert" if key == "top1"
            else f"share of expert slots (routing: {mode})")
    return {name: d[key] for name, d in stats.items()}, what


def _report_texts(cfg, max_bytes: int = 16_000) -> list[str]:
    from sakd.data.text import heldout_texts, read_source, split_heldout

    d = cfg.data
    if d.eval_source:
        held = read_source(d.eval_source, text_column=d.text_column, config_name=d.config_name, split=d.split).texts
    else:
        src = read_source(d.source, text_column=d.text_column, config_name=d.config_name, split=d.split)
        held = split_heldout(src.texts, d.eval_fraction, cfg.train.seed)[1] or src.texts
    return heldout_texts(held, max_bytes)


def _usage_at_report_time(out: Path, cfg, teacher, teacher_tokenizer, texts, max_auto_bytes: int):
    """(panels, what, note): measured with the given teacher, or one loaded from a small local folder."""
    from sakd.models import moe
    from sakd.models.load import load_teacher, load_tokenizer

    if teacher is None:
        size, _ = weights_on_disk(cfg.model.teacher) if Path(cfg.model.teacher).expanduser().is_dir() else (None, [])
        if not size or size > max_auto_bytes:
            return [], "", ("expert usage: not logged by the loop and no teacher given to the report "
                            "(pass teacher= to write_run_report)")
        teacher = load_teacher(cfg.model.teacher, torch.device("cpu"), "float32")
    if not moe.is_moe(teacher):
        return [], "", "expert usage: the teacher is dense (no MoE blocks)"
    tok = teacher_tokenizer or load_tokenizer(cfg.model.teacher_tokenizer or cfg.model.teacher, "teacher")
    texts = texts if texts is not None else _report_texts(cfg)
    router_file = out / "router.safetensors"
    state = None
    if cfg.moe.mode == "sar" and router_file.is_file():
        from safetensors.torch import load_file

        state = load_file(str(router_file))
    usage, what = measure_expert_usage(teacher, tok, texts, cfg, router_state=state)
    title = "end of run (SAR routers)" if state else "measured at report time"
    return [(title, usage)], what, None


# ----------------------------------------------------------------------------- run report

def _mean_terms(records: list[dict], terms: list[str]) -> dict:
    out = {}
    for t in terms + ["lr", "tokens_per_s", "grad_norm"]:
        vals = [r[t] for r in records if isinstance(r.get(t), (int, float)) and math.isfinite(r[t])]
        if vals:
            out[t] = sum(vals) / len(vals)
    return out


def write_run_report(out_dir, cfg, result: dict, extra: dict | None = None, *, teacher=None, teacher_tokenizer=None,
                     texts: list[str] | None = None, auto_teacher_max_bytes: int = 512 * 2 ** 20) -> dict:
    """``report.json`` and ``report.md`` (with PNG plots) in ``out_dir`` from its ``history.json``.

    Plots: loss_terms.png, heldout_bpb.png, expert_usage.png (from the loop's ``moe_usage``, else
    measured now with ``teacher`` — or the config's teacher when it is a local folder of at most
    ``auto_teacher_max_bytes`` — on ``texts``, default the run's held-out text), router_shift.png
    (SAR runs). A plot that cannot be made is named in the report's notes, never fatal."""
    from sakd.config import to_dict

    out = Path(out_dir)
    hist_file = out / "history.json"
    if not hist_file.is_file():
        raise UserError(f"{str(hist_file)!r} does not exist: the run did not finish (resume it with --resume)")
    data = json.loads(hist_file.read_text())
    history, evals = data.get("history", []), data.get("evals") or result.get("evals") or []
    terms = sorted({k[2:] for rec in history for k in rec if k.startswith("w_") and k[2:] in rec})
    n = max(1, min(10, len(history) // 5))
    notes, plots = [], {}

    def attempt(name, draw):
        try:
            p = draw()
            if p is not None:
                plots[name] = p.name
        except (UserError, OSError, ValueError, RuntimeError) as e:
            notes.append(f"{name}: not drawn ({type(e).__name__}: {str(e).splitlines()[0][:160]})")

    def usage_plot():
        panels, what = usage_from_history(history, cfg.moe.mode)
        # all/sar use every expert: logged slot shares are uniform, the router's first choice says more
        if not panels or (cfg.moe.mode in ("all", "sar") and "first choice" not in what):
            try:
                measured, m_what, note = _usage_at_report_time(out, cfg, teacher, teacher_tokenizer, texts,
                                                               auto_teacher_max_bytes)
            except (UserError, OSError, ValueError, RuntimeError) as e:
                if not panels:
                    raise
                measured, note = [], None
                notes.append(f"expert usage: router first choices not measured ({str(e).splitlines()[0][:120]}); "
                             "showing the logged slot shares")
            if measured:
                panels, what = measured, m_what
            elif not panels:
                notes.append(note)
        return plot_expert_usage(panels, what, out / "expert_usage.png")

    attempt("loss_terms", lambda: plot_loss_terms(history, out / "loss_terms.png"))
    attempt("heldout_bpb", lambda: plot_heldout_bpb(evals, result.get("teacher_bpb"), out / "heldout_bpb.png", extra))
    attempt("expert_usage", usage_plot)
    if any(k.startswith("sar_") for r in history for k in r):
        attempt("router_shift", lambda: plot_router_shift(history, out / "router_shift.png"))
    report = {
        "config": to_dict(cfg),
        "steps": result.get("steps", len(history)),
        "seconds": result.get("seconds"),
        "teacher_bpb": result.get("teacher_bpb"),
        "student_bpb_initial": evals[0]["student_bpb"] if evals else None,
        "student_bpb_final": evals[-1]["student_bpb"] if evals else None,
        "metrics": {"start": _mean_terms(history[:n], terms), "end": _mean_terms(history[-n:], terms),
                    "steps_averaged": n},
        "units": {"teacher_bpb": bpb_unit(cfg), "student_bpb_*": bpb_unit(cfg),
                  "lr": "learning rate", "tokens_per_s": "student tokens per second (cumulative)",
                  "grad_norm": "global L2 norm before clipping", "seconds": "wall-clock seconds",
                  **{t: TERM_UNITS.get(t, "per target") for t in terms}},
        "plots": plots, "notes": notes, "extra": extra or {},
        "result": {k: v for k, v in result.items() if k != "evals"},
    }
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "report.md").write_text(_report_markdown(out, cfg, report, terms), encoding="utf-8")
    return report


def bpb_unit(cfg) -> str:
    """What the held-out bits per byte count: every byte, or on chat data the assistant's content only."""
    from sakd.data.chat_formats import source_format

    chat = source_format(cfg.data.source, cfg.data.format, split=cfg.data.split) != "text"
    return "held-out bits per UTF-8 byte" + (" of the assistant's content" if chat else "")


def _report_markdown(out: Path, cfg, rep: dict, terms: list[str]) -> str:
    m, n = rep["metrics"], rep["metrics"]["steps_averaged"]
    lines = [f"# sakd run report: {out.name}", "",
             f"Teacher `{cfg.model.teacher}` → student `{cfg.model.student}`; routing `{cfg.moe.mode}`, "
             f"logit loss `{cfg.loss.method}`; {rep['steps']} steps"
             + (f" in {rep['seconds']:.0f} s." if isinstance(rep["seconds"], (int, float)) else "."), "",
             "## Held-out quality", "", f"| model | {rep['units']['teacher_bpb']} |", "|---|---|"]
    for label, v in [("teacher", rep["teacher_bpb"]), ("student before", rep["student_bpb_initial"]),
                     ("student after", rep["student_bpb_final"]),
                     ("student, cross-entropy only", rep["extra"].get("student_bpb_ce_only"))]:
        if v is not None:
            lines.append(f"| {label} | {v:.4f} |")
    lines += ["", f"## Training metrics (mean of the first / last {n} steps)", "",
              "| metric | unit | start | end |", "|---|---|---|---|"]
    for k in terms + ["lr", "tokens_per_s", "grad_norm"]:
        if k in m["start"] or k in m["end"]:
            unit = rep["units"].get(k, "")
            lines.append(f"| {k} | {unit} | {format_number(m['start'].get(k), '.4g')} | {format_number(m['end'].get(k), '.4g')} |")
    titles = {"loss_terms": "Loss terms", "heldout_bpb": "Held-out bits per byte",
              "expert_usage": "Teacher expert usage per layer", "router_shift": "Router shift (SAR)"}
    if rep["plots"]:
        lines += ["", "## Plots"]
        for name, file in rep["plots"].items():
            lines += ["", f"### {titles.get(name, name)}", "", f"![{titles.get(name, name)}]({file})"]
    if rep["notes"]:
        lines += ["", "## Notes", ""] + [f"- {x}" for x in rep["notes"]]
    if rep["extra"]:
        lines += ["", "## Extra", "", "| key | value |", "|---|---|"]
        lines += [f"| {k} | {format_number(v, '.4f')} |" for k, v in rep["extra"].items()]
    lines += ["", "Full configuration and raw numbers: [report.json](report.json).", ""]
    return "\n".join(lines)
