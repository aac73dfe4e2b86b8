"""Print the benchmark ratios after pytest-benchmark's own table."""

from __future__ import annotations

import json
from pathlib import Path

SUMMARY = Path("bench/summary.json")


def pytest_terminal_summary(terminalreporter) -> None:
    if not SUMMARY.exists():
        return
    summary = json.loads(SUMMARY.read_text())
    results = summary["results"]
    write = terminalreporter.write_line
    workers = summary["workers"]
    write("")
    write(f"mnistbench engine on {summary['device']} ({summary['cpu']}), torch {summary['torch']}")
    if "matmul" in results:
        write(f"  float32 matmul rate: {results['matmul']['gflops']:.1f} GFLOP/s with "
              f"{workers} single-threaded worker{'s' if workers != 1 else ''}")
    if "matmul_one_thread" in results:
        write(f"  float32 matmul rate, one thread: "
              f"{results['matmul_one_thread']['gflops']:.1f} GFLOP/s")
    for cell in ("mlp", "conv", "conv_pool"):
        entry = results.get(cell)
        if not entry or "engine_s" not in entry:
            continue
        line = f"  {cell:9s} engine {entry['engine_s']:.3f} s per model-epoch"
        if "floor_s" in entry:
            line += (f", FLOP floor {entry['floor_s']:.3f} s "
                     f"(engine/floor {entry['engine_vs_floor']:.2f}x)")
            train_share, _ = entry.get("first_layer_shares", (1.0, 1.0))
            if train_share < 1.0:
                line += (f"; counting only the multiplied terms ({train_share:.0%} of the "
                         f"first layer's in training) {entry['multiplied_floor_s']:.3f} s "
                         f"({entry['engine_vs_multiplied_floor']:.2f}x)")
        if "loop_s" in entry:
            line += (f", plain loop {entry['loop_s']:.3f} s "
                     f"(loop/engine {entry['loop_vs_engine']:.2f}x)")
        if "engine_one_thread_vs_floor" in entry:
            line += (f"; one process, one thread: {entry['engine_one_thread_s']:.3f} s "
                     f"({entry['engine_one_thread_vs_floor']:.2f}x its floor)")
        write(line)
    if "memory" in results:
        memory = results["memory"]
        write(f"  peak memory of {memory['runs']} stacked runs of width {memory['width']}: "
              f"{memory['peak_gb']:.2f} GB")
