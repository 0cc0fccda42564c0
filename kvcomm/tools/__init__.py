"""kvcomm.tools: the tooling around the method, kept out of the core.

The ``kvcomm`` console script (:mod:`kvcomm.tools.cli`), the built-in demo pipeline
(:mod:`~kvcomm.tools.demo`), the fidelity harness behind ``kvcomm eval``
(:mod:`~kvcomm.tools.evaluation`, with its paired figures in :mod:`~kvcomm.tools.eval_stats`, its plot in
:mod:`~kvcomm.tools.eval_plot` and the RAG workload in :mod:`~kvcomm.tools.rag` and
:mod:`~kvcomm.tools.rag_eval`), the reuse report behind ``kvcomm report``
(:mod:`~kvcomm.tools.report`) and the TTFT benchmark behind ``kvcomm bench`` and
``benchmarks/ttft.py`` (:mod:`~kvcomm.tools.bench`). These modules import the engine, the store
and the model loader; nothing in ``kvcomm/*.py``, ``kvcomm.store``, ``kvcomm.kernels`` or
``kvcomm.agents`` imports them.
"""
