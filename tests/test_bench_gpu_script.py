"""benchmarks/bench_gpu.py runs end to end on CPU (``--device cpu --quick``) and its table is
consistent: a row for every section, positive times, GB/s equal to the bytes each op must move over
its time, "% of copy" and "vs peer" equal to the ratios they name. Timings themselves are not
asserted (this machine is shared)."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mmgrad
from mmgrad import ops

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"
BACKEND = "cpp" if ops.available_backends("cpu")["cpp"] is None else "reference"
HAS_TORCHJD = importlib.util.find_spec("torchjd") is not None
SEGMENT_OPS = {  # what -> fp32 values moved per value of the buffer (reads + writes)
    "segment_moments": 1,
    "segment_scale_": 2,
    "segment_scale_ + noise": 2,
    "OGM-GE edit (moments, std, scale, noise)": 3,
    "segment_lerp_": 3,
    "segment_gram (MMPareto)": 2,
    "segment_combine_ (MMPareto)": 3,
}
P_QUICK, K_QUICK, AGG_P_QUICK = 2**16, (2, 8), 2**14
REL = 0.02  # every printed number has 3 significant digits: a ratio of them is exact to ~1 %


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("MMGRAD_BACKEND", None)
    # One thread: on a loaded 2-core machine a 2-thread parallel region waits for a time slice.
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def parse_table(report: str) -> list[dict]:
    lines = report.splitlines()
    start = lines.index("| what | backend | K | P | ms | GB/s | % of copy | vs peer |")
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 8, line
        what, backend, K, P, ms, gbs, pct, peer = cells
        rows.append({
            "what": what, "backend": backend, "K": int(K) if K else None, "P": P, "ms": float(ms),
            "gbs": float(gbs) if gbs else None, "pct": float(pct) if pct else None,
            "peer": float(peer) if peer else None,
        })
    return rows


def p_label(n: int) -> str:
    return f"{n / 2**20:.3g}M" if n >= 2**16 else str(n)


def segment_values() -> int:
    # The --quick buffer: two ResNet-18 encoders' tensors, each shrunk 256-fold (at least 2 values).
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from common import resnet18_shapes
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return sum(max(2, math.prod(s) // 256) for s in resnet18_shapes()) * 2


@pytest.fixture(scope="module")
def quick_run():
    proc = run_script()
    return proc.stdout, parse_table(proc.stdout)


def find(rows, what, backend, K=None):
    hits = [r for r in rows if r["what"] == what and r["backend"] == backend and r["K"] == K]
    assert len(hits) == 1, f"expected one row {what!r} / {backend!r} / K={K}, got {len(hits)}"
    return hits[0]


def test_every_section_has_rows(quick_run):
    report, rows = quick_run
    assert "FAILED" not in report and "Skipped" not in report
    assert f"backends `{BACKEND}`" in report
    assert not any(r["backend"] == "triton" for r in rows)  # never timed on CPU
    find(rows, "copy dst.copy_(src)", "torch", max(K_QUICK))
    for K in K_QUICK:
        find(rows, "gram", "torch J @ J.T", K), find(rows, "gram", BACKEND, K)
        find(rows, "combine", "torch w @ J", K), find(rows, "combine", BACKEND, K)
    for what in SEGMENT_OPS:
        K = 2 if "MMPareto" in what else None
        find(rows, what, "torch per-tensor loop", K), find(rows, what, BACKEND, K)
    for method in ("OGM-GE", "MMPareto"):
        for backend in ("plain torch (no edit)", "reference-style", BACKEND):
            find(rows, f"{method} step", backend)
        find(rows, f"{method} edit", "reference-style")
        # The edit is the step minus the SGD step alone: a row, or a note when noise hides it.
        if f"{method} edit, {BACKEND}: below the timing noise" not in report:
            find(rows, f"{method} edit", BACKEND)
    for name in mmgrad.aggregators.NAMES:
        for K in K_QUICK:
            find(rows, f"aggregate {name}", BACKEND, K)
            if HAS_TORCHJD and f"{name} (K={K}" not in report:
                find(rows, f"aggregate {name}", "torchjd", K)
    if HAS_TORCHJD:
        assert f"Aggregators, {BACKEND} vs torchjd: slowest" in report
    else:
        assert "torchjd is not importable" in report


def test_numbers_are_consistent(quick_run):
    _, rows = quick_run
    copy = find(rows, "copy dst.copy_(src)", "torch", max(K_QUICK))
    # Copy: bytes read + written over time, the 100 % reference.
    assert copy["gbs"] == pytest.approx(2 * max(K_QUICK) * P_QUICK * 4 / (copy["ms"] * 1e6), rel=REL)
    assert copy["pct"] == 100
    N = segment_values()
    step_P = p_label(sum(p.numel() for p in _model_parameters()))
    for r in rows:
        assert r["ms"] > 0, r
        is_step = r["what"].endswith((" step", " edit"))
        assert (r["gbs"] is None) == is_step, r
        if is_step:
            assert r["P"] == step_P, r
            continue
        assert r["gbs"] > 0 and 0 < r["pct"] <= 1000, r
        assert r["pct"] == pytest.approx(100 * r["gbs"] / copy["gbs"], rel=REL), r
        # The bytes each op must move, from its definition.
        if r["what"] == "gram":
            values, P = r["K"] * P_QUICK, P_QUICK
        elif r["what"] == "combine":
            values, P = (r["K"] + 1) * P_QUICK, P_QUICK
        elif r["what"] in SEGMENT_OPS:
            values, P = SEGMENT_OPS[r["what"]] * N, N
        elif r["what"].startswith("aggregate "):
            passes = r["K"] + 1 if r["what"] == "aggregate graddrop" else 2 * r["K"] + 1
            values, P = passes * AGG_P_QUICK, AGG_P_QUICK
        else:
            assert r["what"] == "copy dst.copy_(src)", r
            continue
        assert r["P"] == p_label(P), r
        assert r["gbs"] == pytest.approx(values * 4 / (r["ms"] * 1e6), rel=REL), r


def test_vs_peer_is_the_peer_time_over_the_row_time(quick_run):
    _, rows = quick_run
    peers = {"gram": "torch J @ J.T", "combine": "torch w @ J"}
    peers.update({what: "torch per-tensor loop" for what in SEGMENT_OPS})
    checked = 0
    for r in rows:
        if r["backend"] != BACKEND:
            assert r["peer"] is None, r  # peers and references carry no ratio
            continue
        if r["what"].endswith((" step", " edit")):
            peer_backend = "reference-style"
        elif r["what"].startswith("aggregate "):
            if r["peer"] is None:
                continue  # no torchjd counterpart (noted in the report)
            peer_backend = "torchjd"
        else:
            peer_backend = peers[r["what"]]
        peer = find(rows, r["what"], peer_backend, r["K"])
        assert r["peer"] == pytest.approx(peer["ms"] / r["ms"], rel=REL), r
        checked += 1
    assert checked >= len(K_QUICK) * 2 + len(SEGMENT_OPS) + 2


def _model_parameters():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_step import AVModel
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return AVModel().parameters()


def test_budget_and_out_file(tmp_path):
    out = tmp_path / "results.md"
    out.write_text("# earlier results\n")
    proc = run_script("--seconds", "0", "--backends", BACKEND, "triton", "--out", str(out))
    text = out.read_text()
    assert text.startswith("# earlier results\n")  # appended, not overwritten
    assert text[len("# earlier results\n"):] == proc.stdout
    rows = parse_table(proc.stdout)
    # The copy reference is always measured; every other row is skipped with a note naming it.
    assert [r["what"] for r in rows] == ["copy dst.copy_(src)"]
    skipped = proc.stdout.split("Skipped once the 0 s budget was spent: ")[1].splitlines()[0]
    for label in ("gram K=2", "combine K=8", "segment_moments", "segment_combine_ (MMPareto)",
                  "OGM-GE step", "MMPareto step", "aggregate mean K=2", "aggregate graddrop K=8"):
        assert label in skipped
    assert "triton not timed on CPU" in proc.stdout


def test_gpu_run_script_parses_and_names_existing_tests():
    """benchmarks/gpu_run.sh, the one command of a lent GPU machine, is valid bash and every test
    file it runs exists: a renamed file would silently drop its CUDA tests from the next GPU run."""
    script = ROOT / "benchmarks" / "gpu_run.sh"
    check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    named = re.findall(r"tests/test_\w+\.py", script.read_text())
    assert len(named) >= 10, named
    assert [n for n in named if not (ROOT / n).exists()] == []
