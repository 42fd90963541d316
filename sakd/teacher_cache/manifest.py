"""The teacher cache's format: what it stores, its folder layout, and the manifest that says what it was built from.

``sakd cache-teacher`` (``sakd/teacher_cache/builder.py``: resumable, data-parallel) runs the teacher over
every training span of the run (``span_data``: the loop's own dataset, deterministic given the config
and the tokenizers; on chat data every packed row, each example seen alone through the row's position ids,
as in training; a cache is keyed by ``dataset.fingerprints``: the spans, or the rows' tokens, chunks, loss
masks and positions) and stores, per teacher position j of a span (the distribution that predicts
token j + 1, logits[j] in the loop), at the KD temperature T:

    top-k ids and log p_T     the k most likely teacher ids, coded by ``sakd/teacher_cache/codec.py``: ``packed``
                              (ids as an Elias-Fano set, 5-bit log-prob levels + the top log-prob in
                              fp16; ~146 bytes for k = 64 of 151,936 ids) or ``float32`` (exact)
    rest_logprob              log Σ_{v ∉ top-k} p_T(v)  (a log-sum-exp over the other ids: no cancellation)
    shared_rest_logprob       log Σ_{v ∈ shared, v ∉ top-k} p_T(v)  (shared: the vocabulary map; makes the
                              shared-vocabulary renormalisation exact, see losses/cached.py)
    token_logprob             log P(t_j | t_<j) at temperature 1 for j >= 1, 0 for j = 0: the chunk likelihood

and per student token j with a ``mapped_kl`` target (sakd/losses/mapped.py; teacher token i holds its
first byte, k bytes into it):

    mapped_logz               log Z_j, the teacher's mass (at T, row i - 1) on the candidates of j: every
                              token with a student image for k = 0, the byte-prefix range for k > 0
    mapped_path               log p_T(t_i) + the realised path's log-mass where the extension applies
                              (~2 % of student tokens: stored sparsely, index + value)

Per span: ``t_hash``, a hash of its teacher tokens (each training batch is checked against it).
Packed, the scalars are fp16: 146 + 2 + 2 + 2 + 2 = 154 bytes per teacher token plus 2 per student
token (+ 6 per extended one), ~156-157 bytes per teacher token on the real Qwen3 / SmolLM2 pair (1.09
SmolLM2 tokens per Qwen3 token on Shakespeare, 1.15 on Hamlet); format 1 (int32 ids, fp16 log-probs,
396 bytes) is refused with a message to rebuild.

Layout of a cache folder:
    shard-00000.safetensors ...  spans [s * spans_per_shard, (s + 1) * spans_per_shard), each shard
                                 written to a temporary name, fsynced and renamed (atomic)
    building.json                while the build runs or after it stopped: what it is building
    index.json                   {"shards": [...], "spans_per_shard": S, "n_spans": n}
    manifest.json                written last: what the cache was built from (``expected_manifest``);
                                 a folder without it is never read as a cache
    build.json                   build facts (seconds, processes, fp32 recomputations): not compared

``TeacherCache(dir, expect)`` refuses a cache whose manifest does not match the run and serves
padded, sparse batches (never [rows, V]). SAR routing changes the teacher during training and needs
the live teacher: ``check_cached_config`` refuses it, and every loss a cache cannot feed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from sakd.align.tokens import start_token_id
from sakd.align.vocab import VocabMap, build_vocab_map
from sakd.config import Config
from sakd.data.text import teacher_seq_len
from sakd.errors import UserError
from sakd.models.load import load_tokenizer, local_model_folder

FORMAT_VERSION = 2
REBUILD = "rebuild it with sakd cache-teacher --config <config> --out DIR"


def t_hash(t_ids) -> int:
    """A 63-bit hash of one span's teacher tokens (the check that a batch is the cached text)."""
    a = torch.as_tensor(t_ids, dtype=torch.int32).contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.sha256(a).digest()[:8], "little") >> 1


# ----------------------------------------------------------------------------- fingerprints and the manifest

def spans_sha256(spans: list[str]) -> str:
    """sha256 over the spans' UTF-8 bytes, each prefixed by its length (no two lists collide by concatenation)."""
    h = hashlib.sha256()
    for s in spans:
        b = s.encode("utf-8", errors="surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def heldout_sha256(texts: list[str]) -> str:
    """``spans_sha256`` of held-out texts; a held-out conversation by its messages (the roles decide
    which bytes are scored, see sakd/evaluate/chat_bpb.py)."""
    return spans_sha256([json.dumps(t.messages, ensure_ascii=False) if hasattr(t, "messages") else t
                         for t in texts])


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


def weights_sha256(name: str) -> str | None:
    """sha256 over the teacher's config.json and weight files (content, ~1-2 GB/s), None when the
    files are not on this machine (training from a cache does not need them)."""
    folder = local_model_folder(name)  # None: no fingerprint then
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
                      vocab: VocabMap | None = None, k: int | None = None, codec: str | None = None,
                      fingerprint_teacher: bool = True) -> dict:
    """What a cache must have been built from to serve this run. Keys are compared in
    ``CHECKED`` order; a key whose value is None here is not checked (k, codec by default)."""
    m = cfg.model
    student_tok = student_tok or load_tokenizer(m.student_tokenizer or m.student, "student")
    teacher_tok = teacher_tok or load_tokenizer(m.teacher_tokenizer or m.teacher, "teacher")
    vocab = vocab or build_vocab_map(student_tok, teacher_tok)
    return {
        "format_version": FORMAT_VERSION,
        "moe.mode": cfg.moe.mode,
        "loss.temperature": float(cfg.loss.temperature),
        "moe.ka_samples": cfg.moe.ka_samples if cfg.moe.mode == "ka" else None,
        "moe.sample_prob": float(cfg.moe.sample_prob) if cfg.moe.mode == "ka" else None,
        "moe.experts_start": cfg.moe.experts_start if cfg.moe.mode == "ka" else None,
        "moe.router_temperature_start": float(cfg.moe.router_temperature_start) if cfg.moe.mode == "ka" else None,
        "k": k, "codec": codec,
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
CHECKED = [("format_version", "format_version"), ("moe.mode", "moe.mode"), ("moe.ka_samples", "moe.ka_samples"),
           ("moe.sample_prob", "moe.sample_prob"), ("moe.experts_start", "moe.experts_start"),
           ("moe.router_temperature_start", "moe.router_temperature_start"), ("loss.temperature", "loss.temperature"),
           ("k", "k"), ("codec", "codec"), ("teacher_sha256", "model.teacher"),
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
    lc, terms = cfg.loss, cfg.loss.active_terms()
    if cfg.moe.mode == "sar":
        raise UserError("moe.mode=sar trains the teacher's router during distillation and needs the live teacher: "
                        "use moe.mode=topk, all or ka with model.teacher_cache, or drop the cache")
    if "kd" in terms and lc.method not in ("shared_kl", "mapped_kl", "projected_kl", "gold"):
        key = "loss.baseline" if lc.baseline else "loss.logit"
        raise UserError(f"{key}={lc.method} needs the teacher's full logits: use loss.logit=shared_kl, mapped_kl "
                        "or projected_kl (or loss.baseline=gold) with model.teacher_cache, or drop the cache")
    if "kd" in terms and lc.method == "gold" and lc.beta == 1:
        raise UserError("loss.baseline=gold with loss.beta=1 is KL(student‖teacher), infinite against a top-k "
                        "cache's teacher (0 outside its top-k): set loss.beta < 1 or drop the cache")
    if "kd" in terms and lc.divergence != "forward_kl":
        raise UserError(f"loss.divergence={lc.divergence} needs the teacher's probability of every token; a top-k "
                        "cache supports forward_kl only: set loss.divergence=forward_kl or drop the cache")
    if "kd" in terms and lc.gap_weighting:
        raise UserError("loss.gap_weighting needs the teacher's full logits: set it to false with "
                        "model.teacher_cache, or drop the cache")
    for key in ("hidden", "attention", "contrastive"):
        if key in terms:
            raise UserError(f"loss.{key}.weight > 0 needs the teacher's hidden states, which the cache does not "
                            f"hold: set loss.{key}.weight=0 or drop the cache")
    if lc.on_policy_prob > 0:
        raise UserError("loss.on_policy_prob > 0: the student's own continuations are not in the cache; set it "
                        "to 0 or drop the cache")
