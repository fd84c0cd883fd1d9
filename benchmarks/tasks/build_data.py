"""
Build the JSONL files that the ``mini_moe_*`` lm-eval tasks read, from the
fixture's held-out split, deterministically (fixed seeds, sorted inputs).

    .venv/bin/python benchmarks/tasks/build_data.py

Files written to ``benchmarks/tasks/data/``:

- ``ppl_{domain}.jsonl``: ``{"text"}``, the first ``PPL_DOCS`` held-out documents;
- ``mc_{domain}.jsonl``: ``{"context", "choices", "gold"}``, 4 candidates;
- ``gen_{math,code}.jsonl``: ``{"prompt", "target"}`` for greedy exact match.

How the MC distractors are made, per domain:

- general: the true next line of a passage against three other lines of the same
  passage (same speaker, vocabulary and metre, so topic alone does not decide);
- code: the true next line of a file against three other lines of the same file;
- math: the true worked solution against three with one arithmetic slip (a wrong
  intermediate result carried through, a wrong final product, or two digits of
  the final answer swapped), so only correct arithmetic scores highest.

GEN items: math gives the worked solution up to ``The answer is`` and scores the
number the model writes; code gives a file's preceding lines plus the next line
without its last word (one that already occurs in those lines), and scores that
word.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).parent
HELDOUT = HERE.parent / "fixture" / "data"
DATA = HERE / "data"
DOMAINS = ("general", "code", "math")
PPL_DOCS = 32
MC_ITEMS = 100
GEN_ITEMS = 100
CONTEXT_LINES = 12
MATH = re.compile(
    r"Question: what is \((-?\d+) ([-+*]) (-?\d+)\) \* (\d+)\?\n"
    r"Answer: .* = (-?\d+)\. .* = (-?\d+)\. The answer is (-?\d+)\."
)


def read_heldout(domain: str) -> list[str]:
    lines = (HELDOUT / f"{domain}_heldout.jsonl").read_text().splitlines()
    return [json.loads(line)["text"] for line in lines if line.strip()]


def write_jsonl(name: str, records: list[dict]) -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    (DATA / name).write_text(text)


def shuffled(true: str, wrong: list[str], rng: random.Random) -> tuple[list, int]:
    """Candidates in random order (no position bias) and the true one's index."""
    choices = [true, *wrong]
    order = list(range(len(choices)))
    rng.shuffle(order)
    return [choices[i] for i in order], order.index(0)


def line_mc(texts: list[str], rng: random.Random) -> list[dict]:
    """Next line of a document among three other lines of the same document."""
    docs = [[line for line in t.splitlines() if line.strip()] for t in texts]
    docs = [d for d in docs if len(d) >= CONTEXT_LINES]
    items = []
    while len(items) < MC_ITEMS:
        lines = rng.choice(docs)
        at = rng.randrange(4, len(lines))
        true = lines[at]
        shown = lines[max(0, at - CONTEXT_LINES) : at]
        # distractors never repeat the true line or a line shown in the context
        seen = {x.strip() for x in [*shown, true]}
        pool = sorted({x for x in lines if x.strip() not in seen})
        if len(pool) < 3:
            continue
        context = "\n".join(shown) + "\n"
        choices, gold = shuffled(true, rng.sample(pool, 3), rng)
        items.append({"context": context, "choices": choices, "gold": gold})
    return items


def solution(a: int, op: str, b: int, k: int, first: int, final: int) -> str:
    return f" {a} {op} {b} = {first}. {first} * {k} = {final}. The answer is {final}."


def slips(a, op, b, k, first, final, rng: random.Random) -> list[str]:
    """Three distinct wrong solutions, each with one arithmetic slip."""
    wrong: set[str] = set()
    deltas = [d for d in range(-9, 10) if d]
    while len(wrong) < 3:
        kind = rng.randrange(3)
        if kind == 0:  # wrong first step, carried through correctly
            bad = first + rng.choice(deltas)
            text = solution(a, op, b, k, bad, bad * k)
        elif kind == 1:  # right first step, wrong product
            text = solution(a, op, b, k, first, final + rng.choice(deltas))
        else:  # two adjacent digits of the answer swapped
            digits = list(str(abs(final)))
            if len(digits) < 2:
                continue
            i = rng.randrange(len(digits) - 1)
            if digits[i] == digits[i + 1]:
                continue
            digits[i], digits[i + 1] = digits[i + 1], digits[i]
            swapped = int("".join(digits)) * (1 if final >= 0 else -1)
            text = solution(a, op, b, k, first, swapped)
        wrong.add(text)
    return sorted(wrong)


def math_items(texts: list[str]) -> list[tuple]:
    parsed = []
    for text in texts:
        match = MATH.fullmatch(text)
        if match is None:
            raise ValueError(f"unexpected arithmetic document: {text!r}")
        a, op, b, k, first, final, answer = match.groups()
        assert final == answer, text
        parsed.append((int(a), op, int(b), int(k), int(first), int(final)))
    return parsed


def math_mc(texts: list[str], rng: random.Random) -> list[dict]:
    items = []
    for a, op, b, k, first, final in rng.sample(math_items(texts), MC_ITEMS):
        true = solution(a, op, b, k, first, final)
        wrong = slips(a, op, b, k, first, final, rng)
        choices, gold = shuffled(true, wrong, rng)
        context = f"Question: what is ({a} {op} {b}) * {k}?\nAnswer:"
        items.append({"context": context, "choices": choices, "gold": gold})
    return items


def math_gen(texts: list[str], rng: random.Random) -> list[dict]:
    """
    The worked solution up to ``The answer is``; the model writes the number.
    The fixture cannot multiply (0 of 50 when asked for the whole solution), and
    asked for the final sentence a 25%-pruned model already fails every item on
    the words "answer is" alone, so this item measures whether a compressed model
    carries the computed number over, which degrades gradually with pruning.
    """
    items = []
    for a, op, b, k, first, final in rng.sample(math_items(texts), GEN_ITEMS):
        steps = solution(a, op, b, k, first, final).rsplit(f" {final}.", 1)[0]
        prompt = f"Question: what is ({a} {op} {b}) * {k}?\nAnswer:{steps}"
        items.append({"prompt": prompt, "target": str(final)})
    return items


def code_gen(texts: list[str], rng: random.Random) -> list[dict]:
    """
    Preceding lines plus the next line without its last word, which is scored.
    Only lines whose last word already occurs in the shown lines are used: the
    fixture completes 4 of 50 unconstrained items, too few to rank methods.
    """
    docs = [t.splitlines() for t in texts]
    docs = [d for d in docs if len(d) > CONTEXT_LINES]
    items = []
    while len(items) < GEN_ITEMS:
        lines = rng.choice(docs)
        at = rng.randrange(4, len(lines))
        line = lines[at].rstrip()
        body = line.lstrip()
        if " " not in body or body.startswith("#"):
            continue
        cut = line.rindex(" ")
        context = "\n".join(lines[max(0, at - CONTEXT_LINES) : at]) + "\n"
        # an identifier-like word already in view, as in real code completion
        if line[cut:].strip() not in context:
            continue
        items.append({"prompt": context + line[:cut], "target": line[cut:]})
    return items


def main() -> None:
    heldout = {d: read_heldout(d) for d in DOMAINS}
    for domain, texts in heldout.items():
        write_jsonl(f"ppl_{domain}.jsonl", [{"text": t} for t in texts[:PPL_DOCS]])
    mc = {
        "general": line_mc(heldout["general"], random.Random(1)),
        "code": line_mc(heldout["code"], random.Random(2)),
        "math": math_mc(heldout["math"], random.Random(3)),
    }
    for domain, items in mc.items():
        write_jsonl(f"mc_{domain}.jsonl", items)
    write_jsonl("gen_math.jsonl", math_gen(heldout["math"], random.Random(4)))
    write_jsonl("gen_code.jsonl", code_gen(heldout["code"], random.Random(5)))
    print(f"wrote {sorted(p.name for p in DATA.glob('*.jsonl'))}")


if __name__ == "__main__":
    main()
