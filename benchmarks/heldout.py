"""
Held-out perplexity per domain on the trained fixture: the headline quality
metric of the benchmarks (it separates methods where the fixture's small
multiple-choice proxies sit near chance).

The rows are the fixture's held-out documents (``fixture/data/*_heldout.jsonl``,
never seen in training or calibration), packed into ``ROWS`` rows of ``SEQ_LEN``
tokens per domain: the same token ids for every model.
"""

from __future__ import annotations

from pathlib import Path

from ream_modifiers.evaluation import perplexity, read_jsonl_texts

FIXTURE = Path(__file__).parent / "fixture"
DOMAINS = ("general", "code", "math")
ROWS = 128
SEQ_LEN = 128


def heldout_texts() -> dict[str, list[str]]:
    """``{domain: texts}`` of the fixture's held-out split."""
    return {
        d: read_jsonl_texts(FIXTURE / "data" / f"{d}_heldout.jsonl") for d in DOMAINS
    }


def heldout_perplexity(model, tokenizer, texts=None) -> dict[str, float]:
    """``{"<domain>_heldout_ppl": value}`` for the three domains."""
    texts = texts or heldout_texts()
    return {
        f"{d}_heldout_ppl": round(
            perplexity(model, tokenizer, texts[d], SEQ_LEN, ROWS), 4
        )
        for d in DOMAINS
    }


def ppl_recovery(row: dict, original: dict) -> dict[str, float]:
    """
    Per domain, original perplexity / row perplexity (1 = unchanged, lower is
    worse), and their mean under ``"mean"``.
    """
    out = {
        d: round(original[f"{d}_heldout_ppl"] / row[f"{d}_heldout_ppl"], 4)
        for d in DOMAINS
    }
    out["mean"] = round(sum(out[d] for d in DOMAINS) / len(DOMAINS), 4)
    return out
