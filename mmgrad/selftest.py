"""``python -m mmgrad.selftest``: launch the core fused ops (gram, combine and the five segment
ops) on every backend this install can use and compare them with the float64 reference.

It is what a user runs after ``pip install`` on a new machine (and what the wheel smoke test runs
in a fresh virtual environment): an import that works says little, a C++ or CUDA kernel that was
not built, or was built for another torch, shows up here as a backend that is unavailable or
wrong. Exit status 0 when every usable backend agrees with the reference, 1 otherwise; ``--require
cpp`` (or ``cuda``, ``triton``) also fails when that backend is unavailable.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

import torch

from mmgrad import ops

__all__ = ["run", "main"]

# Per dtype: (rtol, atol) of a backend against the float64 reference on these small inputs.
_TOLERANCE = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-10, 1e-12)}


def _cases(device: torch.device, dtype: torch.dtype) -> dict[str, Callable[[Optional[str]], torch.Tensor]]:
    """Each op on fresh random inputs: a function of the backend returning the op's result."""
    g = torch.Generator().manual_seed(0)
    K, sizes = 3, [5, 130, 0, 1027, 64]
    P = sum(sizes)
    J = torch.randn(K, P, generator=g, dtype=torch.float64).to(device, dtype)
    w = torch.randn(K, generator=g, dtype=torch.float64).to(device, dtype)
    offsets, numels = ops.table(sizes, device)
    S = len(sizes)
    seg_w = torch.randn(S, K, generator=g, dtype=torch.float64).to(device, dtype)
    scale = torch.rand(S, generator=g, dtype=torch.float64).to(device, dtype)
    lerp = torch.rand(S, generator=g, dtype=torch.float64).to(device, dtype)
    seed = torch.tensor(1234, dtype=torch.int64, device=device)

    def fresh_row():
        return J[0].clone()

    def seg_combine(b):
        out = torch.empty(P, device=device, dtype=dtype)
        ops.segment_combine_(out, J, offsets, numels, seg_w, backend=b)
        return out

    def seg_scale(b):
        x = fresh_row()
        ops.segment_scale_(x, offsets, numels, scale, noise_std=scale, seed=seed, backend=b)
        return x

    def seg_lerp(b):
        x = fresh_row()
        ops.segment_lerp_(x, J[1], offsets, numels, lerp, backend=b)
        return x

    return {
        "gram": lambda b: ops.gram(J, backend=b),
        "combine": lambda b: ops.combine(J, w, backend=b),
        "segment_moments": lambda b: ops.segment_moments(J[0], offsets, numels, backend=b),
        "segment_gram": lambda b: ops.segment_gram(J, offsets, numels, backend=b),
        "segment_combine_": seg_combine,
        "segment_scale_": seg_scale,
        "segment_lerp_": seg_lerp,
    }


def run(devices: Optional[list[str]] = None, dtypes=(torch.float32, torch.float64)) -> list[tuple[str, str, str, str, str]]:
    """Rows ``(device, backend, dtype, op, status)``: status ``ok (max err e)``, ``MISMATCH ...``,
    ``ERROR ...`` or ``unavailable: <why>`` (one row per backend then)."""
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for name in devices:
        device = torch.device(name)
        for backend, why in ops.available_backends(device).items():
            if backend == "reference":
                continue
            if why is not None:
                rows.append((name, backend, "-", "-", f"unavailable: {why}"))
                continue
            for dtype in dtypes:
                for op, fn in _cases(device, dtype).items():
                    # The Gaussian noise is evaluated in float32 for every buffer dtype (reference.philox_normal).
                    rtol, atol = _TOLERANCE[torch.float32 if op == "segment_scale_" else dtype]
                    try:
                        got = fn(backend).double().cpu()
                    except Exception as exc:  # a broken kernel must show up as a row, not stop the test
                        rows.append((name, backend, str(dtype)[6:], op, f"ERROR {type(exc).__name__}: {exc}"))
                        continue
                    with torch.no_grad():
                        want = fn("reference").double().cpu()
                    err = (got - want).abs().max().item() if got.numel() else 0.0
                    ok = got.shape == want.shape and torch.allclose(got, want, rtol=rtol, atol=atol)
                    status = f"ok (max err {err:.1e})" if ok else f"MISMATCH (max err {err:.1e}, shape {tuple(got.shape)})"
                    rows.append((name, backend, str(dtype)[6:], op, status))
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmgrad.selftest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--require", action="append", default=[], choices=[b for b in ops.BACKENDS if b != "reference"],
                        help="fail when this backend is unavailable (repeatable)")
    args = parser.parse_args(argv)
    rows = run()
    failed = False
    for row in rows:
        print("  ".join(f"{c:<16}" if i < 4 else c for i, c in enumerate(row)))
        if row[4].startswith(("MISMATCH", "ERROR")):
            failed = True
        if row[4].startswith("unavailable") and row[1] in args.require:
            failed = True
    print("selftest:", "FAILED" if failed else "passed", f"({sum(r[4].startswith('ok') for r in rows)} op checks ok)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
