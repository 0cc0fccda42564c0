"""Benchmark the kvcomm.kernels ops against their torch references; prints a table.

    python benchmarks/kernel_bench.py                 # CUDA: Triton vs torch at Llama-3.1-8B shapes
    python benchmarks/kernel_bench.py --quick         # small shapes (CPU: references only, < 1 min)
    python benchmarks/kernel_bench.py --json out.json

Shapes: Llama-3.1-8B KV (32 layers, 8 KV heads, head dim 128, bf16), 1K/4K tokens, 5/10/20
anchors, plus token/channel weights for 25 anchors x 4K tokens. Times are medians
(``triton.testing.do_bench`` on CUDA, a perf_counter loop on CPU), warm-up and compilation
excluded. GB/s counts the minimal bytes: every input the op needs read once, the output written
once (deltas of layers below ``skip_layers`` are not needed, so not counted). "% peak" is against
the bandwidth of a large device-to-device copy measured in the same run, and against the
datasheet HBM peak (H100 SXM 3.35 TB/s, H200 4.8 TB/s).

decode_attention: one layer's one-token attention at Llama-3.1-8B shape (32 query heads, 8 KV
heads, head dim 128) over a 1K/4K-slot static buffer, half or fully filled (the mask hides the
rest). Rows: the Triton kernel, "sdpa" (transformers' sdpa path for q_len 1: the 4 query heads of
each KV head packed as [1, 8, 4, 128] with the mask) and "torch" (the float32 reference). GB/s
counts the K/V bytes of the visible slots only: what an ideal kernel must read.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import kvcomm.kernels as K  # kvcomm/__init__ is lazy: this imports torch and triton, not the engine

DATASHEET_TBPS = {"H200": 4.8, "H100 PCIe": 2.0, "H100 NVL": 3.9, "H100": 3.35, "A100": 2.0}
LLAMA_8B = dict(layers=32, heads=8, head_dim=128)
LLAMA_8B_QUERY_HEADS = 32


# -- timing --------------------------------------------------------------------------------------
def time_ms(fn: Callable[[], Any], device: torch.device, rep_ms: float) -> float:
    """Median time of fn in ms (CUDA: triton.testing.do_bench; CPU: a perf_counter loop)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=max(5, int(rep_ms / 4)), rep=rep_ms, return_mode="median"))
    fn()  # warm-up
    times: list[float] = []
    budget = time.perf_counter() + rep_ms / 1000
    while len(times) < 3 or (time.perf_counter() < budget and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def measured_peak_gbps(device: torch.device, rep_ms: float) -> float:
    """Bandwidth of a large device-to-device copy (bytes read + bytes written)."""
    n = (1 << 30) if device.type == "cuda" else (1 << 27)  # 1 GiB on GPU, 128 MiB on CPU
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, rep_ms)
    return 2 * n / ms / 1e6


def datasheet_gbps(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return platform.processor() or platform.machine(), None
    name = torch.cuda.get_device_name(device)
    for key, tbps in DATASHEET_TBPS.items():  # most specific names first
        if key in name:
            return name, tbps * 1000
    return name, None


# -- cases ---------------------------------------------------------------------------------------
def cases(quick: bool, on_cuda: bool) -> list[tuple[str, dict[str, int]]]:
    shape = dict(LLAMA_8B) if not quick else dict(layers=4, heads=8, head_dim=128)
    tokens = [1024, 4096] if not quick else [512]
    anchor_counts = [5, 10, 20] if not quick else [5, 20]
    out: list[tuple[str, dict[str, int]]] = []
    for t in tokens:
        out.append(("rope_shift", dict(shape, tokens=t)))
    for t in tokens:
        for a in anchor_counts:
            out.append(("apply_correction[k]", dict(shape, tokens=t, anchors=a)))
    out.append(("apply_correction[v]", dict(shape, tokens=tokens[-1], anchors=anchor_counts[0])))
    out.append(("apply_correction[v]", dict(shape, tokens=tokens[-1], anchors=anchor_counts[-1])))
    for op in ("token_weights", "channel_weights"):
        for t in tokens:
            for a in anchor_counts:
                out.append((op, dict(shape, tokens=t, anchors=a)))
        if not quick:
            out.append((op, dict(shape, tokens=4096, anchors=25)))  # the 25 x 4K target
    for op in ("quantize_kv", "dequantize_kv"):
        for kind in ("k", "v"):
            for t in tokens:
                out.append((f"{op}[{kind}]", dict(shape, tokens=t)))
    for slots in [1024, 4096] if not quick else [1024]:  # one layer: cheap even on CPU
        for filled in (slots // 2, slots):
            out.append(("decode_attention", dict(q_heads=LLAMA_8B_QUERY_HEADS, heads=LLAMA_8B["heads"],
                                                 head_dim=LLAMA_8B["head_dim"], slots=slots, filled=filled)))
    return out


def sdpa_packed_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """transformers' sdpa_attention_forward for one query token with GQA and a mask (v5.24).

    The G query heads of each KV head become G query rows ([B, Hkv, G, D]) so SDPA runs without
    repeat_kv; written out here so the benchmark needs no transformers.
    """
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(q.reshape(B, Hkv, Hq // Hkv, D), k, v, attn_mask=mask)
    return out.reshape(B, Hq, 1, D).transpose(1, 2).contiguous()


def build_decode(p: dict[str, int], dtype: torch.dtype, device: torch.device) -> tuple[Callable[[str], Any], int]:
    """(run(backend), visible K/V bytes) for one decode_attention case; backend "sdpa" too."""
    Hq, H, D, S, filled = p["q_heads"], p["heads"], p["head_dim"], p["slots"], p["filled"]
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, h, n, D, generator=gen, device=device).to(dtype) for h, n in ((Hq, 1), (H, S), (H, S)))
    mask = torch.zeros(1, 1, 1, S, dtype=dtype, device=device)
    mask[..., filled:] = torch.finfo(dtype).min  # a partly filled static buffer

    def run(backend: str) -> torch.Tensor:
        if backend == "sdpa":
            return sdpa_packed_gqa(q, k, v, mask)
        return K.decode_attention(q, k, v, mask, backend=backend)

    return run, 2 * H * filled * D * k.element_size()


def build(op: str, p: dict[str, int], dtype: torch.dtype, device: torch.device) -> tuple[Callable[[str], Any], int]:
    """(run(backend), minimal bytes) for one case."""
    if op == "decode_attention":
        return build_decode(p, dtype, device)
    L, H, T, D = p["layers"], p["heads"], p["tokens"], p["head_dim"]
    A = p.get("anchors", 0)
    e = torch.tensor([], dtype=dtype).element_size()
    n = L * H * T * D
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D))
    if op == "rope_shift":
        k = randn(L, H, T, D)
        return (lambda b: K.rope_shift(k, 517, inv_freq, backend=b)), 2 * n * e + D // 2 * 4
    if op.startswith("apply_correction"):
        base, deltas = randn(L, H, T, D), randn(A, L, H, T, D)
        cache = torch.empty(L, H, T + 256, D, device=device, dtype=dtype)
        out = cache[:, :, 256:]  # written in place into a bigger cache, as the engine does
        if op.endswith("[k]"):  # keys: per-token weights, rotation
            w = torch.softmax(torch.randn(A, T, generator=gen, device=device), 0)
            kw: dict[str, Any] = dict(inv_freq=inv_freq, delta_pos=256)
            w_bytes = A * T * 4 + D // 2 * 4
        else:  # values: per-channel weights, no rotation
            w = torch.softmax(torch.randn(A, L, H, D, generator=gen, device=device), 0)
            kw = {}
            w_bytes = A * (L - 1) * H * D * 4
        needed = n * e + A * n * e * (L - 1) // L + n * e + w_bytes  # base, deltas of layers >= 1, out
        return (lambda b: K.apply_correction(base, deltas, w, **kw, skip_layers=1, out=out, backend=b)), needed
    if op in ("token_weights", "channel_weights"):
        base, anchors = randn(L, H, T, D), randn(A, L, H, T, D)
        fn = getattr(K, op)
        out_bytes = A * T * 4 if op == "token_weights" else A * L * H * D * 4
        return (lambda b: fn(base, anchors, 1.0, backend=b)), (1 + A) * n * e + out_bytes
    kind = op[-2]
    x = randn(L, H, T, D)
    scale_bytes = (L * H * D if kind == "k" else L * H * T) * 4
    if op.startswith("quantize_kv"):
        return (lambda b: K.quantize_kv(x, kind, backend=b)), n * e + n + scale_bytes
    q, scale = K.quantize_kv_reference(x, kind)
    return (lambda b: K.dequantize_kv(q, scale, dtype, backend=b)), n + scale_bytes + n * e


def _detach(x: Any) -> Any:
    return tuple(t.clone() for t in x) if isinstance(x, tuple) else x.clone()


def outputs_match(got: Any, want: Any, dtype: torch.dtype) -> bool:
    """Kernel vs reference: one output ulp of the dtype (bit-exact for int8 payloads)."""
    if isinstance(got, tuple):
        return all(outputs_match(g, w, dtype) for g, w in zip(got, want, strict=True))
    if not got.is_floating_point():
        if not torch.equal(got, want):
            diff = (got.int() - want.int()).abs()
            print(f"  int mismatch: {int((diff > 0).sum())} of {diff.numel()} elements, max |diff| {int(diff.max())}")
            return False
        return True
    rtol = {torch.bfloat16: 8e-3, torch.float16: 1e-3}.get(got.dtype, 1e-4)
    return bool(torch.allclose(got.float(), want.float(), rtol=rtol, atol=1e-3))


def fmt_shape(p: dict[str, int]) -> str:
    if "q_heads" in p:
        return f"Hq{p['q_heads']}/{p['heads']} S{p['slots']} D{p['head_dim']} visible{p['filled']}"
    s = f"L{p['layers']} H{p['heads']} T{p['tokens']} D{p['head_dim']}"
    return s + (f" A{p['anchors']}" if "anchors" in p else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (4 layers, 512 tokens): the CPU default run")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--rep-ms", type=float, default=None, help="timing budget per measurement (ms)")
    ap.add_argument("--ops", default="", help="comma-separated op name prefixes to run (default: all)")
    ap.add_argument("--backends", default="", help="e.g. triton,torch (default: both on CUDA, torch on CPU; "
                    "triton on CPU needs TRITON_INTERPRET=1 and is only a smoke test)")
    ap.add_argument("--json", metavar="PATH", help="also write the rows and the device info as JSON")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    rep_ms = args.rep_ms or (100.0 if device.type == "cuda" else 300.0)
    backends = args.backends.split(",") if args.backends else (["triton", "torch"] if device.type == "cuda" else ["torch"])
    if "torch" not in backends:
        backends.append("torch")  # the ratio column needs the reference
    dev_name, sheet = datasheet_gbps(device)
    peak = measured_peak_gbps(device, rep_ms)
    wanted = [o for o in args.ops.split(",") if o]

    rows: list[dict[str, Any]] = []
    header = f"{'op':<22} {'shape':<28} {'backend':<7} {'time ms':>9} {'GB/s':>8} {'x torch':>8} {'% meas':>7} {'% sheet':>8} {'check':>6}"
    print(f"device: {dev_name} | dtype {args.dtype} | measured copy peak {peak:.0f} GB/s | "
          f"datasheet {'%.0f GB/s' % sheet if sheet else 'n/a'}")
    print(header)
    print("-" * len(header))
    for op, p in cases(args.quick, device.type == "cuda"):
        if wanted and not any(op.startswith(w) for w in wanted):
            continue
        run, nbytes = build(op, p, dtype, device)
        op_backends = backends + (["sdpa"] if op == "decode_attention" else [])
        check = "-"
        others = [b for b in op_backends if b != "torch"]
        if others:  # every other output against the reference's, once per case
            got = {b: _detach(run(b)) for b in others}  # copied: apply_correction writes into one `out`
            want = run("torch")
            check = "ok" if all(outputs_match(got[b], want, dtype) for b in others) else "MISMATCH"
        times = {b: time_ms(functools.partial(run, b), device, rep_ms) for b in op_backends}
        for b in op_backends:
            gbps = nbytes / times[b] / 1e6
            row = dict(
                op=op, shape=fmt_shape(p), backend=b, time_ms=times[b], gb_per_s=gbps, bytes=nbytes,
                speedup_vs_torch=times["torch"] / times[b],
                pct_measured_peak=100 * gbps / peak, pct_datasheet_peak=100 * gbps / sheet if sheet else None,
                check=check,
            )
            rows.append(row)
            sheet_s = f"{row['pct_datasheet_peak']:.1f}" if sheet else "-"
            print(f"{op:<22} {row['shape']:<28} {b:<7} {times[b]:>9.3f} {gbps:>8.1f} "
                  f"{row['speedup_vs_torch']:>8.2f} {row['pct_measured_peak']:>7.1f} {sheet_s:>8} {check:>6}")
        run = None  # free this case's tensors before the next one
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        meta = dict(device=dev_name, dtype=args.dtype, measured_peak_gbps=peak, datasheet_peak_gbps=sheet,
                    torch=torch.__version__, python=platform.python_version(), quick=args.quick)
        try:
            import triton

            meta["triton"] = triton.__version__
        except ImportError:
            meta["triton"] = None
        Path(args.json).write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
