"""`vpmoe data build`: packing, masks after packing/truncation, Megatron layout, skips, resume, verify."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.test_data_support import golden_rows, read_megatron, sample_dir, sample_rows
from vpmoe import tokenizer as tok
from vpmoe.cli import main
from vpmoe.data import DataError, build as build_module
from vpmoe.data.build import build, pack_best_fit
from vpmoe.data.prompt import load_prompt
from vpmoe.data.render import HarmonyRenderer, make_document
from vpmoe.data.shards import Shard
from vpmoe.data.sources import DatasetsSource, split_of
from vpmoe.data.verify import verify

SEQ_LEN = 2048
SETTINGS = dict(seq_len=SEQ_LEN, valid_fraction=0.05, chunk_rows=512, progress=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "ds"
    manifest = build(sample_dir() / "synth_train.parquet", out, workers=1, **SETTINGS)
    return out, manifest


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _documents(directory: Path, manifest: dict):
    """(split, row, doc tokens, loss_mask, span_id, row_id, truncated) read back from the shards."""
    for split, entries in manifest["shards"].items():
        for entry in entries:
            shard = Shard(directory, entry["name"], SEQ_LEN)
            ids = pq.read_table(directory / f"{entry['name']}.rows.parquet").to_pylist()
            d = 0
            for r in range(len(shard)):
                arrays, lengths = shard.row(r)
                start = 0
                for n in lengths:
                    yield (split, (entry["name"], r), *(arrays[f][start:start + n] for f in
                                                        ("tokens", "loss_mask", "span_id")),
                           ids[d]["row_id"], ids[d]["truncated"])
                    start, d = start + n, d + 1


def test_counts_and_packing_efficiency(built):
    _, manifest = built
    counts = manifest["counts"]
    assert counts["rows_in"] == 888
    assert counts["rows_skipped"]["final_too_long"] == 1 and sum(counts["rows_skipped"].values()) == 1
    assert counts["rows_kept"] == 887
    train = counts["splits"]["train"]
    assert train["packing_efficiency"] >= 0.95
    assert train["packing_efficiency"] == train["tokens"] / (train["rows"] * SEQ_LEN)
    for field in ("git_sha", "config_hash", "split_rule", "input"):
        assert manifest[field]
    assert manifest["tokenizer"]["sha256"] == tok.TOKENIZER_SHA256
    sample_bytes = (sample_dir() / "synth_train.parquet").read_bytes()
    assert manifest["input"]["files"][0]["sha256"] == hashlib.sha256(sample_bytes).hexdigest()


def test_packed_documents_equal_independent_rendering(built):
    """Every packed document equals the golden file (untruncated) or the official renderer +
    truncation (truncated); each kept row appears once, whole, in the split its id hashes to."""
    out, manifest = built
    golden = golden_rows()
    source = {r["row_id"]: r for r in sample_rows()}
    official = HarmonyRenderer(load_prompt(sample_dir() / "harmony_prompt.json"))
    seen, truncated = set(), 0
    for split, _, tokens, mask, span, row_id, cut in _documents(out, manifest):
        assert row_id not in seen
        seen.add(row_id)
        assert split == split_of(row_id, SETTINGS["valid_fraction"])
        if cut:
            truncated += 1
            row = source[row_id]
            ref = make_document(official.render(row["query"], row["synthetic_reasoning"],
                                                row["synthetic_answer"]), SEQ_LEN)
            ref_tokens, ref_mask, ref_span = ref.tokens, ref.loss_mask, ref.span_id
        else:
            g = golden[row_id]
            ref_tokens, ref_mask, ref_span = g["tokens"], g["loss_mask"], g["span_id"]
        assert tokens.tolist() == list(ref_tokens), row_id
        assert mask.tolist() == list(ref_mask) and span.tolist() == list(ref_span), row_id
    assert len(seen) == 887 and truncated == 2


def test_rows_never_split_documents(built):
    out, manifest = built
    for entries in manifest["shards"].values():
        for entry in entries:
            shard = Shard(out, entry["name"])
            for r in range(len(shard)):
                arrays, lengths = shard.row(r)
                assert lengths.sum() <= SEQ_LEN
                ends = np.cumsum(lengths)
                assert (arrays["tokens"][ends - 1] == tok.EOD_ID).all()
                assert (arrays["tokens"][ends - lengths] == tok.START_ID).all()
                assert np.count_nonzero(arrays["tokens"] == tok.EOD_ID) == len(lengths)


def test_megatron_layout_read_by_independent_reader(built):
    out, manifest = built
    entry = manifest["shards"]["train"][0]
    parsed = {f: read_megatron(out / f"{entry['name']}.{f}") for f in ("tokens", "loss_mask", "span_id")}
    assert (parsed["tokens"]["version"], parsed["tokens"]["code"]) == (1, 4)
    assert parsed["loss_mask"]["code"] == 1 and parsed["span_id"]["code"] == 1
    for f in ("loss_mask", "span_id"):
        assert np.array_equal(parsed[f]["lengths"], parsed["tokens"]["lengths"])
        assert np.array_equal(parsed[f]["doc_index"], parsed["tokens"]["doc_index"])
    assert len(parsed["tokens"]["doc_index"]) == entry["rows"] + 1
    assert len(parsed["tokens"]["lengths"]) == entry["docs"]
    shard = Shard(out, entry["name"])
    for r in (0, entry["rows"] - 1):
        lo, hi = parsed["tokens"]["doc_index"][r:r + 2]
        arrays, _ = shard.row(r)
        for f in ("tokens", "loss_mask", "span_id"):
            assert np.array_equal(np.concatenate(parsed[f]["sequences"][lo:hi]), arrays[f])


def test_pack_best_fit():
    rows = pack_best_fit([700, 600, 500, 400, 300, 200, 100], 1000)
    assert sorted(i for row in rows for i in row) == list(range(7))
    assert len(rows) == 3  # 2800 tokens need >= 3 rows of 1000, and best fit finds 3
    with pytest.raises(ValueError):
        pack_best_fit([1001], 1000)


def _bad_inputs(directory: Path) -> Path:
    rows = sample_rows()[:4]
    good = {k: [r[k] for r in rows] for k in ("row_id", "query", "synthetic_reasoning", "synthetic_answer")}
    a = dict(good)
    a["row_id"] = [None, "x1", "x2", "x3"]
    a["query"] = [rows[0]["query"], None, rows[2]["query"], rows[3]["query"]]
    a["synthetic_reasoning"] = [rows[0]["synthetic_reasoning"], rows[1]["synthetic_reasoning"], "  ",
                                rows[3]["synthetic_reasoning"]]
    a["synthetic_answer"] = [rows[0]["synthetic_answer"], rows[1]["synthetic_answer"], rows[2]["synthetic_answer"],
                             "word " * 3000]
    directory.mkdir()
    pq.write_table(pa.table(a), directory / "a.parquet")
    b = dict(good, row_id=["b0", "b1", "b2", "b3"],
             query=pa.array([q.encode() for q in good["query"][:3]] + [b"\xff\xfe bad"], pa.binary()))
    pq.write_table(pa.table(b), directory / "b.parquet")
    c = dict(good, row_id=["c0", "c1", "c2", "c3"], synthetic_answer=[1, 2, 3, 4])
    pq.write_table(pa.table(c), directory / "c.parquet")
    return directory


def test_malformed_rows_are_counted_by_reason(tmp_path):
    src = _bad_inputs(tmp_path / "src")
    manifest = build(src, tmp_path / "out", seq_len=2048, valid_fraction=0.0, chunk_rows=3, progress=False)
    assert manifest["counts"]["rows_skipped"] == {"missing_id": 1, "missing_field": 1, "empty_field": 1,
                                                  "wrong_type": 4, "undecodable_text": 1, "final_too_long": 1}
    assert manifest["counts"]["rows_in"] == 12 and manifest["counts"]["rows_kept"] == 3
    example = manifest["counts"]["skip_examples"]["undecodable_text"]
    assert example.startswith(f"{src / 'b.parquet'}: row 3: field query")
    verify(tmp_path / "out")


def test_schema_errors_and_nothing_kept_are_errors(tmp_path, capsys):
    """A column absent from a whole file is named before anything is built; a build whose every
    row is skipped (a whole column of another type; an empty file) writes no manifest and exits 2
    with the skip counts, so nothing downstream mistakes it for a dataset."""
    rows = sample_rows()[:3]
    good = {k: [r[k] for r in rows] for k in ("row_id", "query", "synthetic_reasoning", "synthetic_answer")}
    tmp_path.joinpath("in").mkdir()
    cases = {"no_answer": {k: v for k, v in good.items() if k != "synthetic_answer"},
             "int_query": dict(good, query=[1, 2, 3]),
             "empty": {k: pa.array([], pa.string()) for k in good}}
    for name, table in cases.items():
        pq.write_table(pa.table(table), tmp_path / "in" / f"{name}.parquet")
    expect = {"no_answer": "no_answer.parquet: missing column synthetic_answer (columns: row_id, query,",
              "int_query": "no usable row in 3 (skipped: {'wrong_type': 3}; first: ",
              "empty": "no usable row in 0 (the input is empty)"}
    for name, message in expect.items():
        out = tmp_path / f"out_{name}"
        rc = main(["data", "build", "--input", str(tmp_path / "in" / f"{name}.parquet"), "--out", str(out),
                   "--seq-len", "512", "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2 and message in err, (name, err)
        assert not (out / "manifest.json").exists()


def test_strict_names_file_row_and_field(tmp_path, capsys):
    src = _bad_inputs(tmp_path / "src")
    rc = main(["data", "build", "--input", str(src), "--out", str(tmp_path / "out"), "--seq-len", "2048",
               "--strict", "--quiet", "--chunk-rows", "2", "--workers", "2"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"{src / 'a.parquet'}: row 0: field row_id: missing_id" in err


def _inputs_with_a_repeated_id(directory: Path) -> Path:
    rows = sample_rows()[:6]
    table = {k: [r[k] for r in rows] for k in ("row_id", "query", "synthetic_reasoning", "synthetic_answer")}
    directory.mkdir()
    pq.write_table(pa.table({k: v[:3] for k, v in table.items()}), directory / "a.parquet")
    second = {k: v[3:] for k, v in table.items()}
    second["row_id"] = [second["row_id"][0], table["row_id"][1], second["row_id"][2]]  # b row 1 repeats a row 1
    pq.write_table(pa.table(second), directory / "b.parquet")
    return directory


def test_repeated_row_ids_are_counted_and_named(tmp_path, capsys):
    src = _inputs_with_a_repeated_id(tmp_path / "src")
    manifest = build(src, tmp_path / "out", seq_len=2048, valid_fraction=0.0, chunk_rows=2, progress=False)
    counts = manifest["counts"]
    assert counts["duplicate_row_ids"] == 1 and counts["rows_kept"] == 6
    assert counts["duplicate_examples"] == [
        f"field row_id: {sample_rows()[1]['row_id']!r} repeats at {src / 'a.parquet'}: row 1, {src / 'b.parquet'}: row 1"]
    rc = main(["data", "build", "--input", str(src), "--out", str(tmp_path / "strict"), "--seq-len", "2048",
               "--strict", "--quiet", "--chunk-rows", "2"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "1 repeated row ids" in err and f"{src / 'b.parquet'}: row 1" in err
    assert not (tmp_path / "strict" / "manifest.json").exists()


def test_interrupted_build_resumes_to_identical_output(built, tmp_path, monkeypatch):
    reference, _ = built
    out = tmp_path / "ds"
    real = build_module.process_chunk
    calls = []

    def interrupted(chunk):
        calls.append(chunk.index)
        if len(calls) == 2:  # Ctrl-C while the second chunk is being written: half its files exist
            (out / "train-00001.tokens.bin").write_bytes(b"partial")
            (out / ".train-00001.span_id.bin.tmp-999").write_bytes(b"partial")
            raise KeyboardInterrupt
        return real(chunk)

    monkeypatch.setattr(build_module, "process_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(sample_dir() / "synth_train.parquet", out, workers=1, **SETTINGS)
    assert not (out / "manifest.json").exists() and (out / "chunks" / "00000.json").exists()
    first_chunk_mtime = (out / "train-00000.tokens.bin").stat().st_mtime_ns
    monkeypatch.setattr(build_module, "process_chunk", real)
    build(sample_dir() / "synth_train.parquet", out, workers=2, **SETTINGS)  # resume, other worker count
    assert (out / "train-00000.tokens.bin").stat().st_mtime_ns == first_chunk_mtime  # reused, not redone
    assert _files(out) == _files(reference)  # byte-identical to the uninterrupted 1-worker build


_PROCESS_CHUNK = build_module.process_chunk


def _chunk_whose_worker_dies(chunk):
    """`process_chunk`, except that the worker given chunk 1 exits at once, as a process the kernel's
    out-of-memory killer ends would (module level: the pool pickles it by name)."""
    if chunk.index == 1:
        os._exit(9)
    return _PROCESS_CHUNK(chunk)


def test_a_dead_worker_fails_the_build_and_a_rerun_finishes_it(built, tmp_path, monkeypatch):
    """A worker process that dies mid-build ends the build with an error naming what happened (within
    a minute: `multiprocessing.Pool` lost the chunk and waited for it forever), and the same command
    then finishes the build, byte-identical to an uninterrupted one."""
    reference, _ = built
    out = tmp_path / "ds"
    monkeypatch.setattr(build_module, "process_chunk", _chunk_whose_worker_dies)
    raised = []

    def run():
        try:
            build(sample_dir() / "synth_train.parquet", out, workers=2, **SETTINGS)
        except BaseException as e:  # noqa: BLE001 - handed to the test's thread
            raised.append(e)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the build hung after its worker died"
    assert len(raised) == 1 and isinstance(raised[0], DataError), raised
    assert "a build worker process died before chunk" in str(raised[0]) and "Rerun" in str(raised[0])
    assert not (out / "manifest.json").exists()
    monkeypatch.setattr(build_module, "process_chunk", _PROCESS_CHUNK)
    build(sample_dir() / "synth_train.parquet", out, workers=2, **SETTINGS)
    assert _files(out) == _files(reference)


def test_rebuild_with_other_settings_is_refused(built):
    out, _ = built
    with pytest.raises(DataError, match="another config"):
        build(sample_dir() / "synth_train.parquet", out, **{**SETTINGS, "seq_len": 4096})


def test_datasets_sources_give_identical_shards(built, tmp_path):
    datasets = pytest.importorskip("datasets")
    reference, ref_manifest = built
    path = str(sample_dir() / "synth_train.parquet")
    streamed = datasets.load_dataset("parquet", data_files=path, split="train", streaming=True)
    out = tmp_path / "streamed"
    manifest = build(None, out, source=DatasetsSource(streamed, {"kind": "test", "name": path}), **SETTINGS)
    assert manifest["shards"] == ref_manifest["shards"]
    saved = tmp_path / "saved"
    datasets.load_dataset("parquet", data_files=path, split="train").save_to_disk(str(saved))
    manifest = build(str(saved), tmp_path / "from_disk", **SETTINGS)
    assert manifest["input"]["kind"] == "saved_dataset"
    assert manifest["shards"] == ref_manifest["shards"]


def test_verify_detects_a_flipped_byte(built, tmp_path, capsys):
    reference, manifest = built
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    assert main(["data", "verify", str(out)]) == 0
    victim = out / f"{manifest['shards']['train'][1]['name']}.span_id.bin"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    assert main(["data", "verify", str(out)]) == 1
    assert f"{victim}: sha256 does not match" in capsys.readouterr().err
    manifest_path = out / "manifest.json"
    m = json.loads(manifest_path.read_text())
    m["format"] = "something-else"
    manifest_path.write_text(json.dumps(m))
    with pytest.raises(DataError, match="manifest.json: format"):
        verify(out)


def test_progress_rate_reads_at_every_scale():
    """The build's tokens/s column: a tiny input's rate reads as itself (it read 0.00M), with three
    significant digits and a suffix that never shows 1000 of the smaller unit."""
    from vpmoe.data.progress import scaled

    cases = {0: "0", 3.2: "3", 812.4: "812", 999.4: "999", 999.6: "1k", 12_345: "12.3k", 999_499: "999k",
             999_600: "1M", 1.25e6: "1.25M", 3.2e9: "3.2G", 1.5e12: "1500G"}
    assert {x: scaled(x) for x in cases} == cases
