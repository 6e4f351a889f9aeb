"""`pacs serve --workers 2`: two processes share the port and both serve associations."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from sqlalchemy import func, select

from pacs.index.models import Instance
from pacs.services import build_services
from pacs.settings import Settings
from pacs.synthetic import SeriesSpec, make_series
from tests.integration.dicom_tools import DCMTK_ENV, NEEDS_DCMTK, free_port

pytestmark = NEEDS_DCMTK


def test_two_workers_share_the_port(tmp_path):
    port = free_port()
    data_dir = tmp_path / "data"
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "pacs.cli.main", "serve", "--data-dir", str(data_dir), "--dicom-port", str(port),
             "--workers", "2"], env=DCMTK_ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, log_path.read_text()
            listening = len(re.findall(r"listening on", log_path.read_text()))
            if listening == 2:
                break
            assert time.monotonic() < deadline, "the workers did not start:\n" + log_path.read_text()
            time.sleep(0.2)
        inbox = tmp_path / "in"
        inbox.mkdir()
        senders = []
        for k in range(12):
            folder = inbox / str(k)
            folder.mkdir()
            spec = SeriesSpec(study_key=f"w{k}", series_key=f"w{k}-1", rows=32, columns=32, count=3)
            for i, data in enumerate(make_series(spec)):
                (folder / f"{i}.dcm").write_bytes(data)
            senders.append(subprocess.Popen(
                ["storescu", "-aec", "PACS", "127.0.0.1", str(port), *map(str, sorted(folder.iterdir()))],
                env=DCMTK_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        for sender in senders:
            assert sender.wait(timeout=120) == 0, sender.stderr.read()
    finally:
        server.send_signal(signal.SIGTERM)  # by PID; the parent stops its workers
        server.wait(timeout=60)
    services = build_services(Settings(data_dir=data_dir))
    with services.db.session() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 36
    services.close()
    ended = re.findall(r"\[(\d+)\] pacs\.net\.scp: association from STORESCU .* ended: 3 C-STORE \(3 stored\)",
                       log_path.read_text())
    assert len(ended) == 12  # one line per association
    pids = set(ended)
    assert len(pids) == 2, f"associations were served by {len(pids)} process(es)"


def test_workers_stop_when_the_parent_is_killed(tmp_path):
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "pacs.cli.main", "serve", "--data-dir", str(tmp_path / "data"),
             "--dicom-port", str(port), "--workers", "2"], env=DCMTK_ENV, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while len(re.findall(r"listening on", log_path.read_text())) < 2:
        assert time.monotonic() < deadline and server.poll() is None, log_path.read_text()
        time.sleep(0.2)
    workers = [int(p) for p in re.search(r"started 2 workers: pids (\d+), (\d+)", log_path.read_text()).groups()]
    server.kill()  # SIGKILL: no chance to stop the workers itself
    server.wait(timeout=10)
    deadline = time.monotonic() + 15
    alive = workers
    while alive and time.monotonic() < deadline:
        time.sleep(0.5)
        alive = [pid for pid in workers if os.path.exists(f"/proc/{pid}") and
                 "Z" not in open(f"/proc/{pid}/stat").read().split()[2]]
    assert alive == [], f"workers {alive} outlived their parent"
