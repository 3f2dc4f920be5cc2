"""The offline teacher cache: compact encoding, shard writer/reader, manifest, batch lookup.

Design choices:
- Per supervised position (loss_mask = 1, label-aligned, in row order) the cache stores the
  teacher's K' = top_k + tail_samples known ids with their log-probs, the log-prob of the actual
  next token, and the log of the teacher mass outside the K' ids ("rest"). Tail samples are drawn
  without replacement from the teacher's distribution restricted to outside the top-k; they are
  simply more known ids (see vpmoe.kd.losses: "known ids + rest bucket").
- Two codecs. `fixed`: ids in rank order packed to 18 bits (V = 201088 < 2^18), log-prob codes at
  `lp_bits`; random access, trivial to decode. `rice` (default): per position the ids are sorted
  ascending and their gaps Rice-coded (fixed low bits + unary high part, parameter chosen per
  row), log-prob codes follow in id order. Both decode fully vectorised with numpy.
- Log-probs are quantised uniformly in p^(1/4): lp = 4 * ln(c / c_max), c = 1..c_max. Fine where
  the probability mass is, coarse for rare tokens (whose KL weight is tiny); never a zero
  probability (the floor is 4 * ln(1 / c_max): -16.6 at 6 bits, -22.2 at 8 bits). Measured on
  peaky and flat distributions this gives 2-4x less coarse KL than uniform-in-lp or sqrt(-lp)
  grids at the same bits (docs/kd.md). Label log-prob and rest log-mass are float16.
- Files: `manifest.json` (teacher, temperature, codec, k, tokenizer sha, data manifest hash, the
  ordered list of shards with their row counts), and per data shard `<name>.kdc` (row blocks),
  `<name>.kdi.npy` (per row: byte offset, cumulative positions, crc32 of the row's tokens, row
  length) and
  `<name>.json` (written last: the shard is complete iff it exists and sizes match). Every file is
  written under a temporary name and renamed. A shard is the unit of resume and of work split.
- `sample_index` (the row's index in its split) maps to (shard, local row) by the manifest's
  cumulative row counts, i.e. cache shards are one-to-one with the data shards, in order.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from vpmoe.kd import KDError
from vpmoe.config import ConfigError, from_dict
from vpmoe.kd.losses import TEACHER_LOGP_FLOOR, SparseTarget, rest_without

FORMAT = "vpmoe-teacher-cache"
VERSION = 1
ID_BITS = 18
LP_ROOT = 4.0  # log-probs are coded as p^(1/4) on a uniform grid
MANIFEST = "manifest.json"


class CacheError(KDError):
    """A teacher cache is missing, incomplete, corrupt or does not match the training data."""


@dataclass
class CacheSpec:
    top_k: int = 64
    tail_samples: int = 0
    codec: Literal["rice", "fixed"] = "rice"
    lp_bits: int = 5  # 5 bits: 148.5 bytes/token at k=64 (goal <= 150), quantisation KL ~1e-3 nats
    vocab_size: int = 201088

    def validate(self) -> None:
        if not 1 <= self.top_k:
            raise ConfigError(f"top_k: must be >= 1, got {self.top_k}")
        if self.tail_samples < 0:
            raise ConfigError(f"tail_samples: must be >= 0, got {self.tail_samples}")
        if not 2 <= self.lp_bits <= 16:
            raise ConfigError(f"lp_bits: must be in [2, 16], got {self.lp_bits}")
        if not self.top_k + self.tail_samples < self.vocab_size <= 2**ID_BITS:
            raise ConfigError(f"vocab_size: need top_k + tail_samples < vocab_size <= 2^{ID_BITS}")

    @property
    def known(self) -> int:
        return self.top_k + self.tail_samples


# ---------------------------------------------------------------- bit packing and codecs

def pack_bits(values: np.ndarray, width: int) -> bytes:
    """Unsigned ints (< 2^width) -> big-endian bit stream, padded to whole bytes."""
    if width == 0 or values.size == 0:
        return b""
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
    bits = ((values.astype(np.uint64).reshape(-1, 1) >> shifts) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits.reshape(-1)).tobytes()


def unpack_bits(buf, width: int, count: int) -> np.ndarray:
    if width == 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), count=count * width).reshape(count, width)
    weights = (np.int64(1) << np.arange(width - 1, -1, -1, dtype=np.int64))
    return bits.astype(np.int64) @ weights


def packed_size(count: int, width: int) -> int:
    return (count * width + 7) // 8


def rice_parameter(gaps: np.ndarray) -> int:
    """The low-bit width b minimising the Rice code length of these gaps."""
    costs = [gaps.size * (b + 1) + int((gaps >> b).sum()) for b in range(ID_BITS + 1)]
    return int(np.argmin(costs))


def rice_encode(gaps: np.ndarray, b: int) -> tuple[bytes, bytes]:
    """(low b bits of every gap, unary stream of the high parts: `high` zeros then a one)."""
    high = (gaps >> b).astype(np.int64)
    ones = np.cumsum(high + 1) - 1
    bits = np.zeros(int(ones[-1]) + 1 if ones.size else 0, dtype=np.uint8)
    bits[ones] = 1
    return pack_bits(gaps & ((1 << b) - 1), b), np.packbits(bits).tobytes()


def rice_decode(low: bytes, unary: bytes, b: int, count: int) -> np.ndarray:
    ones = np.flatnonzero(np.unpackbits(np.frombuffer(unary, dtype=np.uint8)))[:count]
    if ones.size != count:
        raise ValueError(f"rice stream holds {ones.size} values, expected {count}")
    high = np.diff(ones, prepend=-1) - 1
    return (high << b) | unpack_bits(low, b, count)


def quantize_logprobs(lp: np.ndarray, bits: int) -> np.ndarray:
    """Codes 1..c_max of u = exp(lp / LP_ROOT) = p^(1/4), uniform in u (code 0 is unused)."""
    cmax = (1 << bits) - 1
    u = np.exp(np.asarray(lp, dtype=np.float64) / LP_ROOT)
    return np.clip(np.rint(u * cmax), 1, cmax).astype(np.int64)


def dequantize_logprobs(codes: np.ndarray, bits: int) -> np.ndarray:
    cmax = (1 << bits) - 1
    return (LP_ROOT * np.log(np.maximum(codes, 1) / cmax)).astype(np.float32)


def encode_row(ids: np.ndarray, lps: np.ndarray, label_lp: np.ndarray, rest: np.ndarray,
               spec: CacheSpec) -> bytes:
    """One row's n positions: ids/lps [n, K'], label_lp/rest [n] -> bytes (see module docstring)."""
    n, k = ids.shape
    if k != spec.known:
        raise ValueError(f"row has {k} ids per position, the cache stores {spec.known}")
    ids = ids.astype(np.int64)
    if n and (ids.min() < 0 or ids.max() >= spec.vocab_size):
        raise ValueError(f"token id out of range [0, {spec.vocab_size})")
    tail = (np.clip(label_lp, -1000, 0).astype(np.float16).tobytes()
            + np.clip(rest, TEACHER_LOGP_FLOOR, 0).astype(np.float16).tobytes())
    if spec.codec == "fixed":
        return pack_bits(ids, ID_BITS) + pack_bits(quantize_logprobs(lps, spec.lp_bits), spec.lp_bits) + tail
    order = np.argsort(ids, axis=1, kind="stable")
    ids, lps = np.take_along_axis(ids, order, 1), np.take_along_axis(lps, order, 1)
    gaps = np.diff(ids, axis=1, prepend=0)
    gaps[:, 1:] -= 1  # distinct sorted ids: gaps >= 1
    if n and gaps.min() < 0:
        raise ValueError("ids within a position must be distinct")
    gaps = gaps.reshape(-1)
    b = rice_parameter(gaps) if gaps.size else 0
    low, unary = rice_encode(gaps, b)
    codes = pack_bits(quantize_logprobs(lps, spec.lp_bits), spec.lp_bits)
    return struct.pack("<BI", b, len(unary)) + low + unary + codes + tail


def decode_row(buf, n: int, spec: CacheSpec):
    """Inverse of encode_row: (ids int64 [n, K'], lps float32 [n, K'], label_lp [n], rest [n])."""
    k, buf = spec.known, memoryview(buf)
    if spec.codec == "fixed":
        pos = 0
        ids = unpack_bits(buf[:packed_size(n * k, ID_BITS)], ID_BITS, n * k)
        pos = packed_size(n * k, ID_BITS)
    else:
        b, unary_len = struct.unpack_from("<BI", buf, 0)
        pos = 5 + packed_size(n * k, b)
        gaps = rice_decode(buf[5:pos], buf[pos:pos + unary_len], b, n * k).reshape(n, k)
        pos += unary_len
        gaps[:, 1:] += 1
        ids = np.cumsum(gaps, axis=1)
    codes = unpack_bits(buf[pos:pos + packed_size(n * k, spec.lp_bits)], spec.lp_bits, n * k)
    pos += packed_size(n * k, spec.lp_bits)
    label_lp = np.frombuffer(buf[pos:pos + 2 * n], dtype=np.float16).astype(np.float32)
    rest = np.frombuffer(buf[pos + 2 * n:pos + 4 * n], dtype=np.float16).astype(np.float32)
    if pos + 4 * n != len(buf):
        raise ValueError(f"row block is {len(buf)} bytes, decoded {pos + 4 * n}")
    return ids.reshape(n, k), dequantize_logprobs(codes, spec.lp_bits).reshape(n, k), label_lp, rest


def row_crc(tokens) -> int:
    """Fingerprint of a row's tokens (int32 little-endian), checked when a batch is looked up."""
    return zlib.crc32(np.ascontiguousarray(np.asarray(tokens), dtype="<i4").tobytes())


# ---------------------------------------------------------------- files

def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: dict) -> None:
    _atomic_write(Path(path), (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CacheError(f"{path}: {what} not found") from None
    except json.JSONDecodeError as e:
        raise CacheError(f"{path}: {what} is not valid JSON ({e})") from None


class ShardWriter:
    """Writes one cache shard row by row into temporary files; `finish` renames them into place."""

    def __init__(self, cache_dir: Path, name: str, spec: CacheSpec):
        self.dir, self.name, self.spec = Path(cache_dir), name, spec
        self.tmp = self.dir / f".{name}.kdc.tmp{os.getpid()}"
        self.f = open(self.tmp, "wb")
        self.sha = hashlib.sha256()
        self.index = [(0, 0, 0, 0)]  # per row end: byte offset, cumulative positions, crc32, row tokens

    def add_row(self, tokens, ids, lps, label_lp, rest) -> None:
        block = encode_row(np.asarray(ids), np.asarray(lps), np.asarray(label_lp), np.asarray(rest), self.spec)
        self.f.write(block)
        self.sha.update(block)
        off, pos, _, _ = self.index[-1]
        self.index.append((off + len(block), pos + len(label_lp), row_crc(tokens), len(tokens)))

    def finish(self, extra: dict | None = None) -> dict:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.dir / f"{self.name}.kdc")
        index = np.asarray(self.index, dtype=np.int64)
        idx_tmp = self.dir / f".{self.name}.kdi.tmp{os.getpid()}.npy"
        np.save(idx_tmp, index)
        index_sha = hashlib.sha256(idx_tmp.read_bytes()).hexdigest()
        os.replace(idx_tmp, self.dir / f"{self.name}.kdi.npy")
        meta = {"name": self.name, "rows": len(self.index) - 1, "positions": int(index[-1, 1]),
                "bytes": int(index[-1, 0]), "sha256": self.sha.hexdigest(), "index_sha256": index_sha,
                **(extra or {})}
        write_json(self.dir / f"{self.name}.json", meta)
        return meta

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def shard_complete(cache_dir: Path, name: str) -> bool:
    d = Path(cache_dir)
    if not (d / f"{name}.json").exists():
        return False
    meta = read_json(d / f"{name}.json", "shard record")
    kdc = d / f"{name}.kdc"
    return kdc.exists() and kdc.stat().st_size == meta["bytes"] and (d / f"{name}.kdi.npy").exists()


class CacheShard:
    """Read access to one finished shard (memory-mapped)."""

    def __init__(self, cache_dir: Path, name: str, spec: CacheSpec, expect_rows: int | None = None):
        d = Path(cache_dir)
        self.name, self.spec = name, spec
        kdc, kdi, rec = d / f"{name}.kdc", d / f"{name}.kdi.npy", d / f"{name}.json"
        if not rec.exists():
            raise CacheError(f"{d}: cache shard {name} is missing or unfinished (no {rec.name}); "
                             "re-run `vpmoe teacher score` to complete it")
        self.meta = read_json(rec, "shard record")
        if not kdc.exists() or not kdi.exists():
            raise CacheError(f"{kdc}: cache shard {name} has no data/index file")
        size = kdc.stat().st_size
        if size != self.meta["bytes"]:
            raise CacheError(f"{kdc}: cache shard {name} is truncated or corrupt: {size} bytes, "
                             f"its record says {self.meta['bytes']}")
        try:
            self.index = np.load(kdi)
        except (ValueError, OSError, EOFError) as e:
            raise CacheError(f"{kdi}: cache shard {name} index unreadable ({e})") from None
        rows = self.meta["rows"]
        if self.index.shape != (rows + 1, 4) or int(self.index[-1, 0]) != size:
            raise CacheError(f"{kdi}: cache shard {name} index does not match its data file")
        if expect_rows is not None and rows != expect_rows:
            raise CacheError(f"{kdc}: cache shard {name} has {rows} rows, the data shard has {expect_rows}")
        self.data = np.memmap(kdc, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)

    @property
    def rows(self) -> int:
        return self.meta["rows"]

    def row(self, i: int):
        """(ids, lps, label_lp, rest, n_positions, crc32 of the row's tokens, row length)."""
        (o0, p0, _, _), (o1, p1, crc, n_tokens) = self.index[i], self.index[i + 1]
        try:
            decoded = decode_row(self.data[o0:o1], int(p1 - p0), self.spec)
        except (ValueError, struct.error) as e:
            raise CacheError(f"cache shard {self.name}, row {i}: corrupt block ({e})") from None
        return (*decoded, int(p1 - p0), int(crc), int(n_tokens))


# ---------------------------------------------------------------- the cache as a whole

def new_manifest(spec: CacheSpec, teacher: dict, temperature: float, tokenizer_sha: str,
                 data_hash: str, shards: list[tuple[str, int]]) -> dict:
    return {"format": FORMAT, "version": VERSION, "spec": asdict(spec), "teacher": teacher,
            "temperature": temperature, "tokenizer_sha256": tokenizer_sha, "data_manifest_hash": data_hash,
            "shards": [{"name": n, "rows": r} for n, r in shards]}


def check_hashes(manifest: dict, where, tokenizer_sha: str | None, data_hash: str | None) -> None:
    for key, expect, what in (("tokenizer_sha256", tokenizer_sha, "tokenizer"),
                              ("data_manifest_hash", data_hash, "data manifest")):
        if expect is not None and manifest.get(key) != expect:
            raise CacheError(f"{where}: teacher cache was built for another {what}: cache has "
                             f"{key}={manifest.get(key)}, the data given has {expect}")


class TeacherCache:
    """A finished cache; `batch_target` turns a batch's rows into a SparseTarget."""

    def __init__(self, path, tokenizer_sha: str | None = None, data_hash: str | None = None):
        self.path = Path(path)
        self.manifest = read_json(self.path / MANIFEST, "teacher cache manifest")
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise CacheError(f"{self.path / MANIFEST}: not a {FORMAT} v{VERSION} manifest")
        check_hashes(self.manifest, self.path, tokenizer_sha, data_hash)
        self.spec = from_dict(CacheSpec, self.manifest["spec"], "spec")
        self.shards = [CacheShard(self.path, s["name"], self.spec, s["rows"]) for s in self.manifest["shards"]]
        self.starts = np.cumsum([0] + [s.rows for s in self.shards])

    @property
    def rows(self) -> int:
        return int(self.starts[-1])

    def row(self, sample_index: int):
        if not 0 <= sample_index < self.rows:
            raise CacheError(f"{self.path}: sample_index {sample_index} outside the cache's {self.rows} rows")
        s = int(np.searchsorted(self.starts, sample_index, side="right") - 1)
        return self.shards[s].row(int(sample_index - self.starts[s]))

    def batch_target(self, sample_index, loss_mask, tokens=None, device=None,
                     include_label: bool = False, label_ids=None) -> SparseTarget:
        """SparseTarget with one row per loss_mask = 1 position of the batch, row-major order.

        `tokens` [B, T] (optional, padded) are checked against the cached rows' crc32. With
        `include_label` (needs `label_ids` [B, T]) the actual next token joins the known ids
        when it is outside them (its mass leaves the rest bucket); otherwise the slot is padding.
        """
        mask = torch.as_tensor(loss_mask).bool().cpu()
        parts = []
        for b, si in enumerate(torch.as_tensor(sample_index).tolist()):
            ids, lps, lab, rest, n, crc, n_tokens = self.row(int(si))
            want = int(mask[b].sum())
            if n != want:
                raise CacheError(f"{self.path}: row sample_index={si} has {n} cached positions but the batch "
                                 f"row has {want} supervised positions (different data or sequence length)")
            if tokens is not None and row_crc(torch.as_tensor(tokens[b])[:n_tokens].cpu().numpy()) != crc:
                raise CacheError(f"{self.path}: row sample_index={si}: batch tokens differ from the tokens "
                                 "the teacher scored (cache built from other data)")
            if include_label:
                ids, lps, rest = _append_label(ids, lps, lab, rest, torch.as_tensor(label_ids[b])[mask[b]].numpy())
            parts.append((ids, lps, rest, lab))  # SparseTarget's field order
        ids, lps, rest, lab = (torch.from_numpy(np.concatenate([p[i] for p in parts])).to(device) for i in range(4))
        return SparseTarget(ids, lps, rest_logmass=rest, label_logprob=lab)


def _append_label(ids, lps, label_lp, rest, labels):
    """Add the label as a known id where it is outside the known ids; take its mass off the rest."""
    outside = ~(ids == labels[:, None]).any(1)
    extra_id = np.where(outside, labels, -1)
    extra_lp = np.where(outside, label_lp, 0.0).astype(np.float32)
    named = rest_without(torch.from_numpy(rest), torch.from_numpy(label_lp)).numpy()
    new_rest = np.where(outside, named, rest.astype(np.float64))
    return (np.concatenate([ids, extra_id[:, None]], 1), np.concatenate([lps, extra_lp[:, None]], 1),
            np.maximum(new_rest, TEACHER_LOGP_FLOOR).astype(np.float32))


def verify_cache(path, full: bool = True, progress=None) -> dict:
    """Check every shard (record, sizes, index consistency, first/last row decode; when `full`, the
    sha256 of the data file and of the index file)."""
    cache = TeacherCache(path)
    positions = 0
    for shard in cache.shards:
        kdi = cache.path / f"{shard.name}.kdi.npy"
        steps = np.diff(shard.index[:, :2], axis=0)
        if (steps < 0).any() or shard.index[0, :2].any() or int(shard.index[-1, 1]) != shard.meta["positions"]:
            bad = int(np.flatnonzero((steps < 0).any(1))[0]) if (steps < 0).any() else 0
            raise CacheError(f"{kdi}: index corrupt (row {bad}: offsets and positions must start at 0, never "
                             f"decrease and end at the record's {shard.meta['positions']} positions)")
        if shard.rows:
            for i in {0, shard.rows - 1}:
                shard.row(i)
        if full:
            digest = hashlib.sha256(np.asarray(shard.data).tobytes()).hexdigest()
            if digest != shard.meta["sha256"]:
                raise CacheError(f"{cache.path / (shard.name + '.kdc')}: sha256 mismatch (corrupt shard)")
            if "index_sha256" in shard.meta and hashlib.sha256(kdi.read_bytes()).hexdigest() != shard.meta["index_sha256"]:
                raise CacheError(f"{kdi}: sha256 mismatch (corrupt index)")
        positions += shard.meta["positions"]
        if progress:
            progress(shard.name)
    total_bytes = sum(s.meta["bytes"] for s in cache.shards)
    return {"shards": len(cache.shards), "rows": cache.rows, "positions": positions, "bytes": total_bytes,
            "bytes_per_position": total_bytes / max(positions, 1), "teacher": cache.manifest["teacher"],
            "spec": cache.manifest["spec"]}


def reconstruct_logprobs(target: SparseTarget, vocab: int) -> torch.Tensor:
    """Full-vocab log-probs [n, V] from a sparse target: known ids keep their (renormalised) mass,
    the rest mass is spread uniformly over the other ids (the max-entropy completion)."""
    valid = target.ids >= 0
    ids = torch.where(valid, target.ids, target.ids[:, :1])
    lps = target.logprobs.double()
    known = torch.where(valid, lps, lps[:, :1])  # padding repeats slot 0 (same id, same value)
    n_rest = vocab - valid.sum(1)
    out = (target.rest_logmass.double() - n_rest.double().log())[:, None].expand(-1, vocab).clone()
    out.scatter_(1, ids, known)
    return torch.log_softmax(out, dim=-1)
