"""Run bench/assess.py on another revision and on this checkout, alternately, and compare.

On a noisy host (the same code has measured 4.4 to 8.5 ms p50 within an hour) one run says little; runs of
two revisions taken in turn share the host's slow and fast spells. Both use THIS checkout's bench scripts
(copied into a temporary git worktree of the other revision), so the measuring is the same and only the
code under test differs.

    python bench/alternate.py f7de3af --pairs 5

prints each run's own overhead p50/p99, throughput with 2 sync workers, workers' CPU per assessment and what
was stored, then the medians and the paired differences (this checkout minus the other).
"""
from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FIGURES = {
    "p50": (re.compile(r"^  own overhead\s+p50\s+([\d.]+) ms", re.M), "ms"),
    "p99": (re.compile(r"^  own overhead\s+p50\s+[\d.]+ ms\s+p99\s+([\d.]+) ms", re.M), "ms"),
    "per s": (re.compile(r"= (\d+) assessments/s"), "/s"),
    "worker CPU": (re.compile(r"CPU per assessment: workers ([\d.]+) ms"), "ms"),
}
STORED = re.compile(r"^  (\d+) RiskAssessments stored for (\d+) requests", re.M)


def run(tree: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, "bench/assess.py"], cwd=tree, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"bench/assess.py failed in {tree}:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    figures = {}
    for name, (pattern, _) in FIGURES.items():
        found = pattern.search(out.stdout)
        figures[name] = float(found[1]) if found else float("nan")
    for stored, requests in STORED.findall(out.stdout):
        if int(stored) != 2 * int(requests):
            print(f"  note: {tree.name}: {stored} RiskAssessments stored for {requests} requests: some repeated")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revision", help="the git revision to compare this checkout with")
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fhir-ai-alternate-") as tmp:
        other = Path(tmp) / "other"
        subprocess.run(["git", "worktree", "add", "--detach", str(other), args.revision], cwd=REPO, check=True,
                       capture_output=True)
        try:
            for script in HERE.glob("*.py"):                 # the same measuring on both sides
                shutil.copy2(script, other / "bench" / script.name)
            runs: dict[str, list[dict[str, float]]] = {args.revision: [], "this checkout": []}
            for pair in range(args.pairs):
                for label, tree in ((args.revision, other), ("this checkout", REPO)):
                    figures = run(tree)
                    runs[label].append(figures)
                    print(f"pair {pair + 1} {label:>14}: " + "  ".join(
                        f"{name} {value:g}{FIGURES[name][1]}" for name, value in figures.items()), flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(other)], cwd=REPO, capture_output=True)
    print("\nmedians (range) and paired differences, this checkout minus " + args.revision + ":")
    for name, (_, unit) in FIGURES.items():
        mine = [r[name] for r in runs["this checkout"]]
        theirs = [r[name] for r in runs[args.revision]]
        differences = [a - b for a, b in zip(mine, theirs)]
        print(f"  {name:<10} {args.revision}: {statistics.median(theirs):g}{unit} ({min(theirs):g}-{max(theirs):g})"
              f"   this checkout: {statistics.median(mine):g}{unit} ({min(mine):g}-{max(mine):g})"
              f"   differences: {', '.join(f'{d:+.2f}' for d in differences)}")


if __name__ == "__main__":
    main()
