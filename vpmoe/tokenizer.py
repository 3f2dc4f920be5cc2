"""The o200k_harmony tokenizer (GPT-OSS), offline, plus the official Harmony renderer.

Design choices:
- The BPE vocabulary comes from the `bpe-openai` package data (`o200k_base.tiktoken.gz`), never
  from the network. The decompressed file is checked against the official o200k_base sha256 and
  refused on mismatch, so a corrupt or substituted vocab cannot silently change every token id.
- The checked file is written once into a cache dir (`$VPMOE_CACHE_DIR/tiktoken`, default
  `~/.cache/vpmoe/tiktoken`) under a temporary name and renamed, so concurrent processes never see
  a half-written file. `openai-harmony` reads it from there through `TIKTOKEN_ENCODINGS_BASE`.
- Plain encode/decode use `tiktoken` (the same BPE, pattern and special ids as GPT-OSS's
  o200k_harmony): it is several times faster than Harmony's bundled encoder, and
  tests/test_tokenizer.py checks that both give the same ids.
- `TOKENIZER_SHA256` hashes everything that defines token ids (vocab file hash, split pattern,
  special tokens, padded vocab size). Manifests and checkpoints record it so a mismatch is caught.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import tempfile
from pathlib import Path

from vpmoe.utils import file_sha256

VOCAB_FILE_NAME = "o200k_base.tiktoken"  # the name openai-harmony looks for
VOCAB_FILE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
VOCAB_SIZE = 201088  # padded: 200019 real ids rounded up; ids >= 200013 are reserved tokens

# o200k's pre-tokenisation regex (public, identical for o200k_base and o200k_harmony)
PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

STARTOFTEXT_ID = 199998
EOD_ID = 199999  # <|endoftext|>: one after every conversation
RETURN_ID = 200002
CONSTRAIN_ID = 200003
CHANNEL_ID = 200005
START_ID = 200006
END_ID = 200007
MESSAGE_ID = 200008
CALL_ID = 200012

_NAMED_SPECIALS = {
    "<|startoftext|>": STARTOFTEXT_ID,
    "<|endoftext|>": EOD_ID,
    "<|return|>": RETURN_ID,
    "<|constrain|>": CONSTRAIN_ID,
    "<|channel|>": CHANNEL_ID,
    "<|start|>": START_ID,
    "<|end|>": END_ID,
    "<|message|>": MESSAGE_ID,
    "<|call|>": CALL_ID,
}
# every other id from 199998 up to the padded size is `<|reserved_ID|>`, as in openai-harmony
# (which names 200018 reserved, not o200k_base's <|endofprompt|>; harmony also lists a
# <|reserved_201088|>, outside the padded vocab, which we leave out)
SPECIAL_TOKENS: dict[str, int] = dict(_NAMED_SPECIALS)
for _i in range(STARTOFTEXT_ID, VOCAB_SIZE):
    if _i not in _NAMED_SPECIALS.values():
        SPECIAL_TOKENS[f"<|reserved_{_i}|>"] = _i
del _i
FIRST_SPECIAL_ID = STARTOFTEXT_ID  # every id >= this is special; content never produces one

TOKENIZER_SHA256 = hashlib.sha256(json.dumps({
    "name": "o200k_harmony", "vocab_file_sha256": VOCAB_FILE_SHA256, "pattern": PATTERN,
    "special_tokens": sorted(SPECIAL_TOKENS.items(), key=lambda kv: kv[1]), "vocab_size": VOCAB_SIZE,
}, sort_keys=True).encode()).hexdigest()


class TokenizerError(RuntimeError):
    """The vocabulary file is missing, corrupt, or not the official o200k_base."""


def _packaged_vocab_gz() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("bpe_openai")  # locate the package data without importing it
    if spec is None or spec.origin is None:
        raise TokenizerError("package bpe-openai is not installed; it ships the o200k vocabulary "
                             "(pip install bpe-openai)")
    path = Path(spec.origin).parent / "data" / (VOCAB_FILE_NAME + ".gz")
    if not path.is_file():
        raise TokenizerError(f"{path}: o200k vocabulary missing from the bpe-openai package")
    return path


def read_vocab_gz(path: str | Path) -> bytes:
    """Decompress a `.tiktoken.gz` and check its sha256; raise TokenizerError naming the file."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise TokenizerError(f"{path}: cannot decompress the vocabulary: {e}") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != VOCAB_FILE_SHA256:
        raise TokenizerError(f"{path}: vocabulary sha256 {digest} does not match the official "
                             f"o200k_base {VOCAB_FILE_SHA256}; refusing to use it")
    return raw


def cache_dir() -> Path:
    root = os.environ.get("VPMOE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "vpmoe")
    return Path(root) / "tiktoken"


def _file_sha256(path: Path) -> str | None:
    """The file's sha256, or None where it cannot be read (absent: the vocab gets written)."""
    try:
        return file_sha256(path)
    except OSError:
        return None


def prepare_vocab_dir(directory: str | Path | None = None, source_gz: str | Path | None = None) -> Path:
    """Make `directory/o200k_base.tiktoken` (checked) exist; returns the directory.

    An existing file is re-hashed and replaced if wrong. The write goes to a unique temporary file
    in the same directory and is renamed into place, so readers see the old file or the new one.
    """
    directory = Path(directory) if directory is not None else cache_dir()
    target = directory / VOCAB_FILE_NAME
    if _file_sha256(target) == VOCAB_FILE_SHA256:
        return directory
    raw = read_vocab_gz(source_gz if source_gz is not None else _packaged_vocab_gz())
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=VOCAB_FILE_NAME + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return directory


def parse_tiktoken_file(raw: bytes) -> dict[bytes, int]:
    """`base64-token rank` per line -> {token bytes: rank}."""
    import base64

    ranks = {}
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError:
            raise TokenizerError(f"{VOCAB_FILE_NAME}: line {lineno} is not 'base64 rank'") from None
    return ranks


@functools.lru_cache(maxsize=1)
def get_encoding():
    """The o200k_harmony `tiktoken.Encoding` (cached per process)."""
    import tiktoken

    path = prepare_vocab_dir() / VOCAB_FILE_NAME
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != VOCAB_FILE_SHA256:  # changed under us since prepare
        raise TokenizerError(f"{path}: vocabulary sha256 mismatch; delete it and retry")
    return tiktoken.Encoding("o200k_harmony", pat_str=PATTERN, mergeable_ranks=parse_tiktoken_file(raw),
                             special_tokens=SPECIAL_TOKENS)


def encode(text: str) -> list[int]:
    """Plain text -> ids. Special-token strings in `text` are encoded as ordinary text, as Harmony
    does for message content, so user data can never inject a structural token."""
    return get_encoding().encode_ordinary(text)


def decode(ids) -> str:
    """ids -> text; special ids decode to their names (`<|start|>`), invalid UTF-8 to U+FFFD."""
    return get_encoding().decode([int(i) for i in ids])


def token_name(token_id: int) -> str:
    return get_encoding().decode_single_token_bytes(int(token_id)).decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=1)
def load_harmony_encoding():
    """The official `openai_harmony` HARMONY_GPT_OSS encoding, loaded offline from our cache dir."""
    import openai_harmony

    directory = str(prepare_vocab_dir())
    previous = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = directory  # read once, while loading
    try:
        return openai_harmony.load_harmony_encoding(openai_harmony.HarmonyEncodingName.HARMONY_GPT_OSS)
    except Exception as e:  # HarmonyError from the Rust side: name the dir it looked in
        raise TokenizerError(f"openai-harmony could not load o200k_harmony from {directory}: {e}") from None
    finally:
        if previous is None:
            os.environ.pop("TIKTOKEN_ENCODINGS_BASE", None)
        else:
            os.environ["TIKTOKEN_ENCODINGS_BASE"] = previous
