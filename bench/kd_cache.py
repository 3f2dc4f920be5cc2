"""Teacher-cache encoding: bytes per supervised token and the KL lost, per codec / k / bits.

Teachers: a tiny random HF causal LM (Qwen3 layout, vocab 201088, CPU) whose head is scaled to
two sharpness levels, run over random token sequences; plus two synthetic families with the
entropy range of real LMs (Gaussian logits, and Zipf-ranked logits over permuted ids). For each
setting the exact top-k + rest is encoded, decoded and compared:

- `B/tok`: encoded bytes per supervised position (ids + log-probs + label log-prob + rest mass);
- `KL quant`: KL(exact coarse || decoded coarse) over the K + 1 categories the losses use
  (quantisation error only, in nats);
- `KL full`: KL(true distribution || reconstruction) with the rest mass spread uniformly over
  the other ids (what a cache of this k cannot know: the tail's shape);
- `top-k mass`: mean teacher mass inside the known ids; `dec pos/s`: decode speed (numpy, 1 core).

    python bench/kd_cache.py [--positions 1024]     # CPU; a multiple of 256; --no-record prints only
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results import report  # noqa: E402
from vpmoe.kd.cache import CacheSpec, decode_row, encode_row, reconstruct_logprobs  # noqa: E402
from vpmoe.kd.losses import SparseTarget  # noqa: E402
from vpmoe.kd.teacher import targets_from_logits  # noqa: E402

V = 201088
TEACHER_SEQ = 256  # the tiny teacher scores whole sequences of this length


def tiny_teacher_logprobs(positions: int, head_scale: float, seed: int = 0) -> torch.Tensor:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                      tie_word_embeddings=False)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
        tokens = torch.randint(0, 50000, (positions // TEACHER_SEQ, TEACHER_SEQ))  # common-token range, like real text
        out = []
        for row in tokens:
            out.append(torch.log_softmax(model(row[None]).logits[0].double(), -1))
    return torch.cat(out)


def synthetic_logprobs(positions: int, family: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(0, positions, 64):
        if family == "gauss":
            logits = torch.randn(64, V, generator=g, dtype=torch.float64) * 5
        else:  # zipf: logit = -1.3 log(rank) over a random permutation, plus noise
            ranks = torch.arange(1, V + 1, dtype=torch.float64)
            logits = (-1.3 * ranks.log())[None] + torch.randn(64, V, generator=g, dtype=torch.float64) * 0.5
            logits = logits.gather(1, torch.stack([torch.randperm(V, generator=g) for _ in range(64)]))
        out.append(torch.log_softmax(logits, -1))
    return torch.cat(out)[:positions]


def evaluate(true_lp: torch.Tensor, k: int, codec: str, bits: int, tail: int) -> dict:
    n = true_lp.shape[0]
    labels = torch.multinomial(true_lp.exp().float(), 1).squeeze(1)
    ids, lps, lab, rest = targets_from_logits(true_lp, labels, k, tail, generator=torch.Generator().manual_seed(0))
    spec = CacheSpec(top_k=k, tail_samples=tail, codec=codec, lp_bits=bits)
    blocks = [encode_row(ids[i:i + 256].numpy(), lps[i:i + 256].float().numpy(), lab[i:i + 256].float().numpy(),
                         rest[i:i + 256].float().numpy(), spec) for i in range(0, n, 256)]
    t0 = time.perf_counter()
    decoded = [decode_row(b, min(256, n - 256 * j), spec) for j, b in enumerate(blocks)]
    dec_s = time.perf_counter() - t0
    d_ids, d_lps, _, d_rest = (np.concatenate([d[i] for d in decoded]) for i in range(4))
    target = SparseTarget(torch.from_numpy(d_ids), torch.from_numpy(d_lps), torch.from_numpy(d_rest))

    def coarse(idx, lp_known, lp_rest):  # K + 1 categories in id order, renormalised
        order = torch.argsort(idx, 1)
        x = torch.cat([lp_known.double().gather(1, order), lp_rest.double()[:, None]], 1)
        return torch.log_softmax(x, -1)

    a = coarse(ids, lps, rest)
    b = coarse(target.ids, target.logprobs, target.rest_logmass)
    kl_quant = (a.exp() * (a - b)).sum(1).mean().item()
    kl_full = 0.0
    for i in range(0, n, 128):
        part = SparseTarget(target.ids[i:i + 128], target.logprobs[i:i + 128], target.rest_logmass[i:i + 128])
        rec = reconstruct_logprobs(part, V)
        t = true_lp[i:i + 128]
        kl_full += (t.exp() * (t - rec)).sum().item()
    return {"B/tok": sum(len(x) for x in blocks) / n, "KL quant": kl_quant, "KL full": kl_full / n,
            "top-k mass": lps.double().exp().sum(1).mean().item(), "dec pos/s": n / dec_s}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--positions", type=int, default=1024)
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    if args.positions < TEACHER_SEQ or args.positions % TEACHER_SEQ:
        p.error(f"--positions {args.positions}: must be a positive multiple of {TEACHER_SEQ} "
                f"(the tiny teacher scores whole {TEACHER_SEQ}-token sequences)")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    teachers = {"tiny-qwen3 head x10": lambda: tiny_teacher_logprobs(args.positions, 10.0),
                "tiny-qwen3 head x40": lambda: tiny_teacher_logprobs(args.positions, 40.0),
                "gauss(sigma=5)": lambda: synthetic_logprobs(args.positions, "gauss"),
                "zipf(1.3)": lambda: synthetic_logprobs(args.positions, "zipf")}
    settings = [(64, "rice", 6, 0), (64, "rice", 5, 0), (64, "rice", 8, 0), (64, "fixed", 8, 0),
                (64, "rice", 6, 8), (32, "rice", 6, 0), (16, "rice", 6, 0)]
    rows = []
    for name, make in teachers.items():
        true_lp = make()
        entropy = -(true_lp.exp() * true_lp).sum(1).mean().item()
        for k, codec, bits, tail in settings:
            r = evaluate(true_lp, k, codec, bits, tail)
            rows.append({"teacher": name, "H nats": entropy, "k": k, "tail": tail, "codec": codec, "lp bits": bits, **r})
            print(f"{name:22s} H={entropy:5.2f} k={k:2d}+{tail} {codec:5s} {bits}b  {r['B/tok']:6.1f} B/tok  "
                  f"KLq={r['KL quant']:.2e}  KLfull={r['KL full']:.3f}  mass={r['top-k mass']:.3f}", flush=True)
    notes = f"{args.positions} positions per teacher; CPU; see bench/kd_cache.py docstring for columns"
    report("kd_cache", rows, not args.no_record, notes,
           command=f"python bench/kd_cache.py --positions {args.positions}")


if __name__ == "__main__":
    main()
