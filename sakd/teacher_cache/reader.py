"""Reading a teacher cache (``TeacherCache``): the loop's sparse teacher side of each batch.

The format, the folder layout and the manifest: ``sakd/teacher_cache/manifest.py``; the build:
``sakd/teacher_cache/builder.py``. ``TeacherCache(dir, expect)`` refuses a cache whose manifest does not match
the run and serves padded, sparse batches (never [rows, V]).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from sakd.errors import UserError
from sakd.models.load import load_tokenizer
from sakd.teacher_cache.codec import decode_packed
from sakd.teacher_cache.sampled import decode_entries
from sakd.teacher_cache.manifest import FORMAT_VERSION, REBUILD, check_manifest, t_hash

# ----------------------------------------------------------------------------- reading

class TeacherCache:
    """A cache folder opened for a run: ``TeacherCache(dir, expected_manifest(cfg, spans, ...))``.

    ``batch(indices, t_len)`` returns the teacher side of a collated batch of those span indices."""

    def __init__(self, directory, expect: dict | None = None):
        self.dir = Path(directory).expanduser()
        where = repr(str(self.dir))
        if not (self.dir / "manifest.json").is_file() and (self.dir / "building.json").is_file():
            raise UserError(f"teacher cache {where} is still being built or its build stopped: finish it with "
                            "sakd cache-teacher --config <config> --out DIR --resume")
        try:
            self.manifest = json.loads((self.dir / "manifest.json").read_text())
            index = json.loads((self.dir / "index.json").read_text())
        except FileNotFoundError:
            raise UserError(f"teacher cache {where} has no manifest.json/index.json: build one with "
                            "sakd cache-teacher --config <config> --out DIR") from None
        except json.JSONDecodeError:
            raise UserError(f"teacher cache {where} has an unreadable manifest.json/index.json: {REBUILD}") from None
        version = self.manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise UserError(f"teacher cache {where} has format {version}, this sakd reads format {FORMAT_VERSION} "
                            f"(packed ids, quantised log-probs, mapped_kl fields): {REBUILD}")
        if expect is not None:
            check_manifest(self.manifest, expect, where)
        self.k, self.codec = int(self.manifest["k"]), self.manifest["codec"]
        self.vocab = int(self.manifest["teacher_vocab"])
        self.samples = int(self.manifest.get("samples", 1))  # KA: sampled routings stored per position
        self._shard_names = index["shards"]
        self._per_shard = int(index["spans_per_shard"])
        self._n = int(index["n_spans"])
        self._handles: dict[int, tuple] = {}
        self._mapping = None

    def __len__(self) -> int:
        return self._n

    def _open(self, s: int):
        h = self._handles.get(s)
        if h is None:
            path = self.dir / self._shard_names[s]
            if not path.is_file():
                raise UserError(f"teacher cache {str(self.dir)!r} lacks {self._shard_names[s]}: {REBUILD}")
            f = safe_open(str(path), framework="pt", device="cpu")
            h = self._handles[s] = (f, f.get_tensor("t_offsets"), f.get_tensor("s_offsets"), f.get_tensor("t_hash"),
                                    f.get_tensor("p_offsets"))
            if self.codec == "sampled":
                h = self._handles[s] = h + (f.get_tensor("e_offsets"), f.get_tensor("b_offsets"))
        return h

    def length(self, i: int) -> int:
        t_off = self._open(i // self._per_shard)[1]
        j = i % self._per_shard
        return int(t_off[j + 1] - t_off[j])

    def span(self, i: int) -> dict:
        """One span's arrays as stored, [n, M, ...] (M = ``samples``; packed rows not decoded; a sampled
        cache's entries decoded to ``draw_ids`` / ``draw_logprobs`` [n, M, N]), and ``t_hash`` (an int)."""
        if not 0 <= i < len(self):
            raise IndexError(f"span {i} is outside the cache's {len(self)} spans")
        f, t_off, s_off, hashes, p_off, *e_b_off = self._open(i // self._per_shard)
        j, M = i % self._per_shard, self.samples
        ta, tb, sa, sb = int(t_off[j]), int(t_off[j + 1]), int(s_off[j]), int(s_off[j + 1])
        pa, pb = int(p_off[j]), int(p_off[j + 1])
        path = torch.full(((sb - sa) * M,), -math.inf)
        path[f.get_slice("path_index")[pa:pb].long()] = f.get_slice("path_value")[pa:pb].float()
        out = {"mapped_path": path.view(sb - sa, M)}
        if e_b_off:  # sampled: the span's entries are a byte slice (sakd/teacher_cache/sampled.py)
            (e_off, b_off), n = e_b_off, (tb - ta) * M
            ids, lp = decode_entries(f.get_slice("entries")[int(b_off[j]):int(b_off[j + 1])],
                                     int(e_off[j + 1] - e_off[j]), n, self.vocab, self.k)
            out["draw_ids"], out["draw_logprobs"] = ids.view(tb - ta, M, -1), lp.view(tb - ta, M, -1)
        for name in f.keys():
            if name in ("t_offsets", "s_offsets", "t_hash", "p_offsets", "path_index", "path_value", "entries",
                        "e_offsets", "b_offsets"):
                continue
            a, b = (sa, sb) if name.startswith("mapped_") else (ta, tb)
            v = f.get_slice(name)[a * M:b * M]  # rows are position-major, sample-minor
            out[name] = v.reshape(b - a, M, *v.shape[1:])
        out["t_hash"] = int(hashes[j])
        return out

    def mapping_tables(self):
        """The mapped_kl tables of the cache's tokenizer pair (loaded once; sakd/align/mapping.py)."""
        if self._mapping is None:
            from sakd.align.mapping import mapping_tables

            m = self.manifest
            self._mapping = mapping_tables(load_tokenizer(m["model.student_tokenizer"], "student"),
                                           load_tokenizer(m["model.teacher_tokenizer"], "teacher"))
        return self._mapping

    def batch(self, indices, t_len: int, *, s_len: int | None = None, device=None, check: dict | None = None) -> dict:
        """Padded teacher-side tensors for the spans ``indices`` (a micro-batch's indices into the
        training SpanDataset, in batch order), padded to ``t_len`` teacher positions (the batch's t_ids
        width) and ``s_len`` student positions (default: the check batch's s_ids width):

            topk_ids [B, t_len, k] long (padding: 0..k-1, distinct), topk_logprobs [B, t_len, k] float32
            rest_logprob, shared_rest_logprob [B, t_len] float32   (padding: -inf, i.e. no mass)
            token_logprob [B, t_len] float32 (0 at j = 0 and padding),  lengths [B] long
            mapped_logz, mapped_path [B, s_len] float32  (mapped_kl; per student token)
            a sampled cache (sakd/teacher_cache/sampled.py): topk_ids / topk_logprobs hold the k = N draws'
            distinct ids and log(count / N) (-inf in unused slots), the rests are -inf, and
            shared_logmass, token_logprob_T [B, t_len] (exact log M and log p_T(t_{j+1}) at row j) are added
            KA caches (``samples`` M > 1): the first four carry a sample axis after B: [B, M, t_len, ...]

        ``check``: the collated batch; the hash of its teacher tokens must equal the cache's for every
        span, else UserError (the cache was built from other text or another tokenisation)."""
        if s_len is None:
            s_len = int(check["s_ids"].shape[1]) if check is not None else None
        B, k, M = len(indices), self.k, self.samples
        spans = [self.span(int(i)) for i in indices]
        n_t = [int(sp["token_logprob"].shape[0]) for sp in spans]
        n_s = [int(sp["mapped_logz"].shape[0]) for sp in spans]
        s_len = max(n_s, default=0) if s_len is None else s_len
        for i, n, ns in zip(indices, n_t, n_s):
            if n > t_len or ns > s_len:
                raise UserError(f"teacher cache {str(self.dir)!r}: span {int(i)} has {n} teacher / {ns} student "
                                f"tokens but the batch holds {t_len} / {s_len}: the cache does not match this "
                                f"data; {REBUILD}")
        ids, lp, rest, srest = self._decode(spans)  # [N, M, k], [N, M, k], [N, M], [N, M]
        b = torch.repeat_interleave(torch.arange(B), torch.tensor(n_t, dtype=torch.long))
        j = torch.cat([torch.arange(n) for n in n_t])
        bs = torch.repeat_interleave(torch.arange(B), torch.tensor(n_s, dtype=torch.long))
        js = torch.cat([torch.arange(n) for n in n_s])
        full = {"topk_ids": (torch.arange(k, dtype=torch.long).expand(B, M, t_len, k).clone(), ids),
                "topk_logprobs": (torch.full((B, M, t_len, k), -math.inf), lp),
                "rest_logprob": (torch.full((B, M, t_len), -math.inf), rest),
                "shared_rest_logprob": (torch.full((B, M, t_len), -math.inf), srest),
                "token_logprob": (torch.zeros(B, M, t_len), self._cat(spans, "token_logprob")),
                "mapped_logz": (torch.zeros(B, M, s_len), self._cat(spans, "mapped_logz")),
                "mapped_path": (torch.full((B, M, s_len), -math.inf), self._cat(spans, "mapped_path"))}
        if self.codec == "sampled":  # exact scalars the sampled losses need (sakd/teacher_cache/sampled.py)
            at_t = "token_logprob_T" if "token_logprob_T" in spans[0] else "token_logprob"  # T = 1: the same
            full["shared_logmass"] = (torch.full((B, M, t_len), -math.inf), self._cat(spans, "shared_logmass"))
            full["token_logprob_T"] = (torch.zeros(B, M, t_len), self._cat(spans, at_t))
        out = {}
        for name, (buf, v) in full.items():
            if name.startswith("mapped_"):
                buf[bs, :, js] = v
            else:
                buf[b, :, j] = v
            out[name] = buf
        out["lengths"] = torch.tensor(n_t, dtype=torch.long)
        if check is not None:
            t_ids, t_mask = check["t_ids"].cpu(), check["t_mask"].cpu()
            got = [t_hash(t_ids[e, :int(t_mask[e].sum())]) for e in range(B)]
            if got != [sp["t_hash"] for sp in spans] or not torch.equal(out["lengths"], t_mask.sum(1)):
                raise UserError(f"teacher cache {str(self.dir)!r}: its teacher tokens differ from this batch's "
                                f"(spans {list(map(int, indices))}): rebuild the cache for this data and tokenizer")
        if device is not None:
            out = {key: v.to(device, non_blocking=True) for key, v in out.items()}
        per_sample = [{key: (v[:, m] if v.dim() > 1 else v) for key, v in out.items()} for m in range(M)]
        view = per_sample[0]
        view["mapping"] = self.mapping_tables  # called by the mapped_kl loss only (loads the tables once)
        if M > 1:  # KA: one view per sampled routing; the losses average over them
            view["samples"] = per_sample
        return view

    @staticmethod
    def _cat(spans, name) -> torch.Tensor:
        return torch.cat([sp[name] for sp in spans]).float()

    def _decode(self, spans: list[dict]):
        """The spans' stored rows, decoded and concatenated: ids/log-probs [N, M, k], rests [N, M]."""
        M, k = self.samples, self.k
        if self.codec == "sampled":  # every position's mass is on its draws: no rest bucket
            lp = self._cat(spans, "draw_logprobs")
            none = torch.full(lp.shape[:2], -math.inf)
            return torch.cat([sp["draw_ids"] for sp in spans]), lp, none, none.clone()
        rest, srest = self._cat(spans, "rest_logprob"), self._cat(spans, "shared_rest_logprob")
        if self.codec == "float32":
            return torch.cat([sp["topk_ids"] for sp in spans]).long(), self._cat(spans, "topk_logprobs"), rest, srest
        rows, top = torch.cat([sp["rows"] for sp in spans]), self._cat(spans, "top_logprob")
        n = rows.shape[0]
        ids, lp = decode_packed(rows.flatten(0, 1), top.flatten(), rest.flatten(), self.vocab, k)
        return ids.view(n, M, k), lp.view(n, M, k), rest, srest
