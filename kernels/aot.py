"""Ahead-of-time compile of every Triton variant the dispatcher can pick, for sm_90a and sm_80, without a GPU.

    python -m fastclip_kernels.aot [--d 512] [--markdown]

Triton compiles for a named ``GPUTarget``; the wheel's ``ptxas -v`` reports registers, spills and
shared memory. Each variant's result is cached as JSON under ``$FASTCLIP_AOT_CACHE`` (default
``~/.cache/fastclip_kernels/aot``), keyed by the Triton version, the kernel's source (the jit functions it
calls included) and the variant's full specialisation (signature, constexprs, block sizes, warps, stages,
target), so an unchanged kernel costs no compile. Must run with ``TRITON_INTERPRET`` unset (interpreted
kernels do not compile); the test runs it in a subprocess.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import schedule, triton_block

TARGETS = {90: "sm_90a", 80: "sm_80"}
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
RESULT_FORMAT = 1  # bump when compile_variant records something new


class Variant(NamedTuple):
    kernel: str  # "_stats_kernel" or "_pass_kernel"
    sides: str  # stats: "row" / "row+col"; pass: "own" / "other" / "both"
    arch: int
    dtype: torch.dtype
    d: int

    @property
    def name(self) -> str:
        return f"{self.kernel}[{self.sides}] sm_{self.arch} {triton_block.dtype_name(self.dtype)} d={self.d}"


def variants(d: int = 512) -> list[Variant]:
    """Every (kernel, constexpr sides, target, dtype) the dispatcher can launch at feature dim ``d``."""
    sides = [("_stats_kernel", s) for s in ("row", "row+col")] + [("_pass_kernel", s) for s in ("own", "other", "both")]
    return [Variant(k, s, a, dt, d) for a in TARGETS for dt in DTYPES for k, s in sides]


def _specialisation(v: Variant) -> tuple[object, dict, dict, dict, dict]:
    """The jit function, signature, constexprs, attributes and options of ``v``, as the JIT specialises a launch
    at B = 32768 (pointers 16-byte aligned, ``M``, ``N``, ``D`` multiples of 16)."""
    kind = "fwd" if v.kernel == "_stats_kernel" else "bwd"
    cfg = schedule.config(kind, triton_block.dtype_name(v.dtype), v.arch, v.d)
    fl = triton_block.flags(v.dtype, interpret=False)
    consts = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "HOLD": cfg.hold, **fl}
    fn = getattr(triton_block, v.kernel)
    if kind == "fwd":
        del consts["G_ROUND"]
        consts["HAS_COL"] = v.sides == "row+col"
    else:
        consts.update(HAS_A=v.sides in ("own", "both"), HAS_B=v.sides in ("other", "both"), BLOCK_D=cfg.block_d)
    operand = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}[v.dtype]
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        if name in ("x_ptr", "y_ptr", "a_ptr", "b_ptr", "out_ptr"):
            sig[name] = operand
        else:
            sig[name] = "*fp32" if name.endswith("_ptr") else "i32"
        if name.endswith("_ptr") or name in (
            "M",
            "N",
            "D",
        ):  # the JIT's specialisation: 16-aligned tensors, B, d % 16 == 0
            attrs[(i,)] = [["tt.divisibility", 16]]
    return fn, sig, consts, attrs, {"num_warps": cfg.warps, "num_stages": cfg.stages}


def _key(v: Variant) -> str:
    """Everything the compiled code depends on: Triton, the jit function's source and those it calls (Triton's
    ``cache_key``), the specialisation, the target."""
    fn, sig, consts, attrs, opts = _specialisation(v)
    h = hashlib.sha256(f"{triton.__version__} {RESULT_FORMAT} {fn.cache_key} {v.arch}".encode())
    h.update(repr((sig, sorted(consts.items()), sorted(attrs.items()), sorted(opts.items()))).encode())
    return h.hexdigest()[:32]


def _ptxas(ptx: str, arch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run(
            [str(PTXAS), "-v", f"--gpu-name={TARGETS[arch]}", str(src), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return {"registers": int(regs.group(1)), "spill_bytes": int(spills.group(1)) + int(spills.group(2))}


def compile_variant(v: Variant) -> dict:
    """Compile ``v``: registers, spill bytes, shared memory, the MMA instructions used, async copies."""
    fn, sig, consts, attrs, opts = _specialisation(v)
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", v.arch, 32), options=opts)
    ptx = kernel.asm["ptx"]
    mma = sorted(set(re.findall(r"\b(wgmma\.mma_async\S*|mma\.sync\S*)", ptx)))
    return {
        "name": v.name,
        **_ptxas(ptx, v.arch),
        "shared_bytes": kernel.metadata.shared,
        "mma": [m.rstrip(";") for m in mma],
        "async_copies": bool(re.search(r"\bcp\.async\b|cp\.async\.bulk", ptx)),
        "num_warps": opts["num_warps"],
        "num_stages": opts["num_stages"],
    }


def cache_dir() -> Path:
    return Path(os.environ.get("FASTCLIP_AOT_CACHE", Path.home() / ".cache" / "fastclip_kernels" / "aot"))


def result(v: Variant) -> dict:
    """``compile_variant(v)``, from the cache when the sources and Triton are unchanged."""
    path = cache_dir() / f"{_key(v)}.json"
    if path.exists():
        return json.loads(path.read_text())
    res = compile_variant(v)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res))
    return res


def markdown(rows: list[tuple[Variant, dict]]) -> str:
    lines = [
        "| kernel | sides | target | dtype | warps/stages | registers | spill bytes | shared KB | MMA | async loads |",
        "|---|---|---|---|---|---:|---:|---:|---|---|",
    ]
    for v, r in rows:
        mma = ", ".join(m.split(".sync.aligned.")[-1] if "aligned" in m else m for m in r["mma"]) or "none (FMA)"
        lines.append(
            f"| {v.kernel} | {v.sides} | {TARGETS[v.arch]} | {triton_block.dtype_name(v.dtype)} | "
            f"{r['num_warps']}/{r['num_stages']} | {r['registers']} | {r['spill_bytes']} | "
            f"{r['shared_bytes'] / 1024:.0f} | {mma} | {'yes' if r['async_copies'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("fastclip_kernels.aot: unset TRITON_INTERPRET (interpreted kernels do not compile)")
    p = argparse.ArgumentParser(prog="fastclip_kernels.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--markdown", action="store_true", help="print a markdown table instead of JSON lines")
    args = p.parse_args(argv)
    rows = [(v, result(v)) for v in variants(args.d)]
    print(markdown(rows) if args.markdown else "\n".join(json.dumps(r) for _, r in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
