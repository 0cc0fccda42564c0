"""Retrieval-augmented answers about the Python standard library: expert → critic → final.

The corpus is the docstrings of standard-library functions and classes (read with
:mod:`inspect`, so it ships with every Python), cut into passages of exactly ``--chunk-tokens``
tokens of the model's tokenizer, as RAG systems chunk their documents. BM25 picks two passages
per question, which fill the slots ``doc:1`` and ``doc:2``. A question counts as answered when
the final answer names the function the question is about::

    python examples/rag_pipeline.py --n 10 --policy dense,kvcomm

The pipeline itself (corpus, BM25, the three agents, the graph) lives in
:mod:`kvcomm.tools.rag`, which ``kvcomm eval --workload rag`` runs too; this script runs it once
per policy and writes the run directory.

Why fixed-size chunks: kvcomm can stand a new passage in for anchors at least as long as it
(the deviation of position t is only known where the anchor has a token t). Passages of one
length make every earlier passage a candidate anchor; passages of random lengths would keep
turning the longest one seen so far into a new anchor, and that call into a full prefill.
"""

from __future__ import annotations

from typing import Any

from _common import load, parser, run

from kvcomm.tools.rag import (  # noqa: F401  (re-exported: the example's names, as before)
    BM25,
    CRITIC,
    EXPERT,
    FINAL,
    MODULES,
    QUESTIONS,
    State,
    build_graph,
    chunk,
    corpus,
    critic,
    documents,
    expert,
    final,
    is_hit,
)

DEFAULT_N = 20  # the first 20 questions (kvcomm eval --workload rag uses more of them)


def main(argv: list[str] | None = None, loaded: Any = None) -> dict[str, Any]:
    p = parser("rag_pipeline", "RAG over standard-library docstrings: expert → critic → final",
               n=DEFAULT_N, max_new_tokens=48)
    p.add_argument("--chunk-tokens", type=int, default=48, help="tokens per passage (default %(default)s)")
    args = p.parse_args(argv)
    if args.chunk_tokens < 8:
        raise SystemExit(f"error: --chunk-tokens {args.chunk_tokens}: passages need at least 8 tokens")
    loaded = loaded or load(args)
    graph = build_graph(BM25(corpus(loaded.tokenizer, args.chunk_tokens)))
    items = QUESTIONS[: args.n]
    return run(args, "rag_pipeline", graph, items, lambda q: {"question": q[0]},
               lambda q, s: is_hit(q[1], s["final_answer"]), "hit", loaded)


if __name__ == "__main__":
    main()
