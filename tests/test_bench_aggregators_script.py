"""benchmarks/bench_aggregators.py runs end to end on a small J and writes its three tables: one
row per (method, K) in the main table, one per K in the kernels table, one per (method with a
solver, K) in the solver table, every time a non-negative number. Timings themselves are not
asserted (this machine is shared)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_aggregators.py"
METHODS, KS = ("mean", "upgrad", "graddrop"), (2, 8)


def table_after(lines: list[str], header_start: str) -> list[list[str]]:
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_bench_aggregators_writes_its_three_tables(tmp_path):
    out = tmp_path / "report.md"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--K", *map(str, KS), "--P", "16384", "--repeat", "1",
         "--methods", *METHODS, "--no-torchjd", "--no-libmtl", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = out.read_text().splitlines()

    main = table_after(lines, "| method | K | P | floor ms")
    assert [(r[0], int(r[1])) for r in main] == [(m, K) for K in KS for m in METHODS]
    for row in main:
        assert float(row[3]) > 0 and float(row[4]) > 0  # floor, mmgrad
        assert float(row[8]) > 0  # mmgrad / floor
    assert all(row[5] == "-" for row in main if row[0] == "graddrop")  # no weights(G)

    kernels = table_after(lines, "| K | P | one J.sum ms")
    assert [int(r[0]) for r in kernels] == list(KS)

    solvers = table_after(lines, "| method | K | full ms")
    assert [(r[0], int(r[1])) for r in solvers] == [("upgrad", K) for K in KS]  # no mean: no solver
    for row in solvers:
        assert len(row) == 6 and all(float(c) >= 0 for c in row[2:])
