"""Building a teacher cache (``sakd cache-teacher``): shard by shard, resumable, data-parallel.

The spans are cut into shards of ``spans_per_shard`` consecutive spans, and every shard is computed
from its own spans alone, in fixed batches (so its bytes do not depend on which process built it, or
when). A shard is written to a temporary name, fsynced and renamed: it exists whole or not at all.
``building.json`` records what is being built; ``--resume`` checks it against the run and builds
only the missing shards, so a build killed at any moment (SIGKILL, a session limit, ``train.max_time``)
continues where it stopped and ends byte-identical to an uninterrupted one. Under
``accelerate launch --num_processes N``, process r builds shards r, r + N, ...; the main process
writes index.json and, last, manifest.json. What each position stores: ``sakd/teacher_cache/reader.py``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sakd import __version__
from sakd.models import moe
from sakd.align.mapping import mapping_tables
from sakd.align.vocab import build_vocab_map
from sakd.teacher_cache.manifest import DATA_INFO, FORMAT_VERSION, expected_manifest, heldout_sha256, t_hash
from sakd.teacher_cache.codec import CODECS, encode_packed, row_bytes
from sakd.teacher_cache import sampled
from sakd.data.chat import model_inputs
from sakd.files import fsync_path, write_atomic, write_json
from sakd.config import Config, parse_duration
from sakd.data.text import Collator, SpanData, pad_id, span_data, teacher_seq_len
from sakd.errors import UserError
from sakd.evaluate.bpb import nll_bits
from sakd.losses.mapped import path_log_mass, mapped_positions
from sakd.models.load import experts_per_token, fp32_forward, load_teacher
from sakd.models.placement import big_model_placement

INCOMPLETE = 3  # the CLI's exit code when a build stopped (max_time) before its last shard


def shard_name(s: int) -> str:
    return f"shard-{s:05d}.safetensors"


def bytes_per_token(vocab: int, k: int, codec: str, samples: int = 1, student_per_teacher: float = 1.15) -> float:
    """Estimated bytes per teacher token (the student side at ``student_per_teacher`` tokens each)."""
    if codec == "sampled":  # k = the draws; an upper bound (every draw distinct, token_logprob_T stored)
        return sampled.bytes_per_token(vocab, k, 0.0, samples, student_per_teacher)
    if codec == "packed":  # + the sparse path entries (6 bytes each, ~2 % of student tokens): not counted
        per_t = samples * (row_bytes(vocab, k) + 2 + 2 + 2 + 2)
        per_s = samples * 2
    else:
        per_t = samples * (8 * k + 4 + 4 + 4 + 4)
        per_s = samples * 4
    return per_t + student_per_teacher * per_s


# ----------------------------------------------------------------------------- one batch

def sparse_rows(logits: torch.Tensor, next_ids: torch.Tensor, shared_mask: torch.Tensor, *, k: int,
                temperature: float) -> dict:
    """The cached quantities of n teacher positions from their logits [n, Vt] (the tokenizer's
    columns only): topk ids/log-probs at T, rest and shared-rest log-masses at T, and
    log p(next_ids) at temperature 1 ([n]; the caller decides where it is stored)."""
    x = logits.float()
    z = x / temperature
    lse = torch.logsumexp(z, -1)
    vals, ids = z.topk(k, dim=-1)
    off = z.scatter(-1, ids, -math.inf)  # the logits of every id outside the top-k
    lse1 = lse if temperature == 1.0 else torch.logsumexp(x, -1)
    return {"topk_ids": ids, "topk_logprobs": vals - lse[:, None],
            "rest_logprob": torch.logsumexp(off, -1) - lse,
            "shared_rest_logprob": torch.logsumexp(off.masked_fill(~shared_mask, -math.inf), -1) - lse,
            "next_logprob": x.gather(-1, next_ids[:, None]).squeeze(-1) - lse1}


@torch.no_grad()
def mapped_fields(logits: torch.Tensor, batch, tables, *, vt: int, temperature: float) -> tuple:
    """Per student token with a mapped_kl target: log Z (the candidates' mass at T) and log p_T(t_i) +
    the realised path's log-mass (0 when the student token ends inside t_i) where the realised mass
    moves (-inf elsewhere), as ``mapped_kd`` builds them from the live logits (sakd/losses/mapped.py:
    ``MappedTargets``). Returns ([B, Ls], [B, Ls]) float32."""
    dev = logits.device
    B, Ls = batch["s_ids"].shape
    Lt = logits.shape[1]
    logz = torch.zeros(B, Ls, device=dev)
    path = torch.full((B, Ls), -math.inf, device=dev)
    pos = mapped_positions({k: v.to(dev) for k, v in batch.items()}, tables)
    if len(pos) == 0 or tables.identity:
        return logz, path  # one tokenizer: every candidate, Z = 1, no extension
    tab = tables.to(dev) if tables.phi.device != dev else tables
    t_ids = batch["t_ids"].to(dev)
    t_tok = t_ids[pos.b, pos.i]
    s_tok = batch["s_ids"].to(dev)[pos.b, pos.j]
    f_i = tab.offset[t_tok] + pos.k
    image0 = torch.zeros(vt, dtype=torch.bool, device=dev)
    img = tab.phi[tab.offset[tab.sorted_ids]]
    image0[tab.sorted_ids[img >= 0]] = True
    for a in range(0, len(pos), 256):
        idx = torch.arange(a, min(a + 256, len(pos)), device=dev)
        logp = torch.log_softmax(logits[pos.b[idx], pos.i[idx] - 1, :vt].float() / temperature, -1)
        k = pos.k[idx]
        lz = torch.logsumexp(logp.masked_fill(~image0, -math.inf), -1)
        r1 = (k > 0).nonzero().squeeze(1)
        if r1.numel():
            f = f_i[idx[r1]]
            lo, hi = tab.lo[f] + tab.eq[f], tab.hi[f]  # the tokens longer than k that start with π
            lens = hi - lo
            row = torch.repeat_interleave(r1, lens)
            start = torch.repeat_interleave(lo - (lens.cumsum(0) - lens), lens)
            tid = tab.sorted_ids[start + torch.arange(int(lens.sum()), device=dev)]
            ok = tab.phi[tab.offset[tid] + torch.repeat_interleave(k[r1], lens)] >= 0
            z = torch.zeros(idx.numel(), device=dev).index_add_(0, row, logp[row, tid].exp() * ok)
            lz[r1] = z[r1].log()
        logz[pos.b[idx], pos.j[idx]] = lz
        # Where the realised teacher token's mass moves to the realised student token: past the teacher token
        # (the path's mass), or where φ(t_i, k) is not the realised student token (all of p(t_i) / Z).
        src = tab.phi[f_i[idx]]
        e = ((pos.ext[idx] | (src != s_tok[idx])) & (src >= 0)).nonzero().squeeze(1)
        if e.numel():
            val = logp[e, t_tok[idx[e]]]
            x = pos.ext[idx[e]].nonzero().squeeze(1)
            if x.numel():
                val[x] += path_log_mass(logits.flatten(0, 1), t_ids, pos, idx[e[x]], Lt, vt, tab, temperature,
                                         torch.float32)
            path[pos.b[idx[e]], pos.j[idx[e]]] = val
    return logz, path


def _teacher_logits(teacher, batch, cfg: Config, device, ka: dict | None, generator):
    t_ids, t_mask = batch["t_ids"].to(device), batch["t_mask"].to(device)
    inputs = {k: v.to(device) if v is not None else None for k, v in model_inputs(batch, "t").items()}
    mode = cfg.moe.mode
    routed = moe.is_moe(teacher)
    kw = dict(experts=ka["experts"], sample_prob=ka["sample_prob"], generator=generator,
              temperature=ka["temperature"]) if mode == "ka" else {}
    with torch.no_grad(), (moe.routing(teacher, mode, **kw) if routed else nullcontext()) as r:
        if r is not None:
            r.set_token_mask(t_mask)
        return teacher(input_ids=t_ids, **inputs, use_cache=False).logits


def _batch_arrays(logits, batch, items, shared_mask, tables, *, k, vt, temperature, chunk_rows,
                  uniforms=None) -> list[dict] | None:
    """Per span of the batch, its float arrays (top-k ids/log-probs, rests, token log-probs, mapped
    fields; or, given ``uniforms`` [positions, N], the sampled cache's draws and scalars: sampled.py).
    None if the logits are not finite (fp16 overflow)."""
    t_mask = batch["t_mask"].to(logits.device)
    t_ids = batch["t_ids"].to(logits.device)
    bi, j = t_mask.nonzero(as_tuple=True)
    nxt = t_ids[bi, (j + 1).clamp(max=t_ids.shape[1] - 1)]  # the token each position predicts (last: unused)
    rows: dict[str, list] = {}
    for c in range(0, bi.numel(), chunk_rows):
        sel = slice(c, c + chunk_rows)
        if uniforms is None:
            r = sparse_rows(logits[bi[sel], j[sel], :vt], nxt[sel], shared_mask, k=k, temperature=temperature)
        else:
            r = sampled.sampled_rows(logits[bi[sel], j[sel], :vt], nxt[sel], shared_mask, temperature=temperature,
                                     uniforms=uniforms[sel])
        if not all(torch.isfinite(r[key]).all() for key in ("topk_logprobs", "top_logprob", "next_logprob") if key in r):
            return None
        for key, v in r.items():
            rows.setdefault(key, []).append(v.cpu())
    rows = {key: torch.cat(v) for key, v in rows.items()}
    logz, path = mapped_fields(logits, batch, tables, vt=vt, temperature=temperature)
    logz, path = logz.cpu(), path.cpu()
    out, start = [], 0
    for b, item in enumerate(items):
        n, ns = len(item["t_ids"]), len(item["s_ids"])
        sl = slice(start, start + n)
        span = {key: v[sl] for key, v in rows.items() if not key.startswith(("next_", "top_"))}
        for key, name in (("next_logprob", "token_logprob"), ("next_logprob_T", "token_logprob_T")):
            if key in rows and (key == "next_logprob" or temperature != 1.0):
                span[name] = torch.zeros(n, dtype=torch.float32)
                span[name][1:] = rows[key][start:start + n - 1]  # position j's next token is token j + 1
        out.append({**span, "mapped_logz": logz[b, :ns], "mapped_path": path[b, :ns]})
        start += n
    return out


def _encode(parts: list[dict], codec: str, vt: int, samples: int, draws: int = 0) -> dict:
    """Stack the spans' arrays (sample-major inside each position: row n * M + m) and encode them."""
    def cat(name):
        v = torch.stack([torch.cat([p[m][name] for p in parts]) for m in range(samples)], 1)  # [N, M, ...]
        return v.flatten(0, 1)

    store = torch.float32 if codec == "float32" else torch.float16
    scalars = ("shared_logmass", "token_logprob", "token_logprob_T", "mapped_logz") if codec == "sampled" else (
        "rest_logprob", "shared_rest_logprob", "token_logprob", "mapped_logz")
    out = {name: cat(name).to(store) for name in scalars if name in parts[0][0]}
    # The realised path's mass exists only where the extension applies (~2 % of student tokens on the
    # real pair): stored sparsely, as (index j * M + m inside the span, value) with per-span offsets.
    index, value, offsets = [], [], [0]
    for p in parts:
        v = torch.stack([p[m]["mapped_path"] for m in range(samples)], 1).flatten()
        keep = torch.isfinite(v).nonzero().squeeze(1)
        index.append(keep.to(torch.int32))
        value.append(v[keep].to(store))
        offsets.append(offsets[-1] + keep.numel())
    out["path_index"], out["path_value"] = torch.cat(index), torch.cat(value)
    out["p_offsets"] = torch.tensor(offsets, dtype=torch.int64)
    if codec == "sampled":
        return {**out, **sampled.encode_spans(parts, vt, draws, samples)}
    ids, lp = cat("topk_ids"), cat("topk_logprobs")
    if codec == "packed":
        out["rows"], top = encode_packed(ids, lp, vt)
        out["top_logprob"] = top.to(torch.float16)
    else:
        out["topk_ids"], out["topk_logprobs"] = ids.to(torch.int32), lp.float()
    return out


# ----------------------------------------------------------------------------- the build

def _ka_settings(cfg: Config, teacher) -> dict | None:
    m = cfg.moe
    if m.mode != "ka":
        return None
    ept = experts_per_token(teacher)
    experts = m.experts_start or (max(ept[0], ept[1] - 1) if ept else 1)
    if ((m.sample_prob_end is not None and m.sample_prob_end != m.sample_prob)
            or (m.experts_end is not None and m.experts_end != experts)
            or m.router_temperature_end != m.router_temperature_start):
        raise UserError("moe.mode=ka with a schedule (moe.sample_prob_end / experts_end / router_temperature_end "
                        "differ from their start): a cache holds one fixed routing distribution; drop the "
                        "schedule or train with the live teacher")
    return {"experts": experts, "sample_prob": float(m.sample_prob), "temperature": float(m.router_temperature_start)}


def _dist():
    """(rank, world, barrier, device or None) under accelerate launch / torchrun, else one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, (lambda: None), None
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return state.process_index, state.num_processes, state.wait_for_everyone, state.device


def _prepare_folder(out: Path, building: dict, *, resume: bool, overwrite: bool, write: bool = True) -> dict | None:
    """Check ``out`` (every process, ``write=False``: they all see the same folder and raise alike, so no
    process waits at a barrier for one that stopped) and create it (the main process). Returns the
    finished manifest when there is nothing to do."""
    where = repr(str(out))
    if out.exists() and not out.is_dir():
        raise UserError(f"cache folder {where} is a file: choose another --out")
    if (out / "manifest.json").is_file() and not overwrite:
        if resume:
            return json.loads((out / "manifest.json").read_text())
        raise UserError(f"cache folder {where} already holds a finished cache: choose another --out, delete it, "
                        "or pass --overwrite")
    if (out / "building.json").is_file() and not overwrite:
        if not resume:
            raise UserError(f"cache folder {where} holds an unfinished build: continue it with --resume (same "
                            "config and options), or pass --overwrite to start again")
        have = json.loads((out / "building.json").read_text())
        for key in sorted(set(have) | set(building)):
            if have.get(key) != building.get(key):
                raise UserError(f"cache folder {where} is being built with {key} = {have.get(key)!r}, but this run "
                                f"has {building.get(key)!r}: resume with the same config and options, or pass "
                                "--overwrite to start again")
        for p in out.iterdir() if write else ():  # temporaries of a killed write (ours, and safetensors' own)
            if p.name.startswith(".") and p.is_file():
                p.unlink()
        return None
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"cache folder {where} already exists and is not empty: choose another --out or delete it")
        if not write:
            return None
        shutil.rmtree(out)
    if not write:
        return None
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "building.json", building)
    return None


def _check_disk(out: Path, n_left_spans: int, t_len: int, per_token: float, log) -> None:
    need = per_token * n_left_spans * t_len
    free = shutil.disk_usage(out).free
    log(f"cache: at most {need / 2**20:,.1f} MiB to write ({per_token:.0f} bytes per teacher token x up to "
        f"{n_left_spans * t_len:,} tokens); {free / 2**30:,.1f} GiB free on {out}")
    if need > free:
        raise UserError(f"cache folder {str(out)!r}: the cache needs up to {need / 2**30:.2f} GiB but only "
                        f"{free / 2**30:.2f} GiB are free: free space, choose another --out, or lower --k")


def teacher_heldout_bits(teacher, tokenizer, heldout: list, cfg: Config, device) -> tuple[float, int]:
    """(bits, UTF-8 bytes) of the teacher on the held-out text, under its evaluation routing
    (``moe.evaluation_mode``, as in the live run): the manifest's ``teacher_heldout_bpb``."""
    if not heldout:
        return 0.0, 0
    with moe.routing(teacher, moe.evaluation_mode(cfg.moe.mode)) if moe.is_moe(teacher) else nullcontext():
        bits, n_bytes, _ = nll_bits(teacher, tokenizer, heldout, cfg.eval.seq_len, cfg.eval.batch_size, device)
    return bits, n_bytes


@dataclass
class _Build:
    """What one cache build reads and writes: the data, the vocabularies, the shard layout, the manifest."""
    out: Path
    data: SpanData
    vocab: object
    tables: object
    vt: int
    k: int
    codec: str
    bs: int
    per_shard: int
    chunk_rows: int
    t_len: int
    samples: int
    manifest: dict

    @property
    def n_spans(self) -> int:
        return len(self.data.train)

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_spans / self.per_shard)

    def shard_spans(self, s: int) -> range:
        return range(s * self.per_shard, min((s + 1) * self.per_shard, self.n_spans))


def _plan_build(cfg: Config, out: Path, *, k: int, codec: str, batch_size: int | None, shard_spans: int | None,
                chunk_rows: int, say) -> _Build:
    """Read the data and the tokenizers and lay out the shards (no teacher yet)."""
    data = span_data(cfg, say)
    vocab = build_vocab_map(data.student_tok, data.teacher_tok)
    tables = mapping_tables(data.student_tok, data.teacher_tok, log=say)
    vt = len(data.teacher_tok)
    if codec == "sampled" and not 1 <= k <= vt // 2:
        raise UserError(f"cache --draws={k} must lie in [1, {vt // 2}] (half the teacher tokenizer's vocabulary)")
    if not 1 <= k <= vt:
        raise UserError(f"cache k={k} must lie in [1, {vt}] (the teacher tokenizer's vocabulary)")
    t_len = teacher_seq_len(cfg)
    bs = batch_size or cfg.eval.batch_size
    per_shard = shard_spans or max(bs, (1 << 19) // t_len // bs * bs)  # ~512k tokens a shard by default
    manifest = expected_manifest(cfg, data.train.fingerprints, student_tok=data.student_tok, teacher_tok=data.teacher_tok,
                                 vocab=vocab, k=k, codec=codec)
    samples = cfg.moe.ka_samples if cfg.moe.mode == "ka" else 1
    return _Build(out, data, vocab, tables, vt, k, codec, bs, per_shard, chunk_rows, t_len, samples, manifest)


def _load_checked_teacher(cfg: Config, device, vt: int):
    m = cfg.model
    teacher = load_teacher(m.teacher, device, m.teacher_dtype, experts_implementation=m.experts_implementation,
                           placement=big_model_placement(m.teacher_device_map, m.teacher_max_memory,
                                                         m.teacher_offload_folder))
    if teacher.get_output_embeddings().weight.shape[0] < vt:
        raise UserError(f"teacher {m.teacher!r} has fewer logit columns than its tokenizer has tokens ({vt})")
    return teacher


def _batch_samples(b: _Build, cfg: Config, teacher, ka, batch, items, a: int, shared_mask, device) -> tuple[list, int]:
    """Each KA sample's arrays for one batch (its first span: ``a``), and how many passes ran again in fp32."""
    # Each batch's KA draws come from a generator seeded by its first span: the same draws
    # whichever process builds it, and when.
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed * 1_000_003 + a) if ka else None
    per_sample, refp32 = [], 0
    for m in range(b.samples):
        kw = dict(k=b.k, vt=b.vt, temperature=cfg.loss.temperature, chunk_rows=b.chunk_rows)
        if b.codec == "sampled":  # the draws' uniforms, one row per position, seeded per span (sampled.py)
            kw["uniforms"] = torch.cat([sampled.uniforms(cfg.train.seed, a + e, m, len(it["t_ids"]), b.k)
                                        for e, it in enumerate(items)])
        g_state = gen.get_state() if gen is not None else None
        r = _batch_arrays(_teacher_logits(teacher, batch, cfg, device, ka, gen), batch, items,
                          shared_mask, b.tables, **kw)
        if r is None:  # fp16 overflow: this pass again with the teacher in fp32 (the cast back is exact)
            refp32 += 1
            if gen is not None:
                gen.set_state(g_state)
            with fp32_forward(teacher):  # weights cast back even when the pass raises
                r = _batch_arrays(_teacher_logits(teacher, batch, cfg, device, ka, gen), batch, items,
                                  shared_mask, b.tables, **kw)
            if r is None:
                raise UserError(f"teacher {cfg.model.teacher!r} gives non-finite logits on spans {a}.."
                                f"{a + len(items) - 1} even in float32: check the teacher weights")
        per_sample.append(r)
    return per_sample, refp32


def _write_shard(b: _Build, s: int, parts: list, hashes: list) -> None:
    arrays = _encode(parts, b.codec, b.vt, b.samples, b.k)
    arrays["t_offsets"] = torch.tensor([0] + [len(p[0]["token_logprob"]) for p in parts]).cumsum(0)
    arrays["s_offsets"] = torch.tensor([0] + [len(p[0]["mapped_logz"]) for p in parts]).cumsum(0)
    arrays["t_hash"] = torch.tensor(hashes, dtype=torch.int64)
    write_atomic(b.out / shard_name(s), lambda p: save_file(arrays, str(p), metadata={"format": "sakd-cache-2"}))


def _run_shards(b: _Build, cfg: Config, teacher, ka, mine: list[int], device, *, t0: float, progress: bool,
                main: bool, say) -> tuple[bool, int]:
    """Build this process's shards ``mine`` in order; (stopped by train.max_time, batches recomputed in fp32)."""
    shared_mask = torch.zeros(b.vt, dtype=torch.bool, device=device)
    shared_mask[b.vocab.shared_t[b.vocab.shared_t < b.vt].to(device)] = True
    collate = Collator(pad_id(b.data.student_tok), pad_id(b.data.teacher_tok))
    deadline = t0 + parse_duration(cfg.train.max_time, "train.max_time") if cfg.train.max_time else None
    bar = None
    if progress and main:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(len(b.shard_spans(s)) for s in mine), desc="cache-teacher", unit="span",
                   dynamic_ncols=True)
    refp32, stopped, tokens = 0, False, 0
    for s in mine:
        if deadline is not None and time.time() > deadline:
            stopped = True
            break
        spans = b.shard_spans(s)
        parts, hashes = [], []
        for a in range(spans.start, spans.stop, b.bs):
            items = [b.data.train[i] for i in range(a, min(a + b.bs, spans.stop))]
            per_sample, again = _batch_samples(b, cfg, teacher, ka, collate(items), items, a, shared_mask, device)
            refp32 += again
            for e, item in enumerate(items):
                parts.append([per_sample[mm][e] for mm in range(b.samples)])
                hashes.append(t_hash(item["t_ids"]))
                tokens += len(item["t_ids"])
            if bar is not None:
                bar.update(len(items))
        _write_shard(b, s, parts, hashes)
        if bar is None and main:
            n_done = mine.index(s) + 1
            el = time.time() - t0
            say(f"cache: shard {s + 1}/{b.n_shards} written ({n_done}/{len(mine)} of this process), {tokens:,} "
                f"teacher tokens in {el:,.0f} s ({tokens / max(el, 1e-9):,.0f} tokens/s, ETA "
                f"{el / n_done * (len(mine) - n_done):,.0f} s)")
    if bar is not None:
        bar.close()
    return stopped, refp32


def _finish(b: _Build, cfg: Config, teacher, ka, device, *, t0: float, world: int, refp32: int) -> dict:
    """The main process, once every shard exists: the teacher's held-out bits per byte, index.json,
    build.json and, last, manifest.json."""
    out, n_shards, manifest = b.out, b.n_shards, b.manifest
    bits, n_bytes = teacher_heldout_bits(teacher, b.data.teacher_tok, b.data.heldout, cfg, device)
    n_tokens = 0
    for s in range(n_shards):
        with safe_open(str(out / shard_name(s)), framework="pt") as f:
            n_tokens += int(f.get_tensor("t_offsets")[-1])
    shard_bytes = sum((out / shard_name(s)).stat().st_size for s in range(n_shards))
    manifest.update({
        "format": "sakd-teacher-cache", "sakd_version": __version__, "samples": b.samples, "ka": ka,
        "teacher_dtype": str(next(teacher.parameters()).dtype).replace("torch.", ""),
        "teacher_vocab": b.vt, "shared_vocab": len(b.vocab),
        "data": {key: getattr(cfg.data, key) for key in DATA_INFO},
        "n_tokens": n_tokens, "shards": n_shards, "shard_bytes": shard_bytes,
        "bytes_per_token": shard_bytes / max(n_tokens, 1),
        "teacher_heldout_bpb": bits / n_bytes if n_bytes else None,
        "heldout_sha256": heldout_sha256(b.data.heldout),  # the bpb above is valid for this held-out text only
        "eval": {"max_bytes": cfg.eval.max_bytes, "seq_len": cfg.eval.seq_len},
    })
    if b.codec == "sampled":  # k holds the draws per position: the most ids a position can store
        manifest.update({"draws": b.k, "draw_seed": cfg.train.seed})
    write_json(out / "index.json", {"shards": [shard_name(s) for s in range(n_shards)],
                                     "spans_per_shard": b.per_shard, "n_spans": b.n_spans})
    write_json(out / "build.json", {"seconds_last_session": time.time() - t0, "processes": world,
                                     "refp32_batches_last_session": refp32, "format_version": FORMAT_VERSION})
    write_json(out / "manifest.json", manifest)  # last: from here on the folder is a cache
    (out / "building.json").unlink(missing_ok=True)
    fsync_path(out)
    return manifest


def build_cache(cfg: Config, out_dir, *, k: int = 64, codec: str = "packed", draws: int = sampled.DRAWS,
                batch_size: int | None = None,
                shard_spans: int | None = None, chunk_rows: int = 256, device=None, overwrite: bool = False,
                resume: bool = False, progress: bool = False, log=print) -> dict | None:
    """Run the teacher over every training span of ``cfg`` and write a cache to ``out_dir`` (module
    docstring): plan the shards, build this process's missing ones, and (main process) finish the folder.
    Returns the manifest, or None when ``train.max_time`` stopped the build first. ``codec="sampled"``
    stores ``draws`` draws per position instead of the top ``k`` (sakd/teacher_cache/sampled.py)."""
    t0 = time.time()
    if codec not in CODECS:
        raise UserError(f"cache codec {codec!r} is unknown: use one of {', '.join(CODECS)}")
    k = draws if codec == "sampled" else k
    if cfg.moe.mode == "sar":
        raise UserError("moe.mode=sar trains the teacher's router during distillation; a cache holds a fixed "
                        "teacher: set moe.mode=topk, all or ka")
    rank, world, barrier, dist_device = _dist()
    main = rank == 0
    say = log if main else (lambda *a, **kw: None)
    out = Path(out_dir).expanduser()
    device = torch.device(device or dist_device or ("cuda" if torch.cuda.is_available() else "cpu"))
    b = _plan_build(cfg, out, k=k, codec=codec, batch_size=batch_size, shard_spans=shard_spans,
                    chunk_rows=chunk_rows, say=say)
    building = {"expected": b.manifest, "batch_size": b.bs, "spans_per_shard": b.per_shard, "chunk_rows": chunk_rows,
                **({"draw_seed": cfg.train.seed} if codec == "sampled" else {})}
    done = _prepare_folder(out, building, resume=resume, overwrite=overwrite, write=False)
    barrier()
    if main and done is None:
        _prepare_folder(out, building, resume=resume, overwrite=overwrite)
    barrier()
    if done is not None or (out / "manifest.json").is_file():
        say(f"cache: {out} is already complete")
        return done or json.loads((out / "manifest.json").read_text())
    n_shards = b.n_shards
    todo = [s for s in range(n_shards) if not (out / shard_name(s)).is_file()]
    left = sum(len(b.shard_spans(s)) for s in todo)
    _check_disk(out, left, b.t_len, bytes_per_token(b.vt, k, codec, b.samples), say)  # every process: all stop alike
    teacher = _load_checked_teacher(cfg, device, b.vt)
    ka = _ka_settings(cfg, teacher)
    if main:
        say(f"cache: {n_shards} shard(s) of {b.per_shard} spans, {len(todo)} to build"
            + (f" ({n_shards - len(todo)} already written: resuming)" if len(todo) < n_shards else "")
            + (f" over {world} processes" if world > 1 else ""))
    stopped, refp32 = _run_shards(b, cfg, teacher, ka, todo[rank::world], device, t0=t0, progress=progress,
                                  main=main, say=say)
    barrier()
    missing = [s for s in range(n_shards) if not (out / shard_name(s)).is_file()]
    if stopped or missing:
        say(f"cache: stopped (train.max_time) with {n_shards - len(missing)}/{n_shards} shards written; continue "
            f"with the same command and --resume")
        return None
    if not main:
        barrier()
        return json.loads((out / "manifest.json").read_text())
    manifest = _finish(b, cfg, teacher, ka, device, t0=t0, world=world, refp32=refp32)
    barrier()
    say(f"cache: {manifest['n_tokens']:,} teacher tokens in {n_shards} shard(s), {manifest['bytes_per_token']:.1f} "
        f"bytes/token, {time.time() - t0:.1f} s -> {out}")
    return manifest
