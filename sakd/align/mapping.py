"""Tables that carry the teacher's next-token distribution onto the student's vocabulary.

Byte-level probability mapping (BPM, arXiv 2607.22334 as reported in ../shared/RESEARCH.md §6;
exact byte-level probabilities: Phan et al., arXiv 2410.09303; byte-prefix ranges over a sorted
vocabulary as in SewoongLab/byte-sampler's ``TokenSlicer``). Teacher token i spans bytes
[a_i, c_i); a student token j starting at b_j inside it (k = b_j - a_i bytes already seen,
π = bytes(t_i)[:k]) is predicted by the teacher through every teacher token v that starts with
π and is longer than k: v continues the text with the bytes bytes(v)[k:], whose first student
token is φ(v, k). Everything that depends only on the two vocabularies is computed here once:

- ``sorted_ids``: the teacher's ordinary tokens (no special/added ones, no padding columns)
  sorted by their bytes, so that "every token starting with P" is one range [lo, hi);
- for every teacher id v and q = 0..len(v): ``lo/hi`` of the range of tokens starting with
  bytes(v)[:q], and ``eq``, how many of them are exactly bytes(v)[:q] (they sort first, so
  the tokens LONGER than q are [lo + eq, hi));
- for every v and k = 0..len(v) - 1: ``phi``, the student id of the first student token of
  bytes(v)[k:]: the student tokenizer's own first token when the suffix is valid UTF-8 and that
  token spells a prefix of it; else the longest student token that is a prefix (BPM's choice;
  byte fallback ``<0xNN>`` covers any byte). -1 where no student token fits (mass dropped).

Flat arrays are indexed by ``offset[v] + q`` (``offset[v+1] - offset[v] = len(v) + 1``; phi at
q = len(v) is -1). For the real Qwen3 (151,669) / SmolLM2 (49,152) pair this is ~1.1M entries,
built in seconds and cached on disk (``cache_dir()``), keyed by a hash of both vocabularies.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from sakd import files
from sakd.align.vocab import byte_index, token_bytes

_VERSION = 2  # 2: non-special added tokens spell their content (issue 19, item 6)


@dataclass
class MappingTables:
    """See the module docstring. Tensors are CPU, moved to the loss's device by ``to``."""

    sorted_ids: torch.Tensor    # [n] long: ordinary teacher ids sorted by bytes
    t_len: torch.Tensor         # [Vt_cols] long: byte length of each teacher id (0: special/none)
    s_len: torch.Tensor         # [Vs_cols] long: byte length of each student id (0: special/none)
    offset: torch.Tensor        # [Vt_cols + 1] long
    lo: torch.Tensor            # [F] long
    hi: torch.Tensor            # [F] long
    eq: torch.Tensor            # [F] long
    phi: torch.Tensor           # [F] long, -1: none
    identity: bool = False      # one tokenizer on both sides: φ(v, 0) = v for every column

    def to(self, device) -> "MappingTables":
        """A copy on ``device``, made once per device and kept (the training step asks every micro-batch)."""
        device = torch.device(device)
        if self.phi.device == device:
            return self
        copies = self.__dict__.setdefault("_copies", {})
        if device not in copies:
            kw = {f: getattr(self, f).to(device) for f in ("sorted_ids", "t_len", "s_len", "offset", "lo", "hi",
                                                           "eq", "phi")}
            copies[device] = MappingTables(**kw, identity=self.identity)
        return copies[device]

    @property
    def phi0(self) -> torch.Tensor:
        """φ(v, 0) for the sorted ordinary teacher ids, [n] (-1: no student token)."""
        return self.phi[self.offset[self.sorted_ids]]

    def column_map(self, vt: int, vs: int) -> torch.Tensor:
        """[vt] long: φ(v, 0) for every teacher column v < vt; special tokens and tokens without a student
        image map to ``vs`` (a column the loss drops). Made once per (vt, vs) on this copy's device."""
        maps = self.__dict__.setdefault("_column_maps", {})
        if (vt, vs) not in maps:
            out = torch.full((vt,), vs, dtype=torch.long, device=self.phi.device)
            keep = self.sorted_ids < vt
            ids, img = self.sorted_ids[keep], self.phi0[keep]
            out[ids] = torch.where(img >= 0, img, torch.full_like(img, vs))
            maps[(vt, vs)] = out
        return maps[(vt, vs)]

    def nbytes(self) -> int:
        return sum(getattr(self, f).numel() * getattr(self, f).element_size()
                   for f in ("sorted_ids", "t_len", "s_len", "offset", "lo", "hi", "eq", "phi"))


def cache_dir() -> Path:
    """Where the mapping tables are cached: ``mapping/`` under ``$SAKD_CACHE_DIR`` (sakd.files.cache_dir)."""
    return files.cache_dir() / "mapping"


def _vocab_digest(tok) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False).encode())
    h.update(repr(sorted(int(i) for i in tok.added_tokens_decoder)).encode())
    h.update(str(len(tok)).encode())
    return h.hexdigest()[:20]


def _first_student_tokens(student_tok, suffixes: list[bytes], s_bytes: list[bytes | None]) -> list[int]:
    """The student tokenizer's first token of each suffix, where it spells a prefix of the suffix; else -1."""
    out = [-1] * len(suffixes)
    texts, where = [], []
    for n, suf in enumerate(suffixes):
        try:
            texts.append(suf.decode("utf-8"))
            where.append(n)
        except UnicodeDecodeError:
            pass
    backend = student_tok.backend_tokenizer
    for a in range(0, len(texts), 20_000):
        for n, enc in zip(where[a:a + 20_000], backend.encode_batch(texts[a:a + 20_000], add_special_tokens=False)):
            if enc.ids:
                sid = enc.ids[0]
                b = s_bytes[sid] if sid < len(s_bytes) else None
                if b and suffixes[n].startswith(b):
                    out[n] = sid
    return out


def build_tables(student_tok, teacher_tok) -> MappingTables:
    """Build the tables (no disk cache; see ``mapping_tables``)."""
    s_bytes, s_fallback = token_bytes(student_tok, added_text=True)
    t_bytes, _ = token_bytes(teacher_tok, added_text=True)
    vt = len(teacher_tok)
    t_bytes = [b if (i < vt and b) else None for i, b in enumerate(t_bytes)]
    s_bytes = [b if (i < len(student_tok) and b) else None for i, b in enumerate(s_bytes)]
    t_len = torch.tensor([len(b) if b else 0 for b in t_bytes], dtype=torch.long)
    s_len = torch.tensor([len(b) if b else 0 for b in s_bytes], dtype=torch.long)
    identity = student_tok.get_vocab() == teacher_tok.get_vocab()

    order = sorted((i for i, b in enumerate(t_bytes) if b), key=lambda i: t_bytes[i])
    keys = [t_bytes[i] for i in order]
    prefix_range: dict[bytes, tuple[int, int, int]] = {}

    def rng(p: bytes) -> tuple[int, int, int]:
        r = prefix_range.get(p)
        if r is None:
            lo = bisect.bisect_left(keys, p)
            eq = bisect.bisect_right(keys, p, lo) - lo
            hi = bisect.bisect_left(keys, _successor(p), lo) if p else len(keys)
            r = prefix_range[p] = (lo, hi, eq)
        return r

    s_index = byte_index(s_bytes, s_fallback)
    s_max = max((len(b) for b in s_index), default=0)
    suffix_ids: dict[bytes, int] = {}
    for b in t_bytes:
        if b:
            for k in range(len(b)):
                suffix_ids.setdefault(b[k:], len(suffix_ids))
    suffixes = list(suffix_ids)
    first = _first_student_tokens(student_tok, suffixes, s_bytes)
    phi_of = []
    for suf, f in zip(suffixes, first):
        if f < 0:
            for n in range(min(len(suf), s_max), 0, -1):
                f = s_index.get(suf[:n], -1)
                if f >= 0:
                    break
        phi_of.append(f)

    offset = [0]
    lo, hi, eq, phi = [], [], [], []
    for v, b in enumerate(t_bytes):
        b = b or b""
        for q in range(len(b) + 1):
            r = rng(b[:q])
            lo.append(r[0])
            hi.append(r[1])
            eq.append(r[2])
            if q < len(b):
                phi.append(v if identity else phi_of[suffix_ids[b[q:]]])
            else:
                phi.append(-1)
        offset.append(len(lo))

    def t(x):
        return torch.tensor(x, dtype=torch.long)
    return MappingTables(t(order), t_len, s_len, t(offset), t(lo), t(hi), t(eq), t(phi), identity=identity)


def _successor(p: bytes) -> bytes:
    """The smallest byte string greater than every string starting with ``p`` (p non-empty)."""
    p = p.rstrip(b"\xff")
    return p[:-1] + bytes([p[-1] + 1]) if p else b"\xff" * 1024


def mapping_tables(student_tok, teacher_tok, *, log=None) -> MappingTables:
    """The tables for this tokenizer pair, from the on-disk cache when built before."""
    key = f"{_vocab_digest(student_tok)}-{_vocab_digest(teacher_tok)}-v{_VERSION}"
    path = cache_dir() / f"{key}.pt"
    if path.is_file():
        try:
            return MappingTables(**torch.load(path, weights_only=True))
        except Exception:  # a corrupt cache file is rebuilt, never trusted
            pass
    tables = build_tables(student_tok, teacher_tok)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    state = {f: getattr(tables, f) for f in ("sorted_ids", "t_len", "s_len", "offset", "lo", "hi", "eq", "phi")}
    torch.save({**state, "identity": tables.identity}, tmp)
    os.replace(tmp, path)
    if log:
        log(f"mapping tables: {tables.phi.numel():,} (teacher token, offset) entries, "
            f"{tables.nbytes() / 2**20:.1f} MiB, cached in {path}")
    return tables


def teacher_coverage(tables: MappingTables) -> float:
    """Share of the teacher's ordinary tokens whose mass reaches a student token at k = 0."""
    phi0 = tables.phi0
    return float((phi0 >= 0).float().mean()) if phi0.numel() else 0.0
