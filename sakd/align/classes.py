"""The classes a mapped teacher target can speak about (``loss.logit=projected_kl``).

The mapped target (sakd/align/mapping.py) puts the teacher's mass only on student tokens in φ's image
I = {φ(v, k)}: the first student token of a teacher-token suffix, tokenised on its own. A student whose
tokenizer merges across the teacher's pre-tokenizer boundaries (``"\\nThe"``, ``",\\nAnd"``, ``" me."``)
has tokens outside I that no teacher row can ever name: on the demo pair 387 of 2,045 tokens, 11.8 % of
the text's student tokens (issue 19, review item 1).

X-Token's P-KL (arXiv 2605.21699) compares two distributions on the coarser of the two partitions
instead of pushing the finer side's extra outcomes to zero. Here: every student token u belongs to the
class of the LONGEST prefix of its bytes that is spelt by a token of I,

    cls(u) = argmax_{c ∈ I, bytes(c) prefix of bytes(u)} len(bytes(c)),

so ``"\\nThe"`` is in the class of ``"\\n"``: the event "the next bytes start with \\n" is what the teacher's
``"\\n"`` token predicts, whatever the student then merges it with. Classes are labelled by a
representative student id (the id ``byte_index`` keeps for those bytes among I's tokens: an ordinary token over
a byte-fallback one, then the lowest id), so ``cls(c) = c`` for a representative and ``cls`` is one
[Vs] table, the same at every position. ``cls(u) = -1``: no prefix of u is in I (or u names no bytes,
a special token): the target can never give u mass, whatever the teacher predicts.

``cell[f] = cls(φ[f])`` (-1 where φ is -1) is the flat (teacher token, offset) table of the class each
candidate's mass lands in, indexed like ``MappingTables.phi``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sakd.align.mapping import MappingTables
from sakd.align.vocab import byte_index, token_bytes


@dataclass
class ClassTables:
    """See the module docstring; CPU tensors, moved by ``to``."""

    cls: torch.Tensor     # [Vs_cols] long: class representative of each student id, -1: none
    cell: torch.Tensor    # [F] long: cls(φ[f]), -1 where φ[f] is -1
    identity: bool = False

    def to(self, device) -> "ClassTables":
        device = torch.device(device)
        if self.cls.device == device:
            return self
        copies = self.__dict__.setdefault("_copies", {})
        if device not in copies:
            copies[device] = ClassTables(self.cls.to(device), self.cell.to(device), self.identity)
        return copies[device]

    def column_map(self, tables: MappingTables, vt: int, vs: int) -> torch.Tensor:
        """[vt] long: the class of φ(v, 0) for every teacher column v < vt; specials and tokens without a
        student image map to ``vs`` (a column the loss drops). Made once per (vt, vs) and device."""
        maps = self.__dict__.setdefault("_column_maps", {})
        if (vt, vs) not in maps:
            out = torch.full((vt,), vs, dtype=torch.long, device=self.cell.device)
            keep = tables.sorted_ids < vt
            ids = tables.sorted_ids[keep]
            img = self.cell[tables.offset[ids]]
            out[ids] = torch.where(img >= 0, img, torch.full_like(img, vs))
            maps[(vt, vs)] = out
        return maps[(vt, vs)]

    def student_map(self, vs: int) -> torch.Tensor:
        """[vs] long: the class column of every student head column (-1 and columns past the tokenizer: ``vs``,
        the bucket of the tokens the target never gives mass to)."""
        maps = self.__dict__.setdefault("_student_maps", {})
        if vs not in maps:
            out = torch.full((vs,), vs, dtype=torch.long, device=self.cls.device)
            n = min(vs, self.cls.numel())
            c = self.cls[:n]
            out[:n] = torch.where(c >= 0, c, torch.full_like(c, vs))
            maps[vs] = out
        return maps[vs]

    def moved_columns(self, vs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cols [m], dest [m], where [vs]): the student head columns that are not their own class's label
        (tokens outside φ's image, tokens without a class, columns past the tokenizer), their bucket column
        (``student_map``), and each column's index in ``cols`` (-1: its own label). A student's bucket sums
        then touch only these m columns (387 of 2,048 on the demo pair), not all of them."""
        maps = self.__dict__.setdefault("_moved", {})
        if vs not in maps:
            smap = self.student_map(vs)
            cols = (smap != torch.arange(vs, device=smap.device)).nonzero().squeeze(1)
            where = torch.full((vs,), -1, dtype=torch.long, device=smap.device)
            where[cols] = torch.arange(cols.numel(), device=smap.device)
            maps[vs] = (cols, smap[cols], where)
        return maps[vs]

    def nbytes(self) -> int:
        return self.cls.numel() * 8 + self.cell.numel() * 8


def build_classes(student_tok, tables: MappingTables) -> ClassTables:
    """Class tables of a tokenizer pair from its mapping tables (a few seconds for 49k x 1.1M entries)."""
    s_bytes, s_fallback = token_bytes(student_tok, added_text=True)
    vs = max(int(tables.s_len.numel()), len(s_bytes))
    s_bytes = [b if (i < len(student_tok) and b) else None for i, b in enumerate(s_bytes)]
    s_bytes += [None] * (vs - len(s_bytes))
    if tables.identity:
        ids = torch.arange(vs, dtype=torch.long)
        return ClassTables(ids, tables.phi.clone(), identity=True)
    image = set(int(u) for u in torch.unique(tables.phi[tables.phi >= 0]).tolist())
    rep = byte_index([b if i in image else None for i, b in enumerate(s_bytes)],
                 s_fallback + [False] * (vs - len(s_fallback)))   # bytes -> representative id in I
    longest = max((len(b) for b in rep), default=0)
    cls = [-1] * vs
    for u, b in enumerate(s_bytes):
        if b:
            for n in range(min(len(b), longest), 0, -1):
                c = rep.get(b[:n])
                if c is not None:
                    cls[u] = c
                    break
    cls_t = torch.tensor(cls, dtype=torch.long)
    phi = tables.phi
    cell = torch.where(phi >= 0, cls_t[phi.clamp(min=0)], torch.full_like(phi, -1))
    return ClassTables(cls_t, cell, identity=False)


def class_tables(student_tok, tables: MappingTables) -> ClassTables:
    """``build_classes``, kept on the mapping tables object (built once per process and pair)."""
    store = tables.__dict__.setdefault("_classes", {})
    key = id(student_tok)
    if key not in store:
        store[key] = build_classes(student_tok, tables)
    return store[key]
