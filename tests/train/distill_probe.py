"""`python -m tests.train.distill_probe distill ...`: runs `sakd.cli` unchanged and records, in each process,
what the multi-process tests compare across processes (tests/test_two_process.py):

  ka_states  a digest of KA's expert-draw generator state at every ``moe.ka_select`` call (equal digests:
             the same coins and the same sampled experts for the same router logits)
  counts     every step's global target counts (the normalisers ``Objective.begin_step`` all-reduces)

written to ``$SAKD_PROBE_DIR/rank{RANK}.json`` (RANK as torchrun sets it; 0 for a single process).
With ``SAKD_PROBE_REVERSE_ROWS=1`` every micro-batch holds its spans in reverse order: the same step in another
floating-point summation order (the size of pure rounding noise, to compare a difference with).
Not a test file: pytest does not collect it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from sakd.models import moe
from sakd.train import objective

RECORD: dict[str, list] = {"ka_states": [], "counts": []}


def _ka_select(real):
    def recording(logits, k, sample_prob, *, generator=None, **kw):
        if generator is not None:
            RECORD["ka_states"].append(hashlib.sha256(generator.get_state().numpy().tobytes()).hexdigest()[:16])
        return real(logits, k, sample_prob, generator=generator, **kw)
    return recording


def _begin_step(real):
    def recording(self, *args, **kw):
        out = real(self, *args, **kw)
        RECORD["counts"].append(dict(self.counts))
        return out
    return recording


def _reversed_rows(real):
    def encode(self, idx):
        return real(self, [list(reversed(ids)) for ids in idx])
    return encode


def main(argv: list[str]) -> int:
    if os.environ.get("SAKD_PROBE_REVERSE_ROWS") == "1":
        from sakd.train.distill import StepData
        StepData._encode = _reversed_rows(StepData._encode)
    moe.ka_select = _ka_select(moe.ka_select)  # _make_forward looks it up in the module at each call
    objective.Objective.begin_step = _begin_step(objective.Objective.begin_step)
    from sakd.cli import main as cli_main
    try:
        return cli_main(argv)
    finally:
        out = Path(os.environ["SAKD_PROBE_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(RECORD))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
