"""The vLLM teacher client against a local stub server speaking vLLM's /v1/completions schema
(`choices[i].prompt_logprobs`: per prompt token None or {token_id: {logprob, rank, decoded_token}}),
with injected failures (HTTP 5xx/429/400, timeouts) to test retries and error messages."""
import functools
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from vpmoe.config import ConfigError, from_dict
from vpmoe.kd.teacher import TeacherConfig, TeacherError, VLLMTeacher

V = 201088
SMALL = 1000  # the stub's model puts real mass on ids < SMALL; every other id has logit -30


def stub_logprobs(prev: int) -> torch.Tensor:
    """The stub model's full next-token log-probs given the previous token (float64 [V])."""
    return _stub_logprobs(prev % 97)


@functools.lru_cache(maxsize=None)
def _stub_logprobs(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.full((V,), -30.0, dtype=torch.float64)
    logits[:SMALL] = torch.randn(SMALL, generator=g, dtype=torch.float64) * 3
    return torch.log_softmax(logits, 0)


@functools.lru_cache(maxsize=None)
def _stub_top(seed: int, k: int) -> tuple[list[int], list[float]]:
    top = _stub_logprobs(seed).topk(k)
    return top.indices.tolist(), top.values.tolist()


@functools.lru_cache(maxsize=None)
def _stub_descending(seed: int) -> np.ndarray:
    """-logprobs sorted ascending: a token's rank is a binary search, not a pass over V (the stub
    must answer well inside the client's 0.5 s timeout on a loaded 2-core machine)."""
    return np.sort(-_stub_logprobs(seed).numpy())


def prompt_logprobs(prompt: list[int], k: int) -> list:
    out = [None]
    for i in range(1, len(prompt)):
        seed, tok = prompt[i - 1] % 97, prompt[i]
        ids, values = _stub_top(seed, k)
        entry = {str(t): {"logprob": v, "rank": r + 1, "decoded_token": f"<{t}>"}
                 for r, (t, v) in enumerate(zip(ids, values))}
        if str(tok) not in entry:  # vLLM adds the prompt token itself with its true rank
            lp = float(_stub_logprobs(seed)[tok])
            rank = int(np.searchsorted(_stub_descending(seed), -lp, side="left")) + 1  # 1 + #(logprob > lp)
            entry[str(tok)] = {"logprob": lp, "rank": rank, "decoded_token": f"<{tok}>"}
        out.append(entry)
    return out


class Stub:
    def __init__(self, script=()):
        self.script, self.requests, self.lock = list(script), [], threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.requests.append(body)
                    action = stub.script.pop(0) if stub.script else "ok"
                if action == "sleep":
                    threading.Event().wait(1.0)
                    action = "ok"  # too late: the client has timed out
                if action == "cut":  # a body shorter than its Content-Length: the client's IncompleteRead
                    self.send_response(200)
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    self.wfile.write(b'{"choices": [')
                    self.close_connection = True
                    return
                if isinstance(action, int):
                    payload = json.dumps({"object": "error", "message": f"injected {action}"}).encode()
                    self.send_response(action)
                elif action in ("binary", "list", "nolp"):
                    payload = {"binary": b"\xff\xfe\x00\xd8 not text", "list": b"[]",
                               "nolp": json.dumps({"choices": [
                                   {"index": i, "prompt_logprobs": [None] + [{"5": {"rank": 1}}] * (len(p) - 1)}
                                   for i, p in enumerate(body["prompt"])]}).encode()}[action]
                    self.send_response(200)
                else:
                    if self.path != "/v1/completions":
                        self.send_response(404)
                        self.end_headers()
                        return
                    k = body["prompt_logprobs"]
                    choices = [{"index": i, "text": "x", "logprobs": None, "finish_reason": "length",
                                "prompt_logprobs": prompt_logprobs(p, k)} for i, p in enumerate(body["prompt"])]
                    payload = json.dumps({"id": "cmpl-1", "object": "text_completion", "model": body["model"],
                                          "choices": choices[::-1]}).encode()  # any order: index decides
                    self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    servers = []

    def make(script=()):
        servers.append(Stub(script))
        return servers[-1]
    yield make
    for s in servers:
        s.close()


def client(url, k=8, sleeps=None, **kw):
    for seed in range(97):  # warm the stub's caches so that only injected sleeps are slow
        _stub_top(seed, k)
        _stub_descending(seed)
    cfg = from_dict(TeacherConfig, {"backend": "vllm", "url": url, "model": "gpt-oss-120b", "timeout_s": 0.5,
                                    "backoff_s": 0.01, "max_retries": 3, **kw})
    return VLLMTeacher(cfg, top_k=k, sleep=(sleeps.append if sleeps is not None else lambda s: None))


def random_docs(n_docs, seed=0):
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        tokens = rng.integers(0, 1500, size=int(rng.integers(5, 40)))
        positions = np.sort(rng.choice(len(tokens) - 1, size=min(6, len(tokens) - 1), replace=False))
        docs.append((tokens, positions))
    return docs


def check_scores(docs, scores, k):
    for (tokens, positions), s in zip(docs, scores):
        for row, t in enumerate(positions):
            lp = stub_logprobs(int(tokens[t]))
            top = lp.topk(k)
            assert s.ids[row].tolist() == top.indices.tolist()
            np.testing.assert_allclose(s.logprobs[row], top.values.numpy(), rtol=1e-6)
            assert s.label_logprob[row] == pytest.approx(float(lp[tokens[t + 1]]), rel=1e-6)
            rest = math.log(1 - top.values.exp().sum().item())
            assert s.rest_logmass[row] == pytest.approx(rest, rel=1e-4, abs=1e-5)


def test_scores_match_the_served_distribution_batched_and_concurrent(stub):
    server = stub()
    docs = random_docs(7)
    teacher = client(server.url, docs_per_request=2, concurrency=3)
    check_scores(docs, teacher.score_docs(docs), 8)
    assert len(server.requests) == 4
    req = server.requests[0]
    assert req["prompt_logprobs"] == 8 and req["max_tokens"] == 1 and isinstance(req["prompt"][0][0], int)


def test_retries_with_exponential_backoff_then_success(stub):
    server = stub([500, 429, "sleep"])
    sleeps = []
    docs = random_docs(1, seed=1)
    check_scores(docs, client(server.url, sleeps=sleeps).score_docs(docs), 8)
    assert len(server.requests) == 4
    # jittered delays in [0.5, 1] x 0.01 * 2^(attempt - 1)
    assert len(sleeps) == 3 and all(0.005 * 2**i <= d <= 0.01 * 2**i for i, d in enumerate(sleeps))


def test_clear_error_after_last_retry(stub):
    server = stub([503] * 10)
    with pytest.raises(TeacherError, match=r"failed after 4 attempts; last error: HTTP 503.*injected 503"):
        client(server.url).score_docs(random_docs(1))
    assert len(server.requests) == 4


def test_timeouts_exhaust_retries(stub):
    server = stub(["sleep"] * 3)
    with pytest.raises(TeacherError, match="after 3 attempts.*(timed out|Timeout)"):
        client(server.url, max_retries=2).score_docs(random_docs(1))


def test_client_errors_are_not_retried(stub):
    server = stub([400])
    with pytest.raises(TeacherError, match="HTTP 400.*injected 400"):
        client(server.url).score_docs(random_docs(1))
    assert len(server.requests) == 1


def test_unreachable_server_and_bad_schema(stub):
    with pytest.raises(TeacherError, match="after 2 attempts.*(refused|Connection)"):
        client("http://127.0.0.1:9", max_retries=1).score_docs(random_docs(1))
    teacher = client(stub().url, k=8)
    with pytest.raises(TeacherError, match="prompt_logprobs has 3 entries for a 4-token prompt"):
        teacher.parse_choice({"prompt_logprobs": [None, {}, {}]}, [1, 2, 3, 4], [0])
    with pytest.raises(TeacherError, match="max-logprobs"):
        teacher.parse_choice({"prompt_logprobs": [None, {"2": {"logprob": -0.1}}]}, [1, 2], [0])


def test_config_validation():
    with pytest.raises(ConfigError, match="url/model"):
        from_dict(TeacherConfig, {"backend": "vllm", "url": "127.0.0.1:8000", "model": "m"})
    with pytest.raises(ConfigError, match="path"):
        from_dict(TeacherConfig, {"backend": "hf"})
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(TeacherConfig, {"backend": "hf", "path": "x", "batch": 3})
    with pytest.raises(ConfigError, match="raw distribution"):
        from_dict(TeacherConfig, {"backend": "vllm", "model": "m", "temperature": 2.0})
    from pathlib import Path

    from vpmoe.kd.teacher import load_teacher_config

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("teacher_*.toml"))
    assert len(configs) >= 3 and all(load_teacher_config(c).teacher_id for c in configs)
    with pytest.raises(TeacherError, match="tail samples"):
        VLLMTeacher(from_dict(TeacherConfig, {"backend": "vllm", "model": "m"}), top_k=4, tail_samples=2)


def test_score_job_with_vllm_backend(stub, tmp_path):
    """The scoring job end to end over a stub-served teacher, on data from `vpmoe data build`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vpmoe.data.build import build
    from vpmoe.data.loader import SplitData
    from vpmoe.kd.cache import CacheSpec, TeacherCache
    from vpmoe.kd.score import score

    rows = [{"synth_id": f"r{i}", "query": f"question {i} about cats", "synthetic_reasoning": "think " * (5 + i),
             "synthetic_answer": f"answer {i}"} for i in range(6)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "synth.parquet")
    build(tmp_path / "synth.parquet", tmp_path / "data", seq_len=128, valid_fraction=0.0, chunk_rows=3,
          progress=False)
    server = stub()
    cfg = from_dict(TeacherConfig, {"backend": "vllm", "url": server.url, "model": "m", "docs_per_request": 3})
    summary = score(tmp_path / "data", cfg, tmp_path / "cache", CacheSpec(top_k=8, codec="fixed", lp_bits=8),
                    progress=False)
    data = SplitData(tmp_path / "data", "train")
    assert summary["shards_mine"] == 2 and len(data) >= 3
    batch = data.batch([len(data) - 1, 0])
    target = TeacherCache(tmp_path / "cache").batch_target(batch["sample_index"], batch["loss_mask"],
                                                          tokens=batch["tokens"])
    mask = batch["loss_mask"].bool()
    prev = batch["tokens"][mask]
    for r in range(0, len(prev), 7):
        lp = stub_logprobs(int(prev[r]))
        top = lp.topk(8)
        assert target.ids[r].tolist() == top.indices.tolist()  # fixed codec keeps rank order
        np.testing.assert_allclose(target.logprobs[r].numpy(), top.values.numpy(), atol=0.05)


def test_cut_and_undecodable_replies_are_retried_malformed_ones_named(stub):
    """A body cut short (IncompleteRead) and one that is not text are transport failures: retried.
    A reply of the wrong shape (a JSON list; entries without log-probs) is named, not a traceback."""
    server = stub(["cut", "binary"])
    docs = random_docs(1, seed=2)
    check_scores(docs, client(server.url).score_docs(docs), 8)
    assert len(server.requests) == 3
    with pytest.raises(TeacherError, match="not a completions object with a 'choices' list"):
        client(stub(["list"]).url).score_docs(random_docs(1))
    with pytest.raises(TeacherError, match="malformed prompt log-probs at position .*KeyError"):
        client(stub(["nolp"]).url).score_docs(random_docs(1))


def test_a_failed_request_cancels_the_queued_ones(stub):
    """One request fails for good (HTTP 400): the requests still queued are never sent (before, every
    queued request and its retries ran before the error surfaced; with Ctrl-C the same path stops
    the job at once)."""
    server = stub([400])
    with pytest.raises(TeacherError, match="HTTP 400"):
        client(server.url, docs_per_request=1, concurrency=1).score_docs(random_docs(6))
    assert len(server.requests) == 1
