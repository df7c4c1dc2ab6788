"""Single-patient $assess: latency (own overhead vs upstream) and throughput under gunicorn; prints figures.

    python bench/assess.py                    # 300 timed requests in-process, then 2 sync workers for ≤ 2000 requests / 60 s

The hospital's server is a small HTTP server on 127.0.0.1 answering from memory (pre-rendered Patient,
Encounter and Observation Bundles of generated patients). Latency is measured in-process through the
Flask test client, with the time spent in the HTTP exchanges with the upstream (sending each request and
reading its answer, not parsing it) recorded separately: own overhead = request time − upstream time. Explanations are on (``$assess`` explains
every assessment); write-back is off (it would be upstream time); each assessment is stored in SQLite.
Throughput: ``fhir-ai serve --workers 2 --threads 1`` (gunicorn, sync workers), loopback only, a bounded
number of requests and seconds.
"""
from __future__ import annotations

import argparse
import gc
import http.client
import hashlib
import json
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from datetime import timedelta
from pathlib import Path
from urllib.parse import unquote

import orjson
import requests

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))      # this checkout's fhir_ai, whatever an editable install points at
TOKEN = "bench-token-not-a-secret"


def load_patients(export: Path, count: int) -> dict[str, dict]:
    """{patient id: {"Patient": bytes, "Encounter": bytes, "Observation": bytes, "as_of": str}}."""
    wanted: dict[str, dict] = {}
    for line in open(export / "Patient.ndjson", "rb"):
        r = orjson.loads(line)
        wanted[r["id"]] = {"Patient": line.strip(), "Encounter": [], "Observation": [], "latest": ""}
        if len(wanted) == count:
            break
    for kind in ("Encounter", "Observation"):
        for line in open(export / f"{kind}.ndjson", "rb"):
            r = orjson.loads(line)
            pid = r["subject"]["reference"].split("/", 1)[1]
            if pid in wanted:
                wanted[pid][kind].append(r)
    from fhir_ai.fhir import times
    for pid, item in wanted.items():
        latest = max(times.parse_datetime(o["effectiveDateTime"]) for o in item["Observation"])
        item["as_of"] = times.format_datetime(latest)
        for kind in ("Encounter", "Observation"):
            entries = [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r, "search": {"mode": "match"}}
                       for r in item[kind]]
            item[kind] = orjson.dumps({"resourceType": "Bundle", "type": "searchset", "total": len(entries),
                                       "entry": entries})
    return wanted


PATIENT_PARAMETER = re.compile(r"(?:^|&)patient=([^&]*)")


NOT_FOUND = b'{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"not-found"}]}'
CAPABILITIES = orjson.dumps({"resourceType": "CapabilityStatement", "status": "active", "kind": "instance",
                             "fhirVersion": "4.0.1", "format": ["json"],
                             "rest": [{"mode": "server", "interaction": [{"code": "batch"}]}]})
CAPABILITIES_NO_BATCH = orjson.dumps({"resourceType": "CapabilityStatement", "status": "active",
                                      "kind": "instance", "fhirVersion": "4.0.1", "format": ["json"],
                                      "rest": [{"mode": "server"}]})


def serve_upstream(export: Path, count: int, port_out: "multiprocessing.Queue[int]", batch: bool = True) -> None:
    """The hospital's server: reads, searches (GET, POST _search) and, if ``batch``, batches of them."""
    patients = load_patients(export, count)

    def lookup(parts: list[str], query: str) -> bytes | None:
        patient = PATIENT_PARAMETER.search(query)   # parse_qs would decode the whole long query
        if parts[0] == "Patient" and len(parts) == 2 and parts[1] in patients:
            return patients[parts[1]]["Patient"]
        if (parts[0] in ("Encounter", "Observation") and len(parts) == 1 and patient
                and unquote(patient[1]) in patients):
            return patients[unquote(patient[1])][parts[0]]
        return None

    def batch_response(body: bytes) -> bytes:
        """A batch-response: each entry's pre-rendered answer spliced in (as a server renders from its store)."""
        entries = []
        for entry in orjson.loads(body)["entry"]:
            path, _, query = entry["request"]["url"].partition("?")
            found = lookup(path.strip("/").split("/"), query)
            entries.append(b'{"resource":' + (found or NOT_FOUND) + b',"response":{"status":"'
                           + (b"200 OK" if found else b"404 Not Found") + b'"}}')
        return b'{"resourceType":"Bundle","type":"batch-response","entry":[' + b",".join(entries) + b"]}"

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True     # headers and body go out as separate writes

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path, _, query = self.path.partition("?")
            if path.strip("/") == "metadata":
                self.answer(CAPABILITIES if batch else CAPABILITIES_NO_BATCH)
                return
            self.answer(lookup(path.strip("/").split("/"), query))

        def do_POST(self) -> None:  # noqa: N802 - a search by POST [type]/_search, the form as the query; a batch
            path, _, query = self.path.partition("?")
            parts = path.strip("/").split("/")
            form = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if parts == [""] and batch:
                self.answer(batch_response(form))
                return
            is_search = (len(parts) == 2 and parts[1] == "_search"
                         and self.headers.get("Content-Type", "").startswith("application/x-www-form-urlencoded"))
            self.answer(lookup(parts[:1] if is_search else ["POST", *parts],
                               "&".join(q for q in (query, form.decode("ascii")) if q)))

        def answer(self, body: bytes | None) -> None:
            self.send_response(200 if body else 404)
            body = body or NOT_FOUND
            self.send_header("Content-Type", "application/fhir+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port_out.put(server.server_address[1])
    server.serve_forever()


def settings(upstream: str, folder: Path) -> dict[str, str]:
    return {"source_url": upstream, "database_url": f"sqlite:///{folder / 'bench.sqlite3'}", "write_back": "false",
            "instance_path": str(folder), "log_level": "WARNING",
            "auth_tokens": f"bench:ehr:{hashlib.sha256(TOKEN.encode()).hexdigest()}"}


def body(as_of: str, request_number: int = 0) -> bytes:
    """$assess as of the patient's latest Observation, 3.5 hours earlier per round through the patients.

    An assessment is identified by its inputs, not by asOf: a later asOf over the same Observations is a
    repeat (looked up and audited, nothing new stored). Going back in time drops the latest Observations
    out of the windows (the generator's vital-signs rounds are 2.5 to 3.5 hours apart), so each round is a
    new assessment; ``stored`` counts what was stored after each run.
    """
    from fhir_ai.fhir import times
    at = times.parse_datetime(as_of) - timedelta(minutes=210 * request_number)
    return orjson.dumps({"resourceType": "Parameters",
                         "parameter": [{"name": "asOf", "valueDateTime": times.format_datetime(at)}]})


def stored(database: Path, requests_n: int) -> str:
    """How many of the requests stored new assessments (each stores the model's and its NEWS2 companion)."""
    import sqlite3
    with sqlite3.connect(database) as connection:
        versions = connection.execute("SELECT count(*) FROM risk_assessment").fetchone()[0]
    return f"{versions} RiskAssessments stored for {requests_n} requests ({2 * requests_n} if every one was new)"


HEADERS = {"Content-Type": "application/fhir+json", "Authorization": f"Bearer {TOKEN}"}


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def latency(upstream: str, folder: Path, patients: dict[str, dict], requests_n: int,
            profile: str | None = None) -> None:
    import requests.adapters
    from fhir_ai.app import create_app
    app = create_app(settings(upstream, folder))
    spent = [0.0]
    exchanges = [0]
    # Upstream time = the HTTP exchanges themselves (request out, the server's answer read in); parsing
    # the answer, building queries and everything else around them is our own overhead.
    original_send = requests.adapters.HTTPAdapter.send

    def timed_send(self, *args, **kwargs):
        started = time.perf_counter()
        exchanges[0] += 1
        try:
            response = original_send(self, *args, **kwargs)
            response.content          # the body is read here, as part of the exchange
            return response
        finally:
            spent[0] += time.perf_counter() - started
    requests.adapters.HTTPAdapter.send = timed_send
    stages = stage_timers()
    client = app.test_client()
    gc.collect()
    from fhir_ai.server import prepare_worker_gc
    prepare_worker_gc()              # what the gunicorn workers do after the fork
    ids = list(patients)
    total, upstream_s, own = [], [], []
    profiler = None
    for i in range(requests_n + 20):
        if i == 20 and profile:
            import cProfile
            profiler = cProfile.Profile()
            profiler.enable()
        pid = ids[i % len(ids)]
        spent[0] = 0.0
        if i == 20:
            for key in stages:
                stages[key] = 0.0
            exchanges[0] = 0
        started = time.perf_counter()
        response = client.post(f"/Patient/{pid}/$assess", data=body(patients[pid]["as_of"], i // len(ids)),
                               headers=HEADERS)
        elapsed = time.perf_counter() - started
        assert response.status_code == 200, (response.status_code, response.data[:300])
        if i >= 20:                  # warm-up: first connections, first SQLite pages
            total.append(elapsed * 1e3)
            upstream_s.append(spent[0] * 1e3)
            own.append((elapsed - spent[0]) * 1e3)
    if profiler is not None:
        import pstats
        profiler.disable()
        print(f"profile of {requests_n} requests (cProfile inflates small calls; compare, don't add up):")
        pstats.Stats(profiler).sort_stats(profile).print_stats(os.environ.get("BENCH_PROFILE_FILTER", ""), 40)
        if os.environ.get("BENCH_PROFILE_OUT"):      # the whole profile, for pstats.Stats(path).print_callers(...)
            profiler.dump_stats(os.environ["BENCH_PROFILE_OUT"])
    print(f"latency, {requests_n} requests in-process (explanations on, stored, no write-back):")
    for label, values in (("own overhead", own), ("upstream (local, from memory)", upstream_s), ("total", total)):
        print(f"  {label:<32} p50 {percentile(values, 50):6.2f} ms   p99 {percentile(values, 99):6.2f} ms   "
              f"mean {statistics.mean(values):6.2f} ms")
    print("  goals: own overhead p50 <= 5 ms, p99 <= 15 ms")
    print(f"  upstream exchanges per request: {exchanges[0] / requests_n:.2f}")
    print("  " + stored(folder / "bench.sqlite3", requests_n + 20) + ", warm-up included")
    n = len(own)
    fetch_own = stages.pop("fetch") - sum(upstream_s) / 1e3
    parts = {"fetching: queries, parsing the answers (upstream excluded)": fetch_own, **stages}
    parts["the rest: Flask, auth, reading the request, the answer"] = sum(own) / 1e3 - sum(parts.values())
    print("  where the own overhead goes (mean per request):")
    for label, seconds in parts.items():
        print(f"    {label:<58} {seconds / n * 1e3:6.2f} ms")


def stage_timers() -> dict[str, float]:
    """Wall time spent in each stage of $assess, summed over requests (wrappers cost about a microsecond)."""
    from fhir_ai import assessment, pipeline
    from fhir_ai.features import extract
    from fhir_ai.store import trail
    spent: dict[str, float] = {}

    def wrap(owner: object, name: str, label: str) -> None:
        original = getattr(owner, name)
        spent[label] = 0.0

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[label] += time.perf_counter() - started
        setattr(owner, name, timed)
    wrap(pipeline.Pipeline, "fetch", "fetch")
    wrap(extract.Extractor, "add_all", "features: reading the resources (add_all)")
    wrap(extract.Extractor, "finish", "features: windows and aggregates (finish)")
    wrap(pipeline, "build_assessments", "scoring, explanation (TreeSHAP), NEWS2, building")
    wrap(assessment, "validate", "fhir.resources validation of the RiskAssessments")
    wrap(trail.TrailMixin, "save_assessments", "storing: assessments, Provenance, audit chain")
    return spent


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and all its descendants that are alive now (Linux /proc)."""
    total, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            for task in Path(f"/proc/{current}/task").iterdir():
                pending.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def throughput(upstream: str, folder: Path, patients: dict[str, dict], max_requests: int, max_seconds: float,
               clients: int, upstream_pid: int) -> None:
    port = 18000 + os.getpid() % 1000
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.update({f"FHIR_AI_{k.upper()}": v for k, v in settings(upstream, folder).items()})
    server = subprocess.Popen([sys.executable, "-m", "fhir_ai.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
                               "--threads", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(f"{base}/metadata", timeout=1)
                break
            except requests.RequestException:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("fhir-ai serve did not start: " + server.stderr.read().decode()[-2000:])
                time.sleep(0.2)
        ids = list(patients)
        rounds = 1 + (max_requests - 1) // len(ids)
        if rounds * 3.5 > 14:      # the generator's stays are 22-44 h: further back, some have no data yet
            raise SystemExit(f"{max_requests} requests over {len(ids)} patients go back {rounds * 3.5:.0f} h: "
                             "some assessments would have no data (cheaper, not comparable); use more --patients")
        bodies = [body(patients[ids[i % len(ids)]]["as_of"], 1 + i // len(ids)) for i in range(max_requests)]
        counter = iter(range(max_requests))
        lock = threading.Lock()
        done: list[int] = []
        stop = time.monotonic() + max_seconds

        def worker() -> None:
            # A lean load generator (one keep-alive http.client connection per thread, bodies made up
            # front) so that it takes as little as it can of the CPUs it shares with the workers.
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            while time.monotonic() < stop:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                pid = ids[i % len(ids)]
                connection.request("POST", f"/Patient/{pid}/$assess", body=bodies[i], headers=HEADERS)
                response = connection.getresponse()
                response.read()
                with lock:
                    done.append(response.status)
            connection.close()
        for _ in range(5):                                   # warm-up
            requests.post(f"{base}/Patient/{ids[0]}/$assess", data=body(patients[ids[0]]["as_of"]), headers=HEADERS)
        started = time.perf_counter()
        cpu_before = {"workers": cpu_seconds(server.pid), "upstream": cpu_seconds(upstream_pid),
                      "client": time.process_time()}
        threads = [threading.Thread(target=worker) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - started
        cpu = {"workers": cpu_seconds(server.pid), "upstream": cpu_seconds(upstream_pid),
               "client": time.process_time()}
        cpu = {k: v - cpu_before[k] for k, v in cpu.items()}
        ok = sum(1 for s in done if s == 200)
        print(f"throughput, gunicorn 2 sync workers on 127.0.0.1, {clients} client threads: {ok} assessments "
              f"in {seconds:.1f} s = {ok / seconds:.0f} assessments/s ({len(done) - ok} errors: "
              f"{sorted(set(s for s in done if s != 200))}); goal >= 250/s")
        print("  (the load generator and the upstream share the same CPUs with the workers)")
        print("  " + stored(folder / "bench.sqlite3", len(done) + 1) + ", the first warm-up request included")
        if ok:
            per = {k: v / ok * 1e3 for k, v in cpu.items()}
            print("  CPU per assessment: " + ", ".join(f"{k} {v:.1f} ms" for k, v in per.items())
                  + f"; {os.cpu_count()} CPUs / (workers' CPU per assessment) = "
                  f"{os.cpu_count() * 1e3 / per['workers']:.0f} assessments/s if the workers had the CPUs to themselves")
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--max-requests", type=int, default=2000)
    parser.add_argument("--max-seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--no-batch", action="store_true",
                        help="the upstream declares no batch interaction: fhir_ai reads each record by a request "
                             "per resource type (Patient, Encounter, Observation), as before the eighth session")
    parser.add_argument("--profile", choices=("tottime", "cumulative"),
                        help="profile the in-process requests (cProfile, sorted so) and skip the throughput run")
    args = parser.parse_args()
    import generate
    from bulk import machine
    print("machine:", machine())
    export = generate.cached(1000)
    queue: "multiprocessing.Queue[int]" = multiprocessing.Queue()
    upstream_process = multiprocessing.Process(target=serve_upstream, args=(export, args.patients, queue, not args.no_batch),
                                               daemon=True)
    upstream_process.start()
    upstream = f"http://127.0.0.1:{queue.get(timeout=120)}"
    patients = load_patients(export, args.patients)
    n_obs = statistics.mean(len(json.loads(p["Observation"])["entry"]) for p in patients.values())
    print(f"{len(patients)} patients, {n_obs:.0f} Observations each on average")
    try:
        with tempfile.TemporaryDirectory(prefix="fhir-ai-bench-") as tmp:
            latency(upstream, Path(tmp), patients, args.requests, args.profile)
        if args.profile:
            return
        with tempfile.TemporaryDirectory(prefix="fhir-ai-bench-") as tmp:
            throughput(upstream, Path(tmp), patients, args.max_requests, args.max_seconds, args.clients,
                       upstream_process.pid)
    finally:
        upstream_process.terminate()
    print("machine at the end:", machine())


if __name__ == "__main__":
    main()
