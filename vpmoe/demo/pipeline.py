"""`vpmoe demo`: the whole pipeline, tiny, on a CPU, through the system's real code paths.

Steps (each writes `OUT/steps/<name>.json` when done; a second run skips finished steps):
  data      generate seeded exercises (vpmoe.demo.exercises) -> `vpmoe data build` shards
  teacher   train a wider tiny vpMoE with span-normalised CE (vpmoe.train.Trainer)
  cache     export it (HF format) and score the train split (vpmoe.kd.score, hf backend, top-k)
  students  per seed, two students from the same init for the same tokens: CE only, and KD
            from the cache (kd.mode = offline: 0.5 forward KL to the cached top-k + tail, label
            included, + 0.5 CE on every step; docs/LOG.md has the pilot that chose this mix)
  eval      held-out loss per span (the trainer's own held-out pass), exact-answer accuracy and
            Harmony validity of greedy generations on held-out exercises never seen in training
  report    markdown + PNG plots, and a summary table on the terminal

Design choices:
- Every step is a real subsystem call with a config, never a demo-only shortcut. The one
  concession to the CPU is `data.vocab_subset = "auto"` (vpmoe.data.vocab_subset): the models keep
  one output row per token id the data uses (~1.5k of 201088), a documented, tested feature of the
  trainer, the teacher backend, the KD objective and generation.
- Sizes are chosen to finish in well under 15 minutes on 2 cores; `--quick` shrinks them further
  for the tests. The settings of a run are written to `OUT/settings.json`; changing them requires a
  new output directory (finished steps would not match).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from vpmoe.config import ConfigError, from_dict

TEACHER_MODEL = dict(vocab_size=201088, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32,
                     global_every=4, window=32, tpa_q_rank=4, tpa_kv_rank=2, n_dense_layers=1, dense_ffn=256,
                     n_experts=16, expert_ffn=64, shared_ffn=128, top_k=2, n_groups=4, topk_groups=2,
                     max_seq_len=512)
STUDENT_MODEL = dict(TEACHER_MODEL, d_model=64, head_dim=16, dense_ffn=128, expert_ffn=32, shared_ffn=64)


@dataclass
class DemoSettings:
    train_rows: int = 4000
    heldout_rows: int = 96
    seq_len: int = 384
    micro_batch: int = 8
    teacher_steps: int = 300
    student_steps: int = 150
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    top_k: int = 16
    kd_fraction: float = 1.0  # share of KD steps; each KD step mixes CE in at the token level:
    ce_weight: float = 0.5  # loss = (1 - ce_weight) * FKL(teacher || student) + ce_weight * CE
    max_new_tokens: int = 96
    eval_rows: int = 64  # held-out rows per evaluation during training

    @classmethod
    def quick(cls) -> "DemoSettings":
        return cls(train_rows=300, heldout_rows=8, seq_len=384, micro_batch=4, teacher_steps=4, student_steps=3,
                   seeds=[0, 1], top_k=8, max_new_tokens=16, eval_rows=8)


class Demo:
    def __init__(self, out: str | Path, settings: DemoSettings, progress: bool = True):
        self.out, self.settings, self.progress = Path(out), settings, progress
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "steps").mkdir(exist_ok=True)
        path = self.out / "settings.json"
        mine = dataclasses.asdict(settings)
        if path.exists():
            theirs = json.loads(path.read_text())
            if theirs != mine:
                diff = [k for k in mine if mine[k] != theirs.get(k)]
                raise ConfigError(f"{self.out} holds a demo made with other settings ({', '.join(diff)}); "
                                  "use a new --out directory")
        else:
            _write_json(path, mine)

    # ------------------------------------------------------------------------------ step machinery

    def step(self, name: str, fn) -> dict:
        path = self.out / "steps" / f"{name}.json"
        if path.exists():
            print(f"[demo] {name}: done before, skipped ({path})")
            return json.loads(path.read_text())
        print(f"[demo] {name} ...", flush=True)
        t0 = time.perf_counter()
        result = fn()
        result["seconds"] = round(time.perf_counter() - t0, 1)
        _write_json(path, result)
        print(f"[demo] {name}: {result['seconds']} s", flush=True)
        return result

    def run(self) -> Path:
        s = self.settings
        t0 = time.perf_counter()
        self.step("data", self.make_data)
        self.step("teacher", lambda: self.train("teacher", TEACHER_MODEL, s.teacher_steps, seed=1234))
        self.step("cache", self.score_cache)
        for seed in s.seeds:
            self.step(f"student_ce_seed{seed}", lambda seed=seed: self.train(f"student_ce_seed{seed}", STUDENT_MODEL,
                                                                             s.student_steps, seed=seed))
            self.step(f"student_kd_seed{seed}", lambda seed=seed: self.train(f"student_kd_seed{seed}", STUDENT_MODEL,
                                                                             s.student_steps, seed=seed, kd=True))
        results = self.step("eval", self.evaluate)
        from vpmoe.demo.report import write_report
        report = write_report(self.out, results, s)
        print(f"[demo] total {time.perf_counter() - t0:.0f} s; report: {report}")
        return report

    # ------------------------------------------------------------------------------ steps

    def make_data(self) -> dict:
        from vpmoe.data.build import build
        from vpmoe.demo.exercises import generate, write_parquet

        s = self.settings
        raw = self.out / "raw"
        raw.mkdir(exist_ok=True)
        write_parquet(generate(s.train_rows, seed=0), raw / "exercises.parquet")
        # held-out exercises come from another seed: rows the models never train on
        write_parquet(generate(s.heldout_rows, seed=1_000_003), raw / "heldout.parquet")
        manifest = build(raw / "exercises.parquet", self.out / "shards", seq_len=s.seq_len, valid_fraction=0.05,
                         workers=2, progress=self.progress)
        return {"splits": manifest["counts"]["splits"], "rows_kept": manifest["counts"]["rows_kept"]}

    def run_config(self, name: str, model: dict, steps: int, seed: int, kd: bool):
        from vpmoe.train.config import RunConfig

        s = self.settings
        data = {
            "model": model,
            "data": {"path": str(self.out / "shards"), "seq_len": s.seq_len, "micro_batch_size": s.micro_batch,
                     "vocab_subset": "auto", "shuffle_seed": seed},
            "optim": {"lr": 0.02, "adamw_lr": 0.006, "muon_weight_decay": 0.0, "grad_clip": 1.0},
            "schedule": {"warmup_steps": max(1, steps // 20), "decay_fraction": 0.3, "decay_shape": "sqrt"},
            "train": {"run_dir": str(self.out / "runs" / name), "steps": steps, "seed": seed, "device": "cpu",
                      "eval_every": max(1, steps // 5), "eval_rows": s.eval_rows, "expert_load_every": max(1, steps // 10),
                      "progress": self.progress, "tensorboard": True},
            "checkpoint": {"every": 0, "keep": 1},
            "kd": {"mode": "none"},
        }
        if kd:
            data["kd"] = {"mode": "offline", "cache": str(self.out / "cache"), "include_label": True,
                          "loss": {"kind": "fkl", "ce_weight": s.ce_weight}, "kd_fraction": s.kd_fraction,
                          "seed": seed}
        return from_dict(RunConfig, data)

    def train(self, name: str, model: dict, steps: int, seed: int, kd: bool = False) -> dict:
        from vpmoe.train.trainer import Trainer

        cfg = self.run_config(name, model, steps, seed, kd)
        run_dir = Path(cfg.train.run_dir)
        resume = run_dir.exists() and any(run_dir.iterdir())  # an interrupted run continues
        final = Trainer(cfg, resume=resume).run()
        return {"run_dir": str(run_dir), "kd": kd, "seed": seed, "steps": steps, **final}

    def score_cache(self) -> dict:
        from vpmoe.kd.cache import CacheSpec
        from vpmoe.kd.score import score
        from vpmoe.kd.teacher import TeacherConfig
        from vpmoe.train.checkpoint import export_hf

        hf_dir = self.out / "teacher_hf"
        if not hf_dir.exists():
            export_hf(self.out / "runs" / "teacher", hf_dir)
        tcfg = from_dict(TeacherConfig, {"backend": "hf", "name": "demo-teacher", "path": str(hf_dir),
                                         "dtype": "float32", "device": "cpu", "max_batch_tokens": 8192})
        spec = from_dict(CacheSpec, {"top_k": self.settings.top_k})
        summary = score(self.out / "shards", tcfg, self.out / "cache", spec, progress=self.progress)
        return {"teacher_hf": str(hf_dir), "cache": str(self.out / "cache"),
                **{k: v for k, v in summary.items() if isinstance(v, (int, float, str))}}

    def evaluate(self) -> dict:
        """Per model: held-out span losses (from its run), accuracy and Harmony validity."""
        import pyarrow.parquet as pq

        from vpmoe.demo.exercises import check_answer
        from vpmoe.eval.format import check_completion, render_prompts

        rows = pq.read_table(self.out / "raw" / "heldout.parquet").to_pylist()
        prompts = render_prompts([r["query"] for r in rows])
        results = {}
        names = ["teacher"] + [f"student_{k}_seed{s}" for s in self.settings.seeds for k in ("ce", "kd")]
        for name in names:
            run = json.loads((self.out / "steps" / f"{name}.json").read_text())
            completions = self.generate(self.out / "runs" / name, prompts)
            valid = correct = 0
            lengths = []
            for row, completion in zip(rows, completions):
                failure, texts = check_completion(completion)
                valid += failure is None
                correct += failure is None and check_answer(row, texts.get("final", ""))
                lengths.append(len(completion))
            results[name] = {
                "valid_loss": run.get("valid/loss"), "valid_loss_reasoning": run.get("valid/loss/reasoning"),
                "valid_loss_final": run.get("valid/loss/final"), "accuracy": correct / len(rows),
                "harmony_valid": valid / len(rows), "mean_completion_tokens": sum(lengths) / len(lengths),
                "n_heldout": len(rows), "sample": _decode(completions[0])}
            print(f"[demo] eval {name}: acc {results[name]['accuracy']:.3f} "
                  f"harmony {results[name]['harmony_valid']:.3f} held-out loss {results[name]['valid_loss']:.4f}")
        return {"models": results}

    def generate(self, run_dir: Path, prompts: list[list[int]], batch: int = 32) -> list[list[int]]:
        from vpmoe.data.vocab_subset import VocabSubset
        from vpmoe.model.generate import generate
        from vpmoe.train.checkpoint import load_model_for_eval, resolve_checkpoint

        model = load_model_for_eval(run_dir)
        subset = VocabSubset.find(resolve_checkpoint(run_dir))
        out = []
        for i in range(0, len(prompts), batch):
            out += generate(model, prompts[i:i + batch], self.settings.max_new_tokens, subset=subset)
        return out


def _decode(tokens: list[int]) -> str:
    from vpmoe import tokenizer as tk
    try:
        return tk.decode(tokens)
    except Exception:  # noqa: BLE001 - a sample for the report only
        return repr(tokens[:40])


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)
