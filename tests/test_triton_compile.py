"""The Triton solver and GradDrop kernels (and the Philox, feature-drop and segment kernels)
compile for the GPUs they are meant for (sm_80, sm_90), here, without a GPU: ``triton.compile``
lowers them to PTX and runs ptxas. The interpreter that runs them in the rest of the suite does
not compile, so it misses what only the compiler rejects (a loop-carried value changing type, an
unsupported op or dtype, a constant where a tensor was expected). Run as a script
(``python tests/test_triton_compile.py [80] [90]``) it also prints each kernel's registers and
spill stack (``cuobjdump --dump-resource-usage``).

The compile runs in a subprocess: under TRITON_INTERPRET=1 (set by conftest) ``triton.jit``
makes interpreter functions, which the compiler does not take.
"""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def kernels():
    """(name, kernel, signature, constexprs, num_warps) for every solver kernel and tile size, the
    GradDrop kernel in three dtypes, and the Philox, feature-drop and segment kernels."""
    import triton.language as tl

    from mmgrad.triton import graddrop as GD
    from mmgrad.triton import segments as SG
    from mmgrad.triton import solvers as S

    # (the package exports functions named like these two modules)
    FD = importlib.import_module("mmgrad.triton.feature_drop")
    PU = importlib.import_module("mmgrad.triton.philox_uniform")

    qp = {"K": "i32", "iters": "i32", "RIDGE": "constexpr", "TOL": "constexpr",
          "BACKUP": "constexpr", "KP": "constexpr"}
    dual_cone = {"G_ptr": "*fp64", "U_ptr": "*fp64", "out_ptr": "*fp64", **qp}
    min_norm = {"G_ptr": "*fp64", "out_ptr": "*fp64",
                **{k: v for k, v in qp.items() if k != "BACKUP"}}
    cagrad = {"G_ptr": "*fp64", "b_ptr": "*fp64", "s_ptr": "*fp64", "out_ptr": "*fp64", **qp,
              "KAPPA_MAX": "constexpr"}
    nash = {"G_ptr": "*fp64", "a0_ptr": "*fp64", "out_ptr": "*fp64", "K": "i32", "iters": "i32",
            "KP": "constexpr"}
    nash_weights = {"G_ptr": "*fp32", "stride0": "i32", "stride1": "i32", "prev_ptr": "*fp64",
                    "alpha_ptr": "*fp64", "K": "i32", "iters": "i32", "HAS_PREV": "constexpr",
                    "RIDGE": "constexpr", "KP": "constexpr"}
    pcgrad = {"G_ptr": "*fp64", "order_ptr": "*i64", "out_ptr": "*fp64", "K": "i32",
              "KP": "constexpr"}
    gradvac = {"G_ptr": "*fp64", "order_ptr": "*i64", "phi_ptr": "*fp64", "C_ptr": "*fp64",
               "phi_out_ptr": "*fp64", "K": "i32", "BETA": "constexpr", "EPS": "constexpr",
               "KP": "constexpr"}
    normalized = {"G_ptr": "*fp32", "out_ptr": "*fp64", "K": "i32", "stride0": "i32",
                  "stride1": "i32", "EPS": "constexpr", "REG": "constexpr", "KP": "constexpr"}
    qp_constants = {"RIDGE": 1e-12, "TOL": 1e-13, "BACKUP": 3}
    eig_weights = {"G_ptr": "*fp32", "stride0": "i32", "stride1": "i32", "pref_ptr": "*fp64",
                   "out_ptr": "*fp64", "K": "i32", "sweeps": "i32", "RTOL": "constexpr",
                   "CONFIG": "constexpr", "KP": "constexpr"}
    aligned = {"G_ptr": "*fp32", "stride0": "i32", "stride1": "i32", "pref_ptr": "*fp64",
               "out_ptr": "*fp64", "K": "i32", "sweeps": "i32", "TOL": "constexpr",
               "MODE": "constexpr", "KP": "constexpr"}
    out = [("min_norm_k2", S._min_norm_k2_kernel,
            {"G_ptr": "*fp32", "stride0": "i32", "stride1": "i32", "out_ptr": "*fp64",
             "REG": "constexpr"}, {"REG": 2.4e-7}, 1)]
    out.append(("pcgrad_k2", S._pcgrad_k2_kernel,
                {"G_ptr": "*fp32", "stride0": "i32", "stride1": "i32", "out_ptr": "*fp64",
                 "SCALE": "constexpr"}, {"SCALE": 0.5}, 1))
    for upgrad in (False, True):
        out.append((f"dual_cone_k2[upgrad={upgrad}]", S._dual_cone_k2_kernel,
                    {"G_ptr": "*fp32", "stride0": "i32", "stride1": "i32", "pref_ptr": "*fp64",
                     "out_ptr": "*fp64", "EPS": "constexpr", "REG": "constexpr",
                     "UPGRAD": "constexpr"}, {"EPS": 1e-4, "REG": 1e-4, "UPGRAD": upgrad}, 1))
    for KP in (2, 8, 16, 32, 64):
        for name, fn, sig in (("dual_cone", S._dual_cone_kernel, dual_cone),
                              ("min_norm", S._min_norm_kernel, min_norm),
                              ("cagrad", S._cagrad_kernel, cagrad)):
            constants = {k: v for k, v in qp_constants.items() if k in sig}
            constants["KP"] = KP
            if name == "cagrad":
                constants["KAPPA_MAX"] = 1e8
            out.append((name, fn, sig, constants, S._num_warps(KP)))
        out.append(("nash_newton", S._nash_kernel, nash, {"KP": KP}, S._num_warps(KP)))
        for has_prev in (False, True):
            out.append((f"nash_weights[prev={has_prev}]", S._nash_weights_kernel, nash_weights,
                        {"HAS_PREV": has_prev, "RIDGE": 1e-8, "KP": KP}, S._num_warps(KP)))
        out.append(("trace_normalized", S._trace_normalized_kernel, normalized,
                    {"EPS": 0.0, "REG": 1e-4, "KP": KP}, S._num_warps(KP)))
        if KP >= 16:  # tl.dot tiles
            for name, fn, sig, constants in (
                    ("imtl_g", S._pinv_weights_kernel, eig_weights,
                     {"RTOL": 1e-6, "CONFIG": False}),
                    ("config", S._pinv_weights_kernel, eig_weights,
                     {"RTOL": 1e-14, "CONFIG": True}),
                    ("aligned_mtl[min]", S._aligned_kernel, aligned, {"TOL": 1e-6, "MODE": 0}),
                    ("aligned_mtl[median]", S._aligned_kernel, aligned,
                     {"TOL": 1e-6, "MODE": 1}),
                    ("aligned_mtl[rmse]", S._aligned_kernel, aligned, {"TOL": 1e-6, "MODE": 2}),
                    ("pcgrad", S._pcgrad_kernel, pcgrad, {}),
                    ("gradvac", S._gradvac_kernel, gradvac, {"BETA": 0.5, "EPS": 1e-8})):
                out.append((name, fn, sig, {**constants, "KP": KP}, S._num_warps(KP)))
    for dtype, acc in (("fp32", tl.float32), ("bf16", tl.float32), ("fp64", tl.float64)):
        sig = {"J": f"*{dtype}", "stride_k": "i64", "out": f"*{dtype}", "seed": "*i64",
               "counter": "*i64", "index": "*i64", "leak": "*fp64" if dtype == "fp64" else "*fp32",
               "K": "i32", "P": "i64", "HAS_INDEX": "constexpr", "HAS_LEAK": "constexpr",
               "ACC": "constexpr", "KP": "constexpr", "CHUNKED": "constexpr",
               "BLOCK": "constexpr"}
        for KP, chunked in ((2, False), (16, False), (64, False), (64, True)):
            out.append((f"graddrop_{dtype}" + ("[chunked]" if chunked else ""),
                        GD._graddrop_kernel, sig,
                        {"HAS_INDEX": KP == 64, "HAS_LEAK": KP != 64 or chunked, "ACC": acc,
                         "KP": KP, "CHUNKED": chunked, "BLOCK": GD.TILE // KP}, 4))
    # The uniforms (plain and packed), OPM's feature dropping, the noisy scaling and the
    # per-segment reduce kernels (written after the 2026-11-22 GPU run; they passed the CUDA tests
    # on 2026-11-23, and stay here so that a change to them is compiled before the next GPU run).
    for packed in (False, True):
        for has_index in (False, True):
            out.append((f"philox_uniform[packed={packed},index={has_index}]",
                        PU._philox_uniform_kernel,
                        {"out": "*fp32", "seed": "*i64", "counter": "*i64", "index": "*i64",
                         "n": "i64", "HAS_INDEX": "constexpr", "PACKED": "constexpr",
                         "BLOCK": "constexpr"},
                        {"HAS_INDEX": has_index, "PACKED": packed, "BLOCK": 1024}, PU.NUM_WARPS))
    for dtype, acc in (("fp32", tl.float32), ("bf16", tl.float32), ("fp64", tl.float64)):
        out.append((f"feature_drop_{dtype}", FD._feature_drop_kernel,
                    {"z": f"*{dtype}", "out": f"*{dtype}", "keep": "*i1", "drop_prob": "*fp64",
                     "scale": "*fp64", "seed": "*i64", "counter": "*i64", "N": "i64", "ldz": "i64",
                     "col0": "i64", "width": "i64", "m": "i32", "M": "i32", "D": "i64",
                     "BR": "constexpr", "BC": "constexpr", "ACC": "constexpr"},
                    {"BR": FD.BR, "BC": FD.BC, "ACC": acc}, FD.NUM_WARPS))
    for dtype, acc in (("fp32", tl.float32), ("bf16", tl.float32)):  # OGM-GE's noisy scaling
        out.append((f"segment_scale_noise_{dtype}", SG._scale_kernel,
                    {"x": f"*{dtype}", "tile_end": "*i64", "offsets": "*i64", "numels": "*i64",
                     "scale": "*fp32", "noise_std": "*fp32", "seed": "*i64", "S": "i32",
                     "nsteps": "i32", "N": "i64", "TILE": "constexpr", "BS": "constexpr", "BLOCK": "constexpr",
                     "ALIGN": "constexpr", "NS": "constexpr", "ACC": "constexpr",
                     "HAS_NOISE": "constexpr", "PRECISE": "constexpr"},
                    {"TILE": SG.TILE, "BS": 1024, "BLOCK": SG.BLOCK, "ALIGN": SG.ALIGN,
                     "NS": SG.NUM_STAGES, "ACC": acc, "HAS_NOISE": True, "PRECISE": True},
                    SG.NUM_WARPS))
    for acc in ("fp32", "fp64"):
        out.append((f"moments_reduce_{acc}", SG._moments_reduce_kernel,
                    {"part": f"*{acc}", "tile_end": "*i64", "numels": "*i64", "out": f"*{acc}",
                     "S": "i32", "TILE": "constexpr", "BS": "constexpr", "RP": "constexpr"},
                    {"TILE": SG.TILE, "BS": 1024, "RP": 256}, 4))
        out.append((f"segment_gram_reduce_{acc}", SG._sgram_reduce_kernel,
                    {"part": f"*{acc}", "tile_end": "*i64", "numels": "*i64", "out": f"*{acc}",
                     "K": "i32", "KP": "i32", "TILE": "constexpr", "BS": "constexpr",
                     "BLOCK_E": "constexpr", "RP": "constexpr"},
                    {"TILE": SG.TILE, "BS": 0, "BLOCK_E": 64, "RP": 16}, 4))
    return out


def with_ones(entries):
    """Each entry, and its variants with one integer argument (K, P, iters, a stride, ...) equal
    to 1 (once per kernel: the solvers' KP = 16 tile, the float32 variant): a launch specialises
    such an argument into a constant (a K = 1 call, a contiguous G's unit stride, compile their
    own kernel), so code that treats it as a tensor fails only then."""
    out = []
    for name, fn, sig, constexprs, warps in entries:
        out.append((name, fn, sig, constexprs, warps))
        if constexprs.get("KP", 16) != 16 or name.endswith(("_bf16", "_fp64")):
            continue
        for arg in [a for a, t in sig.items() if t in ("i32", "i64")]:
            out.append((f"{name}[{arg}=1]", fn, {**sig, arg: "constexpr"},
                        {**constexprs, arg: 1}, warps))
    return out


def main(archs) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    for arch in archs:
        # (a specialisation compiles or not whatever the architecture: once, for sm_90)
        for name, fn, sig, constexprs, warps in with_ones(kernels()) if arch == 90 else kernels():
            # the kernels' argument order: pointers and scalars as the launchers pass them
            names = fn.arg_names
            signature = {a: sig[a] for a in names}
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": warps})
            usage = ""
            if cuobjdump.exists():
                cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"mmgrad_{name}_{arch}.cubin"
                cubin.write_bytes(compiled.asm["cubin"])
                res = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)],
                                     capture_output=True, text=True).stdout
                usage = next((line.split("CONSTANT")[0].strip() for line in res.splitlines()
                              if "REG:" in line), "")
                cubin.unlink()
            tile = f" KP={constexprs['KP']}" if "KP" in constexprs else ""
            print(f"sm_{arch} {name}{tile} warps={warps}: {usage}", flush=True)


def test_kernels_compile_for_sm80_and_sm90():
    pytest.importorskip("triton", reason="triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    # one process per architecture, side by side
    procs = [subprocess.Popen([sys.executable, __file__, arch], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for arch in ("80", "90")]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-4000:]
    printed = "".join(out for out, _ in outputs)
    assert printed.count("sm_") == len(kernels()) + len(with_ones(kernels())), printed


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [80, 90])
