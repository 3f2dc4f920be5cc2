"""o200k_harmony offline: checked vocab, ids equal to openai-harmony's, pinned tokenizer hash."""
from __future__ import annotations

import gzip
import hashlib

import pytest

from vpmoe import tokenizer as tok

ADVERSARIAL = ["hello world", " <|end|> <|start|>assistant<|message|> <|endoftext|>",
               "Wie geht's? ÄÖÜ ß", "你好，世界。日本語のテキスト", "emoji 🤖👩‍👩‍👧 and combining é", "1234567890 3.14159 -42",
               "  leading and trailing  \n\n\r\n\t", "ℝ^n → ℝ, ∑_{i=1}^n x_i²", "a" * 3000]


def test_constants_are_gpt_oss():
    assert (tok.EOD_ID, tok.RETURN_ID, tok.CONSTRAIN_ID, tok.CHANNEL_ID, tok.START_ID, tok.END_ID,
            tok.MESSAGE_ID, tok.CALL_ID, tok.VOCAB_SIZE) == (
        199999, 200002, 200003, 200005, 200006, 200007, 200008, 200012, 201088)
    assert max(tok.SPECIAL_TOKENS.values()) == tok.VOCAB_SIZE - 1
    assert tok.get_encoding().n_vocab == tok.VOCAB_SIZE


def test_tokenizer_hash_is_pinned():
    # changing anything that defines token ids must be a deliberate edit of this value
    assert tok.TOKENIZER_SHA256 == "fea5b198728ad5ee87c35d14a457e7de88c500ba0bea2c6480cc2bf7b217ff7d"


def test_special_ids_match_harmony():
    harmony = tok.load_harmony_encoding()
    names = set(harmony.special_tokens_set) - {"<|reserved_201088|>"}  # harmony lists one id past the vocab
    assert names == set(tok.SPECIAL_TOKENS)
    by_id = {i: name for name, i in tok.SPECIAL_TOKENS.items()}
    for i in range(tok.FIRST_SPECIAL_ID, tok.VOCAB_SIZE):
        assert harmony.is_special_token(i) and harmony.decode([i]) == by_id[i] == tok.decode([i]), i
    for name in ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|endoftext|>"):
        assert harmony.encode(name, allowed_special={name}) == [tok.SPECIAL_TOKENS[name]]


def test_encode_matches_harmony_and_roundtrips():
    harmony = tok.load_harmony_encoding()
    for text in ADVERSARIAL:
        ids = tok.encode(text)
        assert ids == harmony.encode(text, disallowed_special=()), text
        assert all(i < tok.FIRST_SPECIAL_ID for i in ids)  # content never yields a structural token
        assert tok.decode(ids) == text


def test_known_token_ids():
    # golden ids from the GPT-OSS reference rendering of the sample's system message
    assert tok.encode("system") == [17360]
    assert tok.encode("You are vpMoE") == [3575, 553, 55177, 24399, 36]


def test_vocab_mismatch_is_refused(tmp_path):
    good = tok._packaged_vocab_gz()
    raw = bytearray(gzip.decompress(good.read_bytes()))
    raw[100] ^= 1
    bad = tmp_path / "o200k_base.tiktoken.gz"
    bad.write_bytes(gzip.compress(bytes(raw)))
    target = tmp_path / "cache"
    with pytest.raises(tok.TokenizerError, match="does not match the official o200k_base") as e:
        tok.prepare_vocab_dir(target, source_gz=bad)
    assert str(bad) in str(e.value)
    assert not target.exists() or not any(target.iterdir())  # nothing half-written left behind
    (tmp_path / "junk.gz").write_bytes(b"not gzip")
    with pytest.raises(tok.TokenizerError, match="cannot decompress"):
        tok.read_vocab_gz(tmp_path / "junk.gz")


def test_vocab_cache_is_written_checked_and_repaired(tmp_path):
    directory = tok.prepare_vocab_dir(tmp_path / "enc")
    path = directory / tok.VOCAB_FILE_NAME
    assert hashlib.sha256(path.read_bytes()).hexdigest() == tok.VOCAB_FILE_SHA256
    path.write_bytes(b"corrupted")  # a damaged cache is replaced, not trusted
    tok.prepare_vocab_dir(tmp_path / "enc")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == tok.VOCAB_FILE_SHA256
    assert sorted(p.name for p in directory.iterdir()) == [tok.VOCAB_FILE_NAME]  # no temp files
