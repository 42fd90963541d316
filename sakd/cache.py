"""Sparse teacher cache: run the teacher once over the training spans, train without it.

``build_cache(cfg, out_dir)`` (``sakd cache-teacher``) builds the same ``SpanDataset`` as the loop
(``span_data``: deterministic given the config and the tokenizers), runs the teacher over every span
(no gradient, its own routing) and stores per teacher position j of span i (the distribution that
predicts token j + 1, as logits[j] in the loop):

    topk_ids        [k] int32   the k most likely teacher ids (distinct), at the KD temperature T
    topk_logprobs   [k] dtype   log softmax(z / T) at those ids (z: the teacher tokenizer's columns only)
    rest_logprob        float32 log Σ_{v ∉ top-k} p_T(v)           (= log1p(-Σ p_topk), computed as a
                                                                   log-sum-exp over the other ids: no cancellation)
    shared_rest_logprob dtype   log Σ_{v ∈ shared, v ∉ top-k} p_T(v) (shared: the vocabulary map of the two
                                                                   tokenizers; makes the shared-vocabulary
                                                                   renormalisation exact, see losses/cached.py)
    token_logprob       dtype   log P_T(t_j | t_<j) at temperature 1 for j ≥ 1, 0 for j = 0 (the start
                                token): what the chunk-likelihood loss sums per chunk
    t_ids               int32   the teacher tokens themselves (checked against each training batch)

At k = 64 and fp16 that is 64·4 + 64·2 + 4 + 2 + 2 + 4 = 396 bytes per teacher token.

Layout of a cache folder (written to a temporary folder, fsynced, then renamed):
    shard-00000.safetensors ...  the arrays above concatenated over the shard's spans ([N, k] / [N]),
                                 plus ``offsets`` [spans in shard + 1] int64
    index.json                   {"shards": [...], "shard": [...], "offset": [...], "length": [...]}, one
                                 entry per span index (offset in tokens within its shard)
    manifest.json                what the cache was built from (``expected_manifest`` + build facts)

``TeacherCache(dir, expect)`` refuses a cache whose manifest does not match the run and serves
padded, sparse batches (never [rows, V]). KA and SAR routing change the teacher during training
and need the live teacher: ``check_cached_config`` refuses them, and every loss a cache cannot feed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sakd import __version__, moe
from sakd.align.vocab import VocabMap, build_vocab_map
from sakd.checkpoint import fsync_path
from sakd.config import Config
from sakd.data import Collator, SpanData, pad_id, span_data, teacher_seq_len
from sakd.errors import UserError
from sakd.evaluate import nll_bits, start_token_id
from sakd.models import load_teacher, load_tokenizer

FORMAT_VERSION = 1
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ARRAYS = ("topk_ids", "topk_logprobs", "rest_logprob", "shared_rest_logprob", "token_logprob", "t_ids")


# ----------------------------------------------------------------------------- the loop's data, without models



# ----------------------------------------------------------------------------- fingerprints and the manifest

def spans_sha256(spans: list[str]) -> str:
    """sha256 over the spans' UTF-8 bytes, each prefixed by its length (no two lists collide by concatenation)."""
    h = hashlib.sha256()
    for s in spans:
        b = s.encode("utf-8", errors="surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def tokenizer_sha256(tok) -> str:
    """The tokenizer as it encodes: its full tokenizers JSON (vocabulary, merges, normalizer, added
    tokens), its length and the start token the data pipeline puts first."""
    text = f"{tok.backend_tokenizer.to_str()}|{len(tok)}|{start_token_id(tok)}"
    return hashlib.sha256(text.encode()).hexdigest()


def vocab_map_sha256(vocab: VocabMap) -> str:
    h = hashlib.sha256()
    for t in (vocab.shared_s, vocab.shared_t):
        h.update(t.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def _model_folder(name: str) -> Path | None:
    p = Path(name).expanduser()
    if p.is_dir():
        return p
    try:  # a hub id already in the local cache (never downloads)
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, not a repo id, offline: no fingerprint then
        return None


def weights_sha256(name: str) -> str | None:
    """sha256 over the teacher's config.json and weight files (content, ~1-2 GB/s), None when the
    files are not on this machine (training from a cache does not need them)."""
    folder = _model_folder(name)
    if folder is None:
        return None
    files = sorted(f for f in folder.iterdir() if f.name == "config.json" or f.suffix in (".safetensors", ".bin"))
    if not any(f.suffix in (".safetensors", ".bin") for f in files):
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(1 << 23):
                h.update(block)
    return h.hexdigest()


def expected_manifest(cfg: Config, spans: list[str], *, student_tok=None, teacher_tok=None,
                      vocab: VocabMap | None = None, k: int | None = None, dtype: str | None = None,
                      fingerprint_teacher: bool = True) -> dict:
    """What a cache must have been built from to serve this run. Keys are compared in
    ``CHECKED`` order; a key whose value is None here is not checked (k, dtype by default)."""
    m = cfg.model
    student_tok = student_tok or load_tokenizer(m.student_tokenizer or m.student, "student")
    teacher_tok = teacher_tok or load_tokenizer(m.teacher_tokenizer or m.teacher, "teacher")
    vocab = vocab or build_vocab_map(student_tok, teacher_tok)
    return {
        "format_version": FORMAT_VERSION,
        "moe.mode": cfg.moe.mode,
        "loss.temperature": float(cfg.loss.temperature),
        "k": k, "dtype": dtype,
        "model.teacher": m.teacher,
        "teacher_sha256": weights_sha256(m.teacher) if fingerprint_teacher else None,
        "model.teacher_tokenizer": m.teacher_tokenizer or m.teacher,
        "teacher_tokenizer_sha256": tokenizer_sha256(teacher_tok),
        "model.student_tokenizer": m.student_tokenizer or m.student,
        "student_tokenizer_sha256": tokenizer_sha256(student_tok),
        "data.seq_len": cfg.data.seq_len,
        "data.teacher_seq_len": teacher_seq_len(cfg),
        "data.chunk_mode": cfg.data.chunk_mode,
        "vocab_map_sha256": vocab_map_sha256(vocab),
        "n_spans": len(spans),
        "spans_sha256": spans_sha256(spans),
    }


# (key compared, key named in the message); config keys before the hashes they feed, so that a
# changed data.seq_len is reported as such and not as "the spans differ".
CHECKED = [("format_version", "format_version"), ("moe.mode", "moe.mode"), ("loss.temperature", "loss.temperature"),
           ("k", "k"), ("dtype", "dtype"), ("teacher_sha256", "model.teacher"),
           ("teacher_tokenizer_sha256", "model.teacher_tokenizer"),
           ("student_tokenizer_sha256", "model.student_tokenizer"), ("data.seq_len", "data.seq_len"),
           ("data.teacher_seq_len", "data.teacher_seq_len"), ("data.chunk_mode", "data.chunk_mode"),
           ("vocab_map_sha256", "vocabulary map"), ("n_spans", "n_spans (data.*)"),
           ("spans_sha256", "spans_sha256 (the training text: data.*)")]
NAMED_BY = {"teacher_sha256": "model.teacher", "teacher_tokenizer_sha256": "model.teacher_tokenizer",
            "student_tokenizer_sha256": "model.student_tokenizer"}
DATA_INFO = ("source", "fallback", "config_name", "split", "text_column", "streaming", "eval_source",
             "eval_fraction", "max_examples")


def check_manifest(manifest: dict, expect: dict, where: str) -> None:
    """UserError naming the first key whose value differs (see CHECKED)."""
    fix = ("rebuild it for this run (sakd cache-teacher --config <this config> --out DIR) or point "
           "model.teacher_cache at a cache built for it")
    for key, label in CHECKED:
        want = expect.get(key)
        if key == "teacher_sha256" and (want is None or manifest.get(key) is None):
            key, want = "model.teacher", expect.get("model.teacher")  # files absent: compare the name
        if want is None:
            continue
        have = manifest.get(key)
        if have != want:
            if key in NAMED_BY:  # a content hash: show the names it belongs to as well
                name = NAMED_BY[key]
                have = f"{manifest.get(name, '?')} (sha256 {str(have)[:12]})"
                want = f"{expect.get(name, '?')} (sha256 {str(want)[:12]})"
            elif key.endswith("sha256"):
                have, want = f"sha256 {str(have)[:12]}", f"sha256 {str(want)[:12]}"
            raise UserError(f"teacher cache {where}: built for {label} = {have!r}, but this run has {want!r}: {fix}")


def check_cached_config(cfg: Config) -> None:
    """Refuse (UserError) what a top-k teacher cache cannot feed."""
    lc = cfg.loss
    if cfg.moe.mode in ("ka", "sar"):
        raise UserError(f"moe.mode={cfg.moe.mode} changes the teacher's routing during training and needs the "
                        "live teacher: use moe.mode=topk (or all) with model.teacher_cache, or drop the cache")
    if lc.kd_weight > 0 and lc.logit not in ("shared_kl", "none"):
        raise UserError(f"loss.logit={lc.logit} needs the teacher's full logits: use loss.logit=shared_kl with "
                        "model.teacher_cache, or drop the cache")
    if lc.kd_weight > 0 and lc.logit == "shared_kl" and lc.divergence != "forward_kl":
        raise UserError(f"loss.divergence={lc.divergence} needs the teacher's probability of every token; a top-k "
                        "cache supports forward_kl only: set loss.divergence=forward_kl or drop the cache")
    if lc.kd_weight > 0 and lc.gap_weighting:
        raise UserError("loss.gap_weighting needs the teacher's full logits: set it to false with "
                        "model.teacher_cache, or drop the cache")
    for key in ("hidden", "attention", "contrastive"):
        if getattr(lc, key).weight > 0:
            raise UserError(f"loss.{key}.weight > 0 needs the teacher's hidden states, which the cache does not "
                            f"hold: set loss.{key}.weight=0 or drop the cache")
    if lc.on_policy_prob > 0:
        raise UserError("loss.on_policy_prob > 0: the student's own continuations are not in the cache; set it "
                        "to 0 or drop the cache")


# ----------------------------------------------------------------------------- building

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


def _teacher_logits(teacher, t_ids, t_mask, mode: str):
    routed = moe.is_moe(teacher)
    with torch.no_grad(), (moe.routing(teacher, mode) if routed else nullcontext()) as r:
        if r is not None:
            r.set_token_mask(t_mask)
        return teacher(input_ids=t_ids, attention_mask=t_mask.long()).logits


def _span_rows(teacher, batch, cfg: Config, shared_mask, *, k: int, vt: int, chunk_rows: int, device) -> dict:
    """Teacher forward over one collated batch; the cached quantities of all its real positions,
    row-major (each span's positions contiguous), on the CPU. None if the logits are not finite."""
    t_ids, t_mask = batch["t_ids"].to(device), batch["t_mask"].to(device)
    logits = _teacher_logits(teacher, t_ids, t_mask, cfg.moe.mode)
    bi, j = t_mask.nonzero(as_tuple=True)
    nxt = t_ids[bi, (j + 1).clamp(max=t_ids.shape[1] - 1)]  # the token each position predicts (last: unused)
    rows: dict[str, list] = {}
    for c in range(0, bi.numel(), chunk_rows):
        sel = slice(c, c + chunk_rows)
        r = sparse_rows(logits[bi[sel], j[sel], :vt], nxt[sel], shared_mask, k=k, temperature=cfg.loss.temperature)
        if not (torch.isfinite(r["topk_logprobs"]).all() and torch.isfinite(r["next_logprob"]).all()):
            return None
        for key, v in r.items():
            rows.setdefault(key, []).append(v.cpu())
    return {key: torch.cat(v) for key, v in rows.items()}


def _write_shards(tmp: Path, data: SpanData, teacher, cfg: Config, shared_mask, *, k, store, bs, shard_tokens,
                  chunk_rows, device, vt, log, t0):
    collate = Collator(pad_id(data.student_tok), pad_id(data.teacher_tok))
    n_spans = len(data.train)
    index = {"shards": [], "shard": [], "offset": [], "length": []}
    parts: dict[str, list] = {a: [] for a in ARRAYS}
    lengths: list[int] = []
    fill, total_tokens, total_bytes, refp32 = 0, 0, 0, 0

    def flush():
        nonlocal total_bytes, fill
        if not lengths:
            return
        name = f"shard-{len(index['shards']):05d}.safetensors"
        arrays = {a: torch.cat(parts[a]).contiguous() for a in ARRAYS}
        arrays["offsets"] = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)
        save_file(arrays, str(tmp / name), metadata={"format": "sakd-teacher-cache"})
        fsync_path(tmp / name)
        total_bytes += (tmp / name).stat().st_size
        index["shards"].append(name)
        for a in ARRAYS:
            parts[a].clear()
        lengths.clear()
        fill = 0

    for a in range(0, n_spans, bs):
        items = [data.train[i] for i in range(a, min(a + bs, n_spans))]
        batch = collate(items)
        kw = dict(k=k, vt=vt, chunk_rows=chunk_rows, device=device)
        rows = _span_rows(teacher, batch, cfg, shared_mask, **kw)
        if rows is None:  # fp16 overflow: this batch again with the teacher in fp32 (the cast back is exact)
            refp32 += 1
            dt = next(teacher.parameters()).dtype
            rows = _span_rows(teacher.float(), batch, cfg, shared_mask, **kw)
            teacher.to(dt)
            if rows is None:
                raise UserError(f"teacher {cfg.model.teacher!r} gives non-finite logits on spans {a}.."
                                f"{a + len(items) - 1} even in float32: check the teacher weights")
        start = 0
        for item in items:
            n = len(item["t_ids"])
            sl = slice(start, start + n)
            tok = torch.zeros(n, dtype=torch.float32)
            tok[1:] = rows["next_logprob"][start:start + n - 1]  # position j's next token is token j + 1
            parts["topk_ids"].append(rows["topk_ids"][sl].to(torch.int32))
            parts["topk_logprobs"].append(rows["topk_logprobs"][sl].to(store))
            parts["rest_logprob"].append(rows["rest_logprob"][sl].to(torch.float32))
            parts["shared_rest_logprob"].append(rows["shared_rest_logprob"][sl].to(store))
            parts["token_logprob"].append(tok.to(store))
            parts["t_ids"].append(torch.tensor(item["t_ids"], dtype=torch.int32))
            index["shard"].append(len(index["shards"]))
            index["offset"].append(fill)
            index["length"].append(n)
            lengths.append(n)
            fill += n
            start += n
            total_tokens += n
        if fill >= shard_tokens:
            flush()
        if (a // bs) % 50 == 0 or a + bs >= n_spans:
            log(f"cache: {min(a + bs, n_spans):,}/{n_spans:,} spans, {total_tokens:,} teacher tokens, "
                f"{total_tokens / max(time.time() - t0, 1e-9):,.0f} tokens/s")
    flush()
    return index, total_tokens, total_bytes, refp32


@torch.no_grad()
def build_cache(cfg: Config, out_dir, *, k: int = 64, dtype: str = "float16", batch_size: int | None = None,
                shard_tokens: int = 1 << 19, chunk_rows: int = 256, device=None, overwrite: bool = False,
                log=print) -> dict:
    """Run the teacher over every training span of ``cfg`` and write a cache to ``out_dir``.
    Returns the manifest (also written as manifest.json). See the module docstring for the layout."""
    t0 = time.time()
    if dtype not in DTYPES:
        raise UserError(f"cache dtype {dtype!r} is unknown: use one of {', '.join(DTYPES)}")
    if cfg.moe.mode not in ("topk", "all"):
        raise UserError(f"moe.mode={cfg.moe.mode} routes the teacher differently at every step; a cache can only "
                        "hold a fixed routing: set moe.mode=topk (or all)")
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"cache folder {str(out)!r} already exists and is not empty: choose another --out or delete it")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = span_data(cfg, log)
    vocab = build_vocab_map(data.student_tok, data.teacher_tok)
    vt = len(data.teacher_tok)
    if not 1 <= k <= vt:
        raise UserError(f"cache k={k} must lie in [1, {vt}] (the teacher tokenizer's vocabulary)")
    m = cfg.model
    teacher = load_teacher(m.teacher, device, m.teacher_dtype, experts_implementation=m.experts_implementation)
    if teacher.get_output_embeddings().weight.shape[0] < vt:
        raise UserError(f"teacher {m.teacher!r} has fewer logit columns than its tokenizer has tokens ({vt})")
    manifest = expected_manifest(cfg, data.train.spans, student_tok=data.student_tok, teacher_tok=data.teacher_tok,
                                 vocab=vocab, k=k, dtype=dtype)
    shared_mask = torch.zeros(vt, dtype=torch.bool, device=device)
    shared_mask[vocab.shared_t[vocab.shared_t < vt].to(device)] = True

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        index, total_tokens, total_bytes, refp32 = _write_shards(
            tmp, data, teacher, cfg, shared_mask, k=k, store=DTYPES[dtype], bs=batch_size or cfg.eval.batch_size,
            shard_tokens=shard_tokens, chunk_rows=chunk_rows, device=device, vt=vt, log=log, t0=t0)

        with moe.routing(teacher, cfg.moe.mode) if moe.is_moe(teacher) else nullcontext():
            bits, n_bytes, _ = nll_bits(teacher, data.teacher_tok, data.heldout, cfg.eval.seq_len,
                                        cfg.eval.batch_size, device) if data.heldout else (0.0, 0, 0)
        manifest.update({
            "format": "sakd-teacher-cache", "sakd_version": __version__,
            "teacher_dtype": str(next(teacher.parameters()).dtype).replace("torch.", ""),
            "teacher_vocab": vt, "shared_vocab": len(vocab),
            "data": {key: getattr(cfg.data, key) for key in DATA_INFO},
            "n_tokens": total_tokens, "shards": len(index["shards"]), "shard_bytes": total_bytes,
            "bytes_per_token": total_bytes / max(total_tokens, 1), "refp32_batches": refp32,
            "teacher_heldout_bpb": bits / n_bytes if n_bytes else None,
            "heldout_sha256": spans_sha256(data.heldout),  # the bpb above is valid for this held-out text only
            "eval": {"max_bytes": cfg.eval.max_bytes, "seq_len": cfg.eval.seq_len},
            "build_seconds": time.time() - t0,
        })
        for name, obj in (("index.json", index), ("manifest.json", manifest)):
            (tmp / name).write_text(json.dumps(obj, indent=None if name == "index.json" else 1))
            fsync_path(tmp / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written cache behind
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    log(f"cache: {total_tokens:,} teacher tokens in {len(index['shards'])} shard(s), "
        f"{manifest['bytes_per_token']:.1f} bytes/token, {manifest['build_seconds']:.1f} s -> {out}")
    return manifest


# ----------------------------------------------------------------------------- reading

class TeacherCache:
    """A cache folder opened for a run: ``TeacherCache(dir, expected_manifest(cfg, spans, ...))``.

    ``batch(indices, t_len)`` returns the teacher side of a collated batch of those span indices."""

    def __init__(self, directory, expect: dict | None = None):
        self.dir = Path(directory).expanduser()
        where = repr(str(self.dir))
        try:
            self.manifest = json.loads((self.dir / "manifest.json").read_text())
            index = json.loads((self.dir / "index.json").read_text())
        except FileNotFoundError:
            raise UserError(f"teacher cache {where} has no manifest.json/index.json: build one with "
                            "sakd cache-teacher --config <config> --out DIR") from None
        except json.JSONDecodeError:
            raise UserError(f"teacher cache {where} has an unreadable manifest.json/index.json: rebuild it") from None
        if expect is not None:
            check_manifest(self.manifest, expect, where)
        self.k = int(self.manifest["k"])
        self._shard_names = index["shards"]
        self._shard = torch.tensor(index["shard"], dtype=torch.long)
        self._offset = torch.tensor(index["offset"], dtype=torch.long)
        self._length = torch.tensor(index["length"], dtype=torch.long)
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return int(self._length.numel())

    def length(self, i: int) -> int:
        return int(self._length[i])

    def _open(self, s: int):
        h = self._handles.get(s)
        if h is None:
            path = self.dir / self._shard_names[s]
            if not path.is_file():
                raise UserError(f"teacher cache {str(self.dir)!r} lacks {self._shard_names[s]}: rebuild it")
            h = self._handles[s] = safe_open(str(path), framework="pt", device="cpu")
        return h

    def span(self, i: int) -> dict:
        """One span's arrays ([n, k] / [n]) as stored."""
        if not 0 <= i < len(self):
            raise IndexError(f"span {i} is outside the cache's {len(self)} spans")
        h = self._open(int(self._shard[i]))
        a, n = int(self._offset[i]), int(self._length[i])
        return {name: h.get_slice(name)[a:a + n] for name in ARRAYS}

    def batch(self, indices, t_len: int, *, device=None, check: dict | None = None) -> dict:
        """Padded teacher-side tensors for the spans ``indices`` (a micro-batch's indices into the
        training SpanDataset, in batch order), padded to ``t_len`` positions (the batch's t_ids width):

            topk_ids [B, t_len, k] long   (padding: 0..k-1, distinct),  topk_logprobs [B, t_len, k] float32
            rest_logprob, shared_rest_logprob [B, t_len] float32   (padding: -inf, i.e. no mass)
            token_logprob [B, t_len] float32 (0 at j = 0 and padding),  t_ids [B, t_len] long (padding -1)
            lengths [B] long

        ``check``: the collated batch; its t_ids must equal the cache's on every real position,
        else UserError (the cache was built from other text or another tokenisation)."""
        B, k = len(indices), self.k
        out = {"topk_ids": torch.arange(k, dtype=torch.long).expand(B, t_len, k).clone(),
               "topk_logprobs": torch.full((B, t_len, k), -math.inf),
               "rest_logprob": torch.full((B, t_len), -math.inf),
               "shared_rest_logprob": torch.full((B, t_len), -math.inf),
               "token_logprob": torch.zeros(B, t_len), "t_ids": torch.full((B, t_len), -1, dtype=torch.long),
               "lengths": torch.zeros(B, dtype=torch.long)}
        for b, i in enumerate(indices):
            s = self.span(int(i))
            n = s["t_ids"].shape[0]
            if n > t_len:
                raise UserError(f"teacher cache {str(self.dir)!r}: span {int(i)} has {n} teacher tokens but the "
                                f"batch holds {t_len}: the cache does not match this data; rebuild it")
            for name in ARRAYS:
                out[name][b, :n] = s[name].to(out[name].dtype)
            out["lengths"][b] = n
        if device is not None:
            out = {key: v.to(device, non_blocking=True) for key, v in out.items()}
        if check is not None:
            t_ids, t_mask = check["t_ids"], check["t_mask"]
            same = (out["t_ids"].to(t_ids.device) == t_ids) | ~t_mask
            if not bool(same.all()) or not torch.equal(out["lengths"].to(t_mask.device), t_mask.sum(1)):
                raise UserError(f"teacher cache {str(self.dir)!r}: its teacher tokens differ from this batch's "
                                f"(spans {list(map(int, indices))}): rebuild the cache for this data and tokenizer")
        return out
