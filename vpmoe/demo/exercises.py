"""The project's own embedded data: seeded reasoning exercises in the SYNTH schema, checkable exactly.

Design choices:
- Each exercise family (arithmetic, unit conversion, linear equations, number sequences, comparison
  logic) is a small function of a `random.Random` that returns the query, a step-by-step reasoning,
  a final answer sentence and the canonical answer string. Everything is derived from the seed, so
  `generate(n, seed)` is the same list on every machine and Python version (random.Random's integer
  methods are stable).
- Four languages (en, fr, de, es) share the math and differ in the templates, so the data exercises
  the multilingual side of SYNTH without a translation model.
- Rows carry SYNTH's columns (`synth_id`, `language`, `exercise`, `query`, `synthetic_reasoning`,
  `synthetic_answer`) plus `answer`, the canonical string a verifier compares against: the same rows
  serve supervised training, held-out accuracy, and later RL with a verifiable reward
  (`check_answer`).
- Answers are integers, so checking is exact: the last integer in the model's final message must
  equal the canonical answer.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

LANGS = ("en", "fr", "de", "es")

T = {  # per-language phrases; {…} fields are filled by the families below
    "add": {"en": "What is {a} + {b}?", "fr": "Combien font {a} + {b} ?", "de": "Was ist {a} + {b}?",
            "es": "¿Cuánto es {a} + {b}?"},
    "sub": {"en": "What is {a} - {b}?", "fr": "Combien font {a} - {b} ?", "de": "Was ist {a} - {b}?",
            "es": "¿Cuánto es {a} - {b}?"},
    "mul": {"en": "What is {a} × {b}?", "fr": "Combien font {a} × {b} ?", "de": "Was ist {a} × {b}?",
            "es": "¿Cuánto es {a} × {b}?"},
    "conv": {"en": "How many {small} are in {n} {big}?", "fr": "Combien de {small} y a-t-il dans {n} {big} ?",
             "de": "Wie viele {small} sind {n} {big}?", "es": "¿Cuántos {small} hay en {n} {big}?"},
    "eq": {"en": "Solve for x: {a}x + {b} = {c}.", "fr": "Résoudre pour x : {a}x + {b} = {c}.",
           "de": "Löse nach x auf: {a}x + {b} = {c}.", "es": "Resuelve para x: {a}x + {b} = {c}."},
    "seq": {"en": "What number comes next: {seq}, ?", "fr": "Quel nombre vient ensuite : {seq}, ?",
            "de": "Welche Zahl kommt als Nächstes: {seq}, ?", "es": "¿Qué número sigue: {seq}, ?"},
    "max": {"en": "Which is the largest: {items}?", "fr": "Quel est le plus grand : {items} ?",
            "de": "Welche ist die größte: {items}?", "es": "¿Cuál es el mayor: {items}?"},
    "answer": {"en": "The answer is {x}.", "fr": "La réponse est {x}.", "de": "Die Antwort ist {x}.",
               "es": "La respuesta es {x}."},
    "step": {"en": "Step {i}: {s}", "fr": "Étape {i} : {s}", "de": "Schritt {i}: {s}", "es": "Paso {i}: {s}"},
    "check": {"en": "Check: {s}", "fr": "Vérification : {s}", "de": "Probe: {s}", "es": "Comprobación: {s}"},
}

UNITS = {  # (big, small, factor) per language
    "en": [("kilometers", "meters", 1000), ("hours", "minutes", 60), ("kilograms", "grams", 1000),
           ("minutes", "seconds", 60), ("days", "hours", 24), ("meters", "centimeters", 100)],
    "fr": [("kilomètres", "mètres", 1000), ("heures", "minutes", 60), ("kilogrammes", "grammes", 1000),
           ("minutes", "secondes", 60), ("jours", "heures", 24), ("mètres", "centimètres", 100)],
    "de": [("Kilometern", "Meter", 1000), ("Stunden", "Minuten", 60), ("Kilogramm", "Gramm", 1000),
           ("Minuten", "Sekunden", 60), ("Tagen", "Stunden", 24), ("Metern", "Zentimeter", 100)],
    "es": [("kilómetros", "metros", 1000), ("horas", "minutos", 60), ("kilogramos", "gramos", 1000),
           ("minutos", "segundos", 60), ("días", "horas", 24), ("metros", "centímetros", 100)],
}


@dataclass
class Exercise:
    exercise: str
    query: str
    steps: list[str]
    answer: int


def _arith(rng: random.Random, lang: str, level: int) -> Exercise:
    op = rng.choice(["add", "sub", "mul"])
    hi = 10 ** level
    a, b = rng.randint(1, hi - 1), rng.randint(1, hi - 1)
    if op == "mul":
        b = rng.randint(2, 9)
    if op == "sub" and b > a:
        a, b = b, a
    value = {"add": a + b, "sub": a - b, "mul": a * b}[op]
    sym = {"add": "+", "sub": "-", "mul": "×"}[op]
    steps = [f"{a} {sym} {b}", f"{a} {sym} {b} = {value}"]
    if op == "add":
        steps.insert(1, f"{a} + {b - b % 10} = {a + b - b % 10}; {a + b - b % 10} + {b % 10} = {value}")
    elif op == "sub":
        steps.insert(1, f"{a} - {b - b % 10} = {a - b + b % 10}; {a - b + b % 10} - {b % 10} = {value}")
    else:
        steps.insert(1, " + ".join([str(a)] * b) + f" = {value}")
    steps.append(T["check"][lang].format(s={"add": f"{value} - {b} = {a}", "sub": f"{value} + {b} = {a}",
                                            "mul": f"{value} / {b} = {a}"}[op]))
    return Exercise(f"arithmetic_{op}", T[op][lang].format(a=a, b=b), steps, value)


def _conversion(rng: random.Random, lang: str, level: int) -> Exercise:
    big, small, factor = rng.choice(UNITS[lang])
    n = rng.randint(2, 3 + 6 * level)
    value = n * factor
    steps = [f"1 {big[:-1] if lang == 'en' else big} = {factor} {small}", f"{n} × {factor} = {value}"]
    return Exercise("unit_conversion", T["conv"][lang].format(small=small, n=n, big=big), steps, value)


def _equation(rng: random.Random, lang: str, level: int) -> Exercise:
    a, x, b = rng.randint(2, 9), rng.randint(1, 5 + 5 * level), rng.randint(1, 20)
    c = a * x + b
    steps = [f"{a}x = {c} - {b} = {c - b}", f"x = {c - b} / {a} = {x}",
             T["check"][lang].format(s=f"{a} × {x} + {b} = {c}")]
    return Exercise("linear_equation", T["eq"][lang].format(a=a, b=b, c=c), steps, x)


def _sequence(rng: random.Random, lang: str, level: int) -> Exercise:
    start, step = rng.randint(1, 20), rng.randint(2, 3 + 3 * level)
    seq = [start + i * step for i in range(4)]
    value = seq[-1] + step
    steps = [f"{seq[1]} - {seq[0]} = {step}", f"{seq[3]} - {seq[2]} = {step}", f"{seq[3]} + {step} = {value}"]
    return Exercise("number_sequence", T["seq"][lang].format(seq=", ".join(map(str, seq))), steps, value)


def _largest(rng: random.Random, lang: str, level: int) -> Exercise:
    items = rng.sample(range(1, 10 ** (level + 1)), 4)
    value = max(items)
    steps = [f"{max(items[0], items[1])} > {min(items[0], items[1])}",
             f"{max(items[2], items[3])} > {min(items[2], items[3])}",
             f"max({max(items[0], items[1])}, {max(items[2], items[3])}) = {value}"]
    return Exercise("comparison", T["max"][lang].format(items=", ".join(map(str, items))), steps, value)


FAMILIES = (_arith, _conversion, _equation, _sequence, _largest)


def make_row(index: int, seed: int, level: int = 1) -> dict:
    """Row `index` of the dataset with this seed: deterministic and independent of other rows."""
    rng = random.Random(f"vpmoe-exercises:{seed}:{index}")
    lang = LANGS[rng.randrange(len(LANGS))]
    ex = FAMILIES[rng.randrange(len(FAMILIES))](rng, lang, level)
    reasoning = "\n".join(T["step"][lang].format(i=i + 1, s=s) for i, s in enumerate(ex.steps))
    return {
        "synth_id": f"vpmoe-{seed}-{index:07d}",
        "language": lang,
        "exercise": ex.exercise,
        "query": ex.query,
        "synthetic_reasoning": reasoning,
        "synthetic_answer": T["answer"][lang].format(x=ex.answer),
        "answer": str(ex.answer),
    }


def generate(n: int, seed: int = 0, level: int = 1, start: int = 0) -> list[dict]:
    return [make_row(i, seed, level) for i in range(start, start + n)]


_INT = re.compile(r"-?\d+")


def extract_answer(text: str) -> str | None:
    """The last integer in a final message (how a verifier reads an answer), or None."""
    found = _INT.findall(text.replace("\u202f", "").replace(",", ""))
    return found[-1] if found else None


def check_answer(row: dict, final_text: str) -> bool:
    """Exact check: the final message's last integer equals the row's canonical answer."""
    return extract_answer(final_text) == row["answer"]


def write_parquet(rows: list[dict], path) -> None:
    """Write rows as a SYNTH-schema Parquet file, atomically (temp name, then rename)."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = f"{path}.tmp"
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    os.replace(tmp, path)
