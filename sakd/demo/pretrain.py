"""Pre-train a causal LM from scratch on a text file (``sakd pretrain``).

This is how the demo and benchmark teachers are made: a reproducible command
with a seed, whose result (safetensors + tokenizer) is committed so that the demo
does not have to spend tens of CPU minutes on it. Plain next-token cross-entropy
on random windows of the tokenized training text, AdamW, cosine schedule.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from sakd.align.tokens import start_token_id
from sakd.evaluate.bpb import bits_per_byte


def pretrain(model_config: str | Path, tokenizer_dir: str | Path, train_file: str | Path,
             heldout_file: str | Path, out_dir: str | Path, *, steps: int = 2000, batch_size: int = 16,
             seq_len: int = 256, lr: float = 3e-3, warmup: int = 100, seed: int = 0,
             eval_every: int = 500, save_dtype: str = "float16", threads: int | None = None,
             init_from: str | Path | None = None, stop_after: int | None = None, log=print) -> dict:
    """Train the model described by ``model_config`` (a config.json path or folder) and save it
    with its tokenizer to ``out_dir``. Returns the final metrics (held-out BPB in bits/byte).

    ``init_from``: continue from a saved model (a second stage with its own schedule) instead of a
    random initialisation. ``stop_after``: run only this many steps of the ``steps``-long schedule
    (the demo teacher's first stage ran 500 steps of a 3000-step schedule)."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.from_pretrained(model_config)
    if init_from is not None:
        model = AutoModelForCausalLM.from_pretrained(init_from, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"pretrain: {n_params / 1e6:.2f}M parameters, {steps} steps x {batch_size} x {seq_len} tokens")

    train_text = Path(train_file).read_text(encoding="utf-8")
    held = [Path(heldout_file).read_text(encoding="utf-8")]
    stream = torch.tensor(tokenizer(train_text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    start = start_token_id(tokenizer)
    gen = torch.Generator().manual_seed(seed)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    history = []
    t0 = time.time()
    model.train()
    last = min(steps, stop_after or steps)
    for step in range(last):
        starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=gen)
        body = torch.stack([stream[s:s + seq_len - 1] for s in starts.tolist()])
        ids = torch.cat([torch.full((batch_size, 1), start), body], dim=1)  # [B, L], start token first
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == last - 1:
            log(f"step {step:5d}  loss {loss.item():.4f} nats/token  lr {lr_at(step):.2e}  "
                f"{time.time() - t0:7.0f} s")
        if (step + 1) % eval_every == 0 or step == last - 1:
            bpb = bits_per_byte(model, tokenizer, held, max_len=seq_len)
            history.append({"step": step + 1, "heldout_bpb": bpb, "seconds": time.time() - t0})
            best = min(h["heldout_bpb"] for h in history)
            log(f"step {step + 1:5d}  held-out {bpb:.4f} bits/byte (best {best:.4f})")
            if bpb <= best:  # keep the best held-out checkpoint (small corpus: later epochs can overfit)
                _save(model, tokenizer, out, save_dtype)
    best = min(history, key=lambda h: h["heldout_bpb"])
    metrics = {"heldout_bpb": best["heldout_bpb"], "best_step": best["step"], "steps": last, "schedule_steps": steps,
               "init_from": str(init_from) if init_from else None, "lr": lr, "batch_size": batch_size,
               "seq_len": seq_len, "seconds": time.time() - t0,
               "tokens": last * batch_size * seq_len, "parameters": n_params, "seed": seed,
               "history": history}
    (out / "pretrain.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def _save(model, tokenizer, out: Path, save_dtype: str) -> None:
    tmp = out.with_name(out.name + ".tmp")
    model_to_save = model
    if save_dtype != "float32":
        import copy

        model_to_save = copy.deepcopy(model).to(getattr(torch, save_dtype))
    model_to_save.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
