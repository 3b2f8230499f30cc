"""The raw REST clients dicomfleet's agent is measured against, each storing the same files.

Today's watcher runs ``curl`` once per file. The others are the usual hand-made improvements:
``xargs -P4 curl``, one keep-alive session, and four keep-alive workers.
"""

from __future__ import annotations

import logging
import queue
import re
import shlex
import subprocess
import threading
import time
from pathlib import Path

import requests

from bench.archive import REST_CLIENT, BenchArchive
from bench.stats import TimedRun

log = logging.getLogger(__name__)

# Orthanc 1.10 formats its JSON with spaces around the colon; accept either form.
_SUCCESS = re.compile(r'"Status"\s*:\s*"Success"')

# Seconds /statistics may lag behind the client's last response.
SETTLE_TIMEOUT_S = 10.0


def count_successes(output: str) -> int:
    """Return how many of Orthanc's responses in OUTPUT have Status Success."""
    return len(_SUCCESS.findall(output))


def _stored_after(archive: BenchArchive, expected: int) -> int:
    archive.wait_for_instances(expected, SETTLE_TIMEOUT_S)
    return archive.count_instances()


def _shell_run(name: str, script: str, shown: str, archive: BenchArchive, files: list[Path]) -> TimedRun:
    started = time.monotonic()
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started

    successes = count_successes(result.stdout)
    stored = _stored_after(archive, len(files))
    note = ""
    if result.returncode != 0 or successes != len(files):
        note = (f"exit status {result.returncode}, {successes} answers with Status Success; "
                f"stderr: {result.stderr.strip()[-300:]}")
        log.error("%s did not store every file: %s", name, note)
    return TimedRun(name, len(files), seconds, stored, shown, note)


def curl_loop(archive: BenchArchive, folder: Path, files: list[Path]) -> TimedRun:
    """Send FILES with one ``curl`` process per file, in sequence: today's watcher."""
    password = archive.password_of(REST_CLIENT)
    template = ('for f in {folder}/*.dcm; do curl -s -u {auth} --data-binary @"$f" {url}/instances; '
                'echo; done')
    script = template.format(folder=shlex.quote(str(folder)), auth=shlex.quote(f"{REST_CLIENT}:{password}"),
                             url=archive.url)
    shown = template.format(folder=folder, auth=f"{REST_CLIENT}:PASSWORD", url=archive.url)
    return _shell_run("curl loop", script, shown, archive, files)


def xargs_curl(archive: BenchArchive, folder: Path, files: list[Path], processes: int = 4) -> TimedRun:
    """Send FILES with ``xargs -P`` running PROCESSES ``curl`` processes at once."""
    password = archive.password_of(REST_CLIENT)
    template = ("printf '%s\\0' {folder}/*.dcm | xargs -0 -P{processes} -I{{}} "
                "curl -s -u {auth} --data-binary @{{}} {url}/instances")
    script = template.format(folder=shlex.quote(str(folder)), processes=processes,
                             auth=shlex.quote(f"{REST_CLIENT}:{password}"), url=archive.url)
    shown = template.format(folder=folder, processes=processes, auth=f"{REST_CLIENT}:PASSWORD",
                            url=archive.url)
    return _shell_run(f"xargs -P{processes} curl", script, shown, archive, files)


def _post(session: requests.Session, url: str, path: Path) -> bool:
    answer = session.post(url, data=path.read_bytes(), timeout=60)
    return answer.status_code == 200 and answer.json().get("Status") == "Success"


def keepalive_sequential(archive: BenchArchive, files: list[Path]) -> TimedRun:
    """Send FILES one after the other over one keep-alive ``requests`` session."""
    url = archive.url + "/instances"
    session = requests.Session()
    session.auth = (REST_CLIENT, archive.password_of(REST_CLIENT))

    started = time.monotonic()
    successes = sum(1 for path in files if _post(session, url, path))
    seconds = time.monotonic() - started
    session.close()

    stored = _stored_after(archive, len(files))
    note = "" if successes == len(files) else f"{successes} answers with Status Success"
    shown = ("python: one requests.Session, for each file: "
             f"session.post('{url}', data=file bytes) in sequence")
    return TimedRun("keep-alive session, sequential", len(files), seconds, stored, shown, note)


def keepalive_workers(archive: BenchArchive, files: list[Path], workers: int = 4) -> TimedRun:
    """Send FILES from WORKERS threads, each with its own keep-alive ``requests`` session."""
    url = archive.url + "/instances"
    auth = (REST_CLIENT, archive.password_of(REST_CLIENT))
    pending: queue.Queue[Path] = queue.Queue()
    for path in files:
        pending.put(path)
    successes = []

    def work() -> None:
        session = requests.Session()
        session.auth = auth
        count = 0
        while True:
            try:
                path = pending.get_nowait()
            except queue.Empty:
                break
            if _post(session, url, path):
                count += 1
        session.close()
        successes.append(count)

    threads = [threading.Thread(target=work, name=f"bench-worker-{n}") for n in range(workers)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.monotonic() - started

    stored = _stored_after(archive, len(files))
    total = sum(successes)
    note = "" if total == len(files) else f"{total} answers with Status Success"
    shown = (f"python: {workers} threads, each with its own requests.Session, taking files from one queue: "
             f"session.post('{url}', data=file bytes)")
    return TimedRun(f"{workers} keep-alive workers", len(files), seconds, stored, shown, note)
