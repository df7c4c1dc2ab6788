"""bulk-assess against the raw limit, on the same generated export, in the same run; prints figures.

    python bench/bulk.py                      # 10,000 patients, 3 alternating repetitions
    python bench/bulk.py --patients 2000 --repeat 1 --memory ""

Each measurement runs in its own child process (peak RSS is that child's ``ru_maxrss``); the time is
measured inside the child from loading the model to the last byte written, for both pipelines alike
(interpreter start-up and imports excluded; the CLI's full wall time is printed once as well). CPU
seconds (user + system, all threads) over the same span show how much of a shared machine a run took.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))      # this checkout's fhir_ai, whatever an editable install points at
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
MODEL = REPO / "fhir_ai" / "models" / "trained" / "deterioration"
MAPPING = REPO / "mappings" / "deterioration.yaml"


def child(kind: str, export: Path, out: Path, explain: str) -> dict:
    if kind == "raw":
        import raw
        started, cpu = time.perf_counter(), os.times()
        result = raw.run(export, MODEL, MAPPING, out, explain=explain == "elevated")
        seconds = time.perf_counter() - started
        result = {"patients": result["patients"], "explained": result["explained"]}
    else:
        from fhir_ai.bulk import bulk_assess
        from fhir_ai.mapping import load_directory
        from fhir_ai.models.registry import ModelRegistry
        started, cpu = time.perf_counter(), os.times()
        registry = ModelRegistry.load(MODEL.parent, load_directory(REPO / "mappings"))
        stats = bulk_assess(export, out, registry, models=["deterioration"], explain=explain, progress=False)
        seconds = time.perf_counter() - started
        result = {"patients": stats.patients, "resources": stats.resources_read}
    done = os.times()
    result.update(seconds=seconds, cpu_seconds=done.user + done.system - cpu.user - cpu.system,
                  peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return result


def measure(kind: str, export: Path, explain: str) -> dict:
    out = export.parent / f"out-{kind}-{explain}.ndjson"
    text = subprocess.run([sys.executable, __file__, "--child", kind, "--export", str(export), "--out", str(out),
                           "--explain", explain], check=True, capture_output=True, text=True, env=ENV).stdout
    return json.loads(text.strip().splitlines()[-1])


def agreement(export: Path) -> tuple[int, int]:
    """How many patients get the same probability (4 decimals) from both pipelines."""
    import orjson
    def probabilities(path: Path) -> dict[str, float | None]:
        out = {}
        for line in path.read_bytes().splitlines():
            r = orjson.loads(line)
            out[r["subject"]["reference"]] = (r.get("prediction") or [{}])[0].get("probabilityDecimal")
        return out
    raw, ours = (probabilities(export.parent / f"out-{k}-none.ndjson") for k in ("raw", "fhir_ai"))
    return sum(raw[k] == ours.get(k) for k in raw), len(raw)


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"{os.cpu_count()} CPUs ({model}), Python {platform.python_version()}, load average {os.getloadavg()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--memory", default="2500,5000,10000,20000", help="patient counts for the peak-RSS series")
    parser.add_argument("--child"), parser.add_argument("--export"), parser.add_argument("--out")
    parser.add_argument("--explain", default="none")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.export), Path(args.out), args.explain)))
        return
    import generate
    print("machine:", machine())
    export = generate.cached(args.patients, args.seed)
    lines = sum(1 for _ in open(export / "Observation.ndjson", "rb"))
    size = sum(p.stat().st_size for p in export.iterdir() if p.suffix == ".ndjson") / 1e6
    print(f"export: {args.patients} patients, {lines} Observations, {size:.0f} MB NDJSON ({export})")
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.repeat):                 # alternate, so background load hits both alike
        for kind in ("raw", "fhir_ai"):
            for explain in ("none", "elevated"):
                runs.setdefault((kind, explain), []).append(measure(kind, export, explain))
    print(f"\n{'pipeline':<34}{'best s':>8}{'median s':>10}{'median CPU s':>14}{'peak RSS MB':>13}")
    for (kind, explain), results in runs.items():
        seconds = [r["seconds"] for r in results]
        print(f"{kind + ' explain=' + explain:<34}{min(seconds):>8.2f}{statistics.median(seconds):>10.2f}"
              f"{statistics.median(r['cpu_seconds'] for r in results):>14.2f}"
              f"{max(r['peak_rss_mb'] for r in results):>13.0f}")
    best = {key: min(r["seconds"] for r in results) for key, results in runs.items()}
    median = {key: statistics.median(r["seconds"] for r in results) for key, results in runs.items()}
    for label, table in (("best", best), ("median", median)):
        print(f"ratio ({label}): no explanations {table['fhir_ai', 'none'] / table['raw', 'none']:.2f}x (goal <= 2); "
              f"explanations for moderate/high {table['fhir_ai', 'elevated'] / table['raw', 'none']:.2f}x of raw "
              f"without (goal <= 2.5), {table['fhir_ai', 'elevated'] / table['raw', 'elevated']:.2f}x of raw with them")
    print(f"explained by raw: {runs['raw', 'elevated'][0]['explained']} patients (moderate or high)")
    same, total = agreement(export)
    print(f"same probability from both pipelines: {same} of {total} patients")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fhir_ai.cli", "bulk-assess", "--input", str(export),
                    "--output", str(export.parent / "cli.ndjson"), "--no-progress"], check=True, capture_output=True,
                   env=ENV)
    print(f"`fhir-ai bulk-assess` whole command (start-up, imports, explain=elevated): "
          f"{time.perf_counter() - started:.2f} s wall")
    if args.memory:
        print("\npeak RSS of fhir_ai bulk-assess (explain=elevated) by export size:")
        for n in (int(x) for x in args.memory.split(",") if x):
            r = measure("fhir_ai", generate.cached(n, args.seed), "elevated")
            print(f"  {n:>6} patients: {r['peak_rss_mb']:.0f} MB, {r['seconds']:.2f} s")
    print("\nmachine at the end:", machine())


if __name__ == "__main__":
    main()
