"""What the CPU is, for the choices and the reports that depend on it.

MKL, the BLAS behind torch's float32 matmuls on x86, runs its AVX-512 code on Intel CPUs only
and AVX2 code on others (AMD's). So the faster float32 matmul for the recompute's attention
(:data:`kvcomm.fastpath.attention.ONEDNN_FOLDED`) and every ratio against a dense prefill depend
on the vendor: the benches name the CPU in their headers (:func:`cpu_description`).
"""

from __future__ import annotations

import torch


def cpuinfo(field: str) -> str:
    """The first CPU's ``field`` in ``/proc/cpuinfo`` (``vendor_id``, ``model name``...); ``""``
    where there is none (not Linux, or no such field)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                name, sep, value = line.partition(":")
                if sep and name.strip() == field:
                    return value.strip()
                if not line.strip():  # the first CPU's block ends
                    break
    except OSError:
        pass
    return ""


def cpu_vendor() -> str:
    """The CPU's vendor id (``GenuineIntel``, ``AuthenticAMD``...); ``""`` where unknown."""
    return cpuinfo("vendor_id")


def onednn_beats_mkl(vendor: str, mkl: bool) -> bool:
    """Whether oneDNN's float32 matmuls are the faster choice over torch's (MKL's, where torch has
    it): MKL picks its AVX-512 code on Intel CPUs only, and runs AVX2 code on others' (AMD's)."""
    return not (mkl and vendor == "GenuineIntel")


def cpu_description() -> str:
    """The CPU a run used, for its header: ``CPU (2 threads; <model>, AVX512)``. Ratios against
    dense depend on it (MKL runs AVX-512 code on Intel CPUs only), so a table names it."""
    parts = [cpuinfo("model name"), torch.backends.cpu.get_cpu_capability()]
    return f"CPU ({torch.get_num_threads()} threads; {', '.join(p for p in parts if p)})"


__all__ = ["cpu_description", "cpu_vendor", "cpuinfo", "onednn_beats_mkl"]
