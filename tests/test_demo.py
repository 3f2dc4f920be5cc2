"""The embedded exercises and the end-to-end demo (quick sizes), including the skip-on-rerun rule."""
import json
import time

import pytest

from vpmoe.demo.exercises import FAMILIES, LANGS, check_answer, extract_answer, generate, make_row


def test_exercises_are_deterministic_checkable_and_varied():
    a, b = generate(300, seed=7), generate(300, seed=7)
    assert a == b
    assert make_row(123, seed=7) == a[123]  # each row depends only on (seed, index)
    assert generate(5, seed=8) != generate(5, seed=7)
    assert {r["language"] for r in a} == set(LANGS)
    assert len({r["exercise"].split("_")[0] for r in a}) == len(FAMILIES)
    for r in a:
        assert check_answer(r, r["synthetic_answer"])  # the reference answer passes its own verifier
        assert str(int(r["answer"])) == r["answer"]
        assert r["synthetic_reasoning"].strip() and r["query"].strip()
    # arithmetic is right (an independent evaluation of the query)
    for r in a:
        if r["exercise"].startswith("arithmetic"):
            expr = r["query"].split("?")[0].split("es ")[-1].split("font ")[-1].split("ist ")[-1]
            expr = expr.replace("What is", "").replace("×", "*").replace("¿Cuánto", "").strip()
            assert eval(expr) == int(r["answer"]), r["query"]  # noqa: S307 - digits and + - * only
    assert extract_answer("La respuesta es 1,250.") == "1250"
    assert not check_answer({"answer": "12"}, "The answer is 13.")
    assert not check_answer({"answer": "12"}, "no number here")


@pytest.mark.slow
def test_quick_demo_end_to_end_and_rerun_skips(tmp_path, capsys):
    from vpmoe.demo.pipeline import Demo, DemoSettings

    out = tmp_path / "demo"
    report = Demo(out, DemoSettings.quick(), progress=False).run()
    assert report.exists() and (out / "report" / "student_loss.png").stat().st_size > 1000
    summary = json.loads((out / "report" / "summary.json").read_text())
    v = summary["verdict"]
    assert v["n_seeds"] == 2
    gains = [p["ce_loss"] - p["kd_loss"] for p in v["pairs"]]
    assert v["loss_gain_se"] == pytest.approx(abs(gains[0] - gains[1]) / 2, rel=1e-9)  # sd/sqrt(2) for two
    assert set(summary["models"]) == {"teacher", "student_ce_seed0", "student_kd_seed0", "student_ce_seed1",
                                      "student_kd_seed1"}
    for m in summary["models"].values():
        assert 0 <= m["accuracy"] <= 1 and 0 <= m["harmony_valid"] <= 1 and m["valid_loss"] > 0
    text = report.read_text()
    assert "KD vs CE at equal tokens" in text and "seed 0" in text and "seed 1" in text
    # both students of a seed saw the same tokens from the same init: their step-0 held-out losses agree
    first = {}
    for kind in ("ce", "kd"):
        recs = [json.loads(line) for line in (out / "runs" / f"student_{kind}_seed0" / "metrics.jsonl").open()]
        first[kind] = next(r["valid/loss"] for r in recs if r["step"] == 0 and "valid/loss" in r)
    assert first["ce"] == first["kd"]
    capsys.readouterr()
    t0 = time.perf_counter()
    Demo(out, DemoSettings.quick(), progress=False).run()
    assert time.perf_counter() - t0 < 60
    assert capsys.readouterr().out.count("done before, skipped") == 8  # every step
    assert json.loads((out / "report" / "summary.json").read_text()) == summary
    with pytest.raises(Exception, match="other settings"):
        Demo(out, DemoSettings(), progress=False)
