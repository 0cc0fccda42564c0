"""kvcomm.tools: the tooling around the method, kept out of the core.

The ``kvcomm`` console script (:mod:`kvcomm.tools.cli`, with its ``store``, ``eval`` and ``bench``
commands in :mod:`~kvcomm.tools.cli_store`, :mod:`~kvcomm.tools.cli_eval` and
:mod:`~kvcomm.tools.cli_bench`, and what they share in :mod:`~kvcomm.tools.cli_common`), the
built-in demo pipeline (:mod:`~kvcomm.tools.demo`), the fidelity harness behind ``kvcomm eval``
(:mod:`~kvcomm.tools.evaluation`, with its workloads in :mod:`~kvcomm.tools.eval_workload`, its text in
:mod:`~kvcomm.tools.eval_render`, its paired figures in :mod:`~kvcomm.tools.eval_stats`, its plot in
:mod:`~kvcomm.tools.eval_plot` and the RAG workload in :mod:`~kvcomm.tools.rag` and
:mod:`~kvcomm.tools.rag_eval`), the reuse report behind ``kvcomm report``
(:mod:`~kvcomm.tools.report`) and the TTFT benchmark behind ``kvcomm bench`` and
``benchmarks/ttft.py`` (:mod:`~kvcomm.tools.bench`). These modules import the engine, the store
and the model loader; nothing in ``kvcomm/*.py``, ``kvcomm.store``, ``kvcomm.kernels`` or
``kvcomm.agents`` imports them.
"""
