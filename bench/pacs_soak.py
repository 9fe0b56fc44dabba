"""The PACS node through a hospital's bad month, compressed: N studies pushed by Orthanc to the
node while Orthanc is stopped twice, the tracking server once, and the node is killed with
SIGKILL twice (and restarted, as a service manager would). Not in the test suite: with the
defaults it runs for about 40 minutes (37 here).

Checked at the end (each a line; exit 1 when one fails): every study `sent`, none `failed`,
exactly one report (SR) per study in Orthanc and one heatmap per film, the spool and the
results folder empty. Printed: throughput (studies per minute, wall clock over the whole
run, outages included), the node's RSS when its 50th study was sent, just before each kill and
at the end, when each disruption happened, and the latency (a study's last film received to
its results confirmed in Orthanc) of the studies that arrived while the tracking server was
down against those of the calm minutes before it went (studies are pushed slower than the
node scores, so a calm study waits for no backlog).

A DenseNet121 with random weights (registered in a real `mlflow server`, sqlite backend, the
node's tracking URI); synthetic SIIM-like studies. Needs Orthanc (apt-get install orthanc
orthanc-dicomweb) and the pacs extra.

    python bench/pacs_soak.py [--studies 500] [--orthanc-outage-s 300] [--server-outage-s 600]
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click
import mlflow
import psutil
import pydicom
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/: the Orthanc and the server start the tests use

from bench.pacs import register  # noqa: E402
from covid_xray.data.synthetic import make_dataset  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.orthanc import Orthanc  # noqa: E402


class Service:
    """A process that can be stopped, killed and started again with the same command."""

    def __init__(self, command: list[str], log: Path, ready: str | None = None, **env: str):
        self.command, self.log, self.ready, self.env = command, log, ready, env
        self.process: subprocess.Popen | None = None

    def start(self) -> Service:
        seen = self.log.read_text(errors="replace").count(self.ready) \
            if self.ready and self.log.exists() else 0
        with open(self.log, "ab") as output:
            self.process = subprocess.Popen(self.command, cwd=ROOT, stdout=output,
                                            stderr=subprocess.STDOUT,
                                            env={**os.environ, **self.env})
        while self.ready and self.log.read_text(errors="replace").count(self.ready) <= seen:
            if self.process.poll() is not None:
                raise RuntimeError(self.log.read_text()[-2000:])
            time.sleep(0.2)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=120)


def wait_for_health(url: str) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            if requests.get(f"{url}/health", timeout=2).ok:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up")
        time.sleep(0.5)


def ledger_rows(ledger: Path) -> list[tuple[str, str]]:
    if not ledger.exists():
        return []
    with sqlite3.connect(ledger, timeout=30) as connection:
        return connection.execute("select study, status from studies").fetchall()


def sent_count(ledger: Path) -> int:
    return sum(status == "sent" for _, status in ledger_rows(ledger))


def latencies(ledger: Path, start: float, end: float) -> list[float]:
    """Seconds from the last film to the results delivered, of the studies whose last film
    arrived between `start` and `end` (time.time())."""
    with sqlite3.connect(ledger, timeout=30) as connection:
        rows = connection.execute(
            "select sent_at - last_arrival from studies where status = 'sent' "
            "and last_arrival between ? and ?", (start, end)).fetchall()
    return sorted(seconds for seconds, in rows)


def describe(seconds: list[float]) -> str:
    if not seconds:
        return "no study"
    middle, high = seconds[len(seconds) // 2], seconds[min(len(seconds) - 1,
                                                          int(0.95 * len(seconds)))]
    return f"{len(seconds)} studies, median {middle:.1f} s, 95th percentile {high:.1f} s, " \
           f"longest {seconds[-1]:.1f} s"


@click.command()
@click.option("--studies", default=500, show_default=True)
@click.option("--every-s", default=3.0, show_default=True, help="A study pushed every ...")
@click.option("--orthanc-outage-s", default=300.0, show_default=True)
@click.option("--server-outage-s", default=600.0, show_default=True)
@click.option("--size", default=512, show_default=True, help="Rows of each film.")
def main(studies: int, every_s: float, orthanc_outage_s: float, server_outage_s: float,
         size: int) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        port = free_port()
        server = Service([str(Path(sys.executable).with_name("mlflow")), "server",
                          "--backend-store-uri", f"sqlite:///{scratch / 'mlflow.db'}",
                          "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                         scratch / "server.log").start()
        url = f"http://127.0.0.1:{port}"
        wait_for_health(url)
        mlflow.set_tracking_uri(url)
        model_uri = register(224)
        data = make_dataset(scratch / "data", num_studies=studies, image_size=size,
                            multi_image_studies=studies // 4, seed=0, progress=False)
        films = sorted(data.glob("train/*/*/*.dcm"))
        node_port = free_port()
        orthanc = Orthanc(scratch / "orthanc", free_port(), free_port(),
                          {"node": ["COVIDXRAY", "127.0.0.1", node_port]}).start()
        # The PACS routes each study's films, not what the node sent back into it: a retried
        # push of the whole study would offer the node its own JPEG heatmaps, which it refuses.
        films_of: dict[str, list[str]] = {}
        for path in films:
            films_of.setdefault(orthanc.upload(path), []).append(orthanc.upload(path, "ID"))
        ids = sorted(films_of)
        state = scratch / "state"
        node = Service([sys.executable, "-m", "entrypoints.pacs", "--port", str(node_port),
                        "--model-uri", model_uri, "--state-dir", str(state),
                        "--study-quiet-s", "2", "--device", "cpu",
                        "--send-to", f"dicomweb:{orthanc.dicomweb}"],
                       scratch / "node.log", "listening as", MLFLOW_TRACKING_URI=url).start()
        print(f"{studies} studies, {len(films)} films of {size} px rows, a study pushed every "
              f"{every_s:g} s; Orthanc down {orthanc_outage_s:g} s twice, the tracking "
              f"server {server_outage_s:g} s once, the node SIGKILLed twice", flush=True)
        events, rss = [], {}
        started = time.monotonic()

        def say(what: str) -> None:
            events.append(f"{time.monotonic() - started:7.1f} s  {what}")
            print(events[-1], flush=True)

        pushed = [0]
        orthanc_up = threading.Event()
        orthanc_up.set()

        def feed() -> None:  # the PACS routing studies as they are acquired
            for study in ids:
                orthanc_up.wait()
                while True:
                    try:
                        orthanc.push("node", films_of[study])
                        break
                    except Exception as error:  # (Orthanc stopped mid-push: the PACS retries)
                        if orthanc_up.is_set():
                            print(f"pushing a study failed ({error}); trying again", flush=True)
                        time.sleep(1)
                        orthanc_up.wait()
                pushed[0] += 1
                time.sleep(every_s)

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()

        def when_pushed(share: float) -> None:
            while pushed[0] < share * len(ids):
                time.sleep(0.5)

        def orthanc_outage() -> None:
            orthanc_up.clear()
            orthanc.stop()
            say(f"Orthanc stopped ({pushed[0]} studies pushed)")
            time.sleep(orthanc_outage_s)
            orthanc.start()
            orthanc_up.set()
            say("Orthanc back")

        def kill_node() -> None:
            sent = sent_count(state / "ledger.sqlite")
            rss[f"before kill at study {sent}"] = \
                psutil.Process(node.process.pid).memory_info().rss
            node.stop(signal.SIGKILL)
            say(f"node SIGKILLed ({pushed[0]} studies pushed)")
            node.start()
            say("node restarted")

        early = min(50, len(ids) // 4)
        while sent_count(state / "ledger.sqlite") < early:
            time.sleep(0.5)
        rss[f"at study {early} sent"] = psutil.Process(node.process.pid).memory_info().rss
        when_pushed(0.2)
        orthanc_outage()
        when_pushed(0.35)
        kill_node()
        calm_from = time.time() + 60  # the restarted node's backlog cleared
        when_pushed(0.5)
        server.stop()
        server_down = time.time()
        say(f"tracking server stopped ({pushed[0]} studies pushed)")
        time.sleep(server_outage_s)
        server.start()
        server_back = time.time()
        wait_for_health(url)
        say("tracking server back")
        when_pushed(0.65)
        orthanc_outage()
        when_pushed(0.8)
        kill_node()
        feeder.join()
        while True:
            rows = ledger_rows(state / "ledger.sqlite")
            if len(rows) == len(ids) and all(status in ("sent", "failed") for _, status in rows):
                break
            time.sleep(1)
        elapsed = time.monotonic() - started
        rss[f"at the end, study {len(rows)}"] = psutil.Process(node.process.pid).memory_info().rss
        calm = latencies(state / "ledger.sqlite", calm_from, server_down)
        server_away = latencies(state / "ledger.sqlite", server_down, server_back)
        node.stop()
        problems = check(rows, ids, films, orthanc, state)
        orthanc.stop()
        server.stop()
    print(f"throughput: {60 * len(ids) / elapsed:.1f} studies/min over {elapsed / 60:.1f} min, "
          "outages included")
    print("node RSS: " + ", ".join(f"{size / 2**20:.0f} MiB {when}" for when, size in rss.items())
          + " (a new process after each kill)")
    print(f"latency, last film to results, calm before the tracking server stopped: "
          f"{describe(calm)}")
    print(f"latency while the tracking server was down: {describe(server_away)}")
    print("\n".join(problems) or "every study sent once: no failure, spool and results empty")
    sys.exit(1 if problems else 0)


def check(rows: list[tuple[str, str]], ids: list[str], films: list[Path], orthanc: Orthanc,
          state: Path) -> list[str]:
    """What is wrong at the end, a line each."""
    problems = [f"study {study}: {status}" for study, status in rows if status != "sent"]
    per_study: dict[str, int] = {}
    for path in films:
        study = pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
        per_study[study] = per_study.get(study, 0) + 1
    for study, count in per_study.items():
        kinds = [item.get("00080060", {}).get("Value", [""])[0]
                 for item in orthanc.instances(study)]
        if kinds.count("SR") != 1 or kinds.count("OT") != count:
            problems.append(f"study {study}: {kinds.count('SR')} reports and "
                            f"{kinds.count('OT')} heatmaps for {count} films in Orthanc")
    for folder in ("spool", "results"):
        left = [path for path in (state / folder).rglob("*") if path.is_file()]
        if left:
            problems.append(f"{folder}: {len(left)} files left")
    return problems


if __name__ == "__main__":
    main()
