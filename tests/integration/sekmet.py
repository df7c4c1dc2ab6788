"""Run the real third-party FHIR server sekmet-fhir in its own virtualenv for integration tests."""
from __future__ import annotations

import contextlib
import fcntl
import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

logger = logging.getLogger(__name__)

SEKMET_REQUIREMENT = "sekmet-fhir==0.1.1"
REPO_DIR = Path(__file__).resolve().parents[2]
DEFAULT_VENV = REPO_DIR / ".cache" / "sekmet-venv"
LAUNCHER = Path(__file__).resolve().with_name("sekmet_launcher.py")
# Written last by ensure_venv: a venv without it was interrupted half-way and is rebuilt.
READY_MARKER = "sekmet-ready.txt"
FHIR_JSON = "application/fhir+json"
_checked_venvs: set[Path] = set()  # checked once per test process; a restart need not re-check


class SekmetError(RuntimeError):
    """sekmet did not start, stop or accept what the test gave it."""


class SekmetUnavailable(SekmetError):
    """sekmet's virtualenv cannot be created here (no network to PyPI, broken Python ...)."""


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _venv_works(venv: Path) -> bool:
    marker = venv / READY_MARKER
    if not marker.is_file() or marker.read_text().strip() != SEKMET_REQUIREMENT:
        return False
    probe = ("import importlib.metadata as m, sekmet.fhir.search_params, uvicorn; "
             "print(m.version('sekmet-fhir'))")
    try:
        out = subprocess.run([str(_python(venv)), "-I", "-c", probe], capture_output=True, text=True,
                             timeout=60, check=False)
    except OSError:
        return False
    return out.returncode == 0 and out.stdout.strip() == SEKMET_REQUIREMENT.split("==")[1]


def _run_step(cmd: list[str], timeout: float) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SekmetUnavailable(f"{' '.join(cmd[:4])} ... failed: {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise SekmetUnavailable(f"{' '.join(cmd[:4])} ... exited {proc.returncode}:\n{tail}")


def ensure_venv(venv: Path = DEFAULT_VENV, *, install_timeout: float = 600.0) -> Path:
    """Return the Python of a working sekmet virtualenv, creating it if missing or broken.

    A file lock makes parallel callers (pytest-xdist workers, two test runs at once) wait for one
    builder instead of installing into the same folder together.
    """
    venv = venv.resolve()
    if venv in _checked_venvs:
        return _python(venv)
    try:
        venv.parent.mkdir(parents=True, exist_ok=True)
        lock = open(venv.parent / f"{venv.name}.lock", "w")
    except OSError as exc:
        raise SekmetUnavailable(f"cannot create {venv}: {exc}") from exc
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _venv_works(venv):
            _checked_venvs.add(venv)
            return _python(venv)
        started = time.monotonic()
        logger.info("building sekmet virtualenv at %s", venv)
        shutil.rmtree(venv, ignore_errors=True)
        _run_step([sys.executable, "-m", "venv", str(venv)], timeout=120)
        _run_step([str(_python(venv)), "-m", "pip", "install", "--disable-pip-version-check",
                   "--no-input", "--quiet", SEKMET_REQUIREMENT], timeout=install_timeout)
        (venv / READY_MARKER).write_text(SEKMET_REQUIREMENT + "\n")
        if not _venv_works(venv):
            raise SekmetUnavailable(f"{SEKMET_REQUIREMENT} installed into {venv} but does not import")
        _checked_venvs.add(venv)
        logger.info("sekmet virtualenv ready in %.1f s", time.monotonic() - started)
    return _python(venv)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _outcome_text(response: requests.Response) -> str:
    """The server's own words from an OperationOutcome, else the start of the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    issues = body.get("issue", []) if isinstance(body, dict) else []
    texts = [(i.get("details") or {}).get("text") or i.get("diagnostics") or i.get("code", "")
             for i in issues]
    return "; ".join(t for t in texts if t) or response.text[:500]


class SekmetServer:
    """One sekmet process on 127.0.0.1 with its own data folder.

    ``stop()`` then ``start()`` keeps the port and the data folder, so a test can simulate an
    outage of the hospital's server and find its data again afterwards.
    """

    def __init__(self, data_dir: Path | str | None = None, *, port: int | None = None,
                 venv: Path = DEFAULT_VENV, start_timeout: float = 60.0,
                 validation: str = "strict") -> None:
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="sekmet-data-"))
        self.host = "127.0.0.1"
        self.port = port or free_port(self.host)
        self.venv = venv
        self.start_timeout = start_timeout
        self.validation = validation
        self.log_path = self.data_dir / "sekmet-process.log"
        self.session = requests.Session()
        self.session.headers.update({"Accept": FHIR_JSON})
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/fhir"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> SekmetServer:
        """Build the venv if needed, launch sekmet and wait until /metadata answers 200."""
        if self.running:
            return self
        python = ensure_venv(self.venv)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # -I keeps PYTHONPATH and user site-packages (fhir_ai's FastAPI/pydantic) out of sekmet, and
        # (3.11+) keeps this folder off sys.path: this file, sekmet.py, would shadow the package.
        cmd = [str(python), "-I", str(LAUNCHER), "--host", self.host, "--port", str(self.port),
               "--data-dir", str(self.data_dir), "--validation", self.validation]
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            # cwd = data folder: anything sekmet writes relative to it stays there.
            self._process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, cwd=self.data_dir)
        try:
            self._wait_ready(started)
        except BaseException:
            self.stop()
            raise
        logger.info("sekmet up at %s after %.1f s", self.base_url, time.monotonic() - started)
        return self

    def _wait_ready(self, started: float) -> None:
        deadline = started + self.start_timeout
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise SekmetError(f"sekmet exited with {self._process.returncode} while starting "
                                  f"(port {self.port}):\n{self.log_tail()}")
            try:
                if self.session.get(f"{self.base_url}/metadata", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass  # not listening yet
            time.sleep(0.1)
        raise SekmetError(f"sekmet did not answer {self.base_url}/metadata within "
                          f"{self.start_timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate the process (SIGTERM, then SIGKILL); the data folder stays."""
        proc, self._process = self._process, None
        self.session.close()  # pooled connections to the old process are dead anyway
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.warning("sekmet on port %d ignored SIGTERM; killing it", self.port)
            proc.kill()
            proc.wait(timeout=timeout)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> SekmetServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- data ----

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def load(self, resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Store resources in one atomic transaction: PUT when they have an id, POST otherwise.

        Returns the stored resources (with meta.versionId) in the given order; raises SekmetError
        with sekmet's OperationOutcome text if anything was refused (then nothing was stored).
        """
        if not resources:
            return []
        entries = []
        for res in resources:
            rtype, rid = res["resourceType"], res.get("id")
            request = {"method": "PUT", "url": f"{rtype}/{rid}"} if rid else {"method": "POST", "url": rtype}
            entries.append({"resource": res, "request": request})
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
        response = self.session.post(self.base_url, json=bundle, timeout=60,
                                     headers={"Content-Type": FHIR_JSON})
        if response.status_code != 200:
            raise SekmetError(f"sekmet refused the transaction ({response.status_code}): "
                              f"{_outcome_text(response)}")
        out = response.json().get("entry", [])
        bad = [e["response"]["status"] for e in out if not e["response"]["status"].startswith("20")]
        if len(out) != len(resources) or bad:
            raise SekmetError(f"unexpected transaction-response: {len(out)} entries, failures {bad}")
        return [e["resource"] for e in out]

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """GET one resource; SekmetError if it is not there."""
        response = self.session.get(self.url(f"{resource_type}/{resource_id}"), timeout=30)
        if response.status_code != 200:
            raise SekmetError(f"GET {resource_type}/{resource_id}: {response.status_code} "
                              f"{_outcome_text(response)}")
        return response.json()

    def search(self, resource_type: str, params: dict[str, str] | list[tuple[str, str]] | None = None
               ) -> list[dict[str, Any]]:
        """All matches of a search, following Bundle.link[next]; strict, so an unknown parameter
        is an error instead of being silently ignored."""
        found: list[dict[str, Any]] = []
        pages = self._pages(self.url(resource_type), params)
        for bundle in pages:
            found += [e["resource"] for e in bundle.get("entry", [])
                      if e.get("search", {}).get("mode", "match") == "match"]
        return found

    def _pages(self, url: str, params: Any) -> Iterator[dict[str, Any]]:
        for _ in range(1000):  # bound: a server that links a page to itself must not hang a test
            response = self.session.get(url, params=params, timeout=30,
                                        headers={"Prefer": "handling=strict"})
            if response.status_code != 200:
                raise SekmetError(f"search {url}: {response.status_code} {_outcome_text(response)}")
            bundle = response.json()
            yield bundle
            url = next((link["url"] for link in bundle.get("link", [])
                        if link.get("relation") == "next"), "")
            params = None  # the next link carries every parameter
            if not url:
                return
        raise SekmetError(f"search {url}: more than 1000 pages")


def start_or_skip(server: SekmetServer, *, in_ci: bool) -> SekmetServer:
    """Start ``server``; if sekmet cannot be installed, fail in CI (it must run there) and skip
    elsewhere (a laptop without network). A server that installs but does not start always fails."""
    try:
        return server.start()
    except SekmetUnavailable as exc:
        message = f"sekmet-fhir is unavailable, integration tests cannot run: {exc}"
        if in_ci:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


@contextlib.contextmanager
def running_sekmet(data_dir: Path | str | None = None, **kwargs: Any) -> Iterator[SekmetServer]:
    """A started SekmetServer for a ``with`` block; stopped afterwards."""
    server = SekmetServer(data_dir, **kwargs)
    with server:
        yield server
