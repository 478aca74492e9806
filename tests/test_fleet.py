"""A fleet behind an existing balancer: deploy/haproxy/haproxy.cfg (Debian's haproxy) in front of
three real segd instances (real uvicorn, real models) while one is SIGTERMed and another
SIGKILLed under load; and the Kubernetes manifests in deploy/k8s against the Kubernetes schemas."""

from __future__ import annotations

import copy
import csv
import io
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from daemon import Daemon, free_port, start_daemon

from segd.synthetic import synthetic_jpeg

REPO = Path(__file__).resolve().parent.parent
HAPROXY_CFG = REPO / "deploy" / "haproxy" / "haproxy.cfg"
K8S_DIR = REPO / "deploy" / "k8s"
DM05 = "deeplabv3_mnv2_dm05_pascal"


def fleet_config(servers: dict[str, str], port: int, stats_port: int) -> str:
    """The shipped config with only the listening ports and the server list replaced."""
    text = HAPROXY_CFG.read_text()
    text, n_bind = re.subn(r"(?m)^    bind :8080$", f"    bind 127.0.0.1:{port}", text)
    text, n_stats = re.subn(r"(?m)^    bind 127\.0\.0\.1:8404$", f"    bind 127.0.0.1:{stats_port}", text)
    lines = [f"    server {name} {addr} check" for name, addr in servers.items()]
    text, n_servers = re.subn(r"(?m)(^    server .*\n)+", "\n".join(lines) + "\n", text)
    assert (n_bind, n_stats, n_servers) == (1, 1, 1), "deploy/haproxy/haproxy.cfg changed shape"
    return text


@dataclass
class Answer:
    status: int  # 0 = no HTTP answer at all
    served_by: str
    started: float
    ended: float


def stats(stats_url: str) -> dict[str, dict[str, str]]:
    rows = csv.DictReader(io.StringIO(httpx.get(stats_url + "/;csv", timeout=5).text.lstrip("# ")))
    return {r["svname"]: r for r in rows if r["pxname"] == "segd"}


def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(0.1)
    raise TimeoutError(what)


@pytest.fixture
def haproxy() -> str:
    exe = shutil.which("haproxy")
    if exe is None:
        pytest.skip("haproxy not installed (scripts/setup test installs Debian's haproxy)")
    return exe


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_haproxy_fleet_survives_a_drained_and_a_killed_instance(
    haproxy: str, tmp_path: Path, models_dir: Path
) -> None:
    args = ("--model", DM05, "--accelerator", "cpu", "--threads", "1")
    env = {"SEGD_QUEUE_SIZE": "16", "SEGD_GRACEFUL_TIMEOUT": "20"}
    with ThreadPoolExecutor(3) as pool:
        started = list(pool.map(lambda i: start_daemon(tmp_path, models_dir, *args, env=env), range(3)))
    daemons: dict[str, Daemon] = dict(zip(("drained", "killed", "stays"), started, strict=True))
    port, stats_port = free_port(), free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(fleet_config({n: d.url.removeprefix("http://") for n, d in daemons.items()}, port, stats_port))
    log_path = tmp_path / "haproxy.log"
    with open(log_path, "wb") as log:
        proxy = subprocess.Popen([haproxy, "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    url, stats_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{stats_port}"
    try:
        wait_for(lambda: all(r["status"] == "UP" for r in stats(stats_url).values() if r["svname"] in daemons),
                 30, "haproxy never saw all instances UP")  # fmt: skip
        answers, marks = run_load_with_faults(url, daemons)
        final = stats(stats_url)
    finally:
        proxy.send_signal(signal.SIGTERM)
        proxy.wait(10)
        for d in daemons.values():
            d.stop(signal.SIGKILL)
    report = summarise(answers, marks, final, log_path.read_text(errors="replace"))
    print("fleet:", report)

    # The drained instance answered every request it took (exit 0 after draining) and nothing
    # failed because of it; the survivor kept serving; the killed one's requests in flight were
    # retried elsewhere (or failed: counted), and nothing else was.
    assert daemons["drained"].proc.returncode == 0, daemons["drained"].output()[-2000:]
    assert report["served"]["drained"] > 0 and report["served"]["killed"] > 0
    assert report["after_kill_served_by"] == {"stays"}, report
    assert report["failed_on_drained"] == 0, report
    assert report["retried_from_killed"] + report["failed"] <= report["killed_in_flight_max"], report
    assert report["total"] - report["failed"] == report["ok"], report


def run_load_with_faults(url: str, daemons: dict[str, Daemon]) -> tuple[list[Answer], dict[str, float]]:
    """4 clients in a closed loop for ~16 s: SIGTERM one instance at 4 s, SIGKILL another at 9 s."""
    image = synthetic_jpeg((513, 513))
    answers: list[Answer] = []
    lock = threading.Lock()
    stop = threading.Event()
    t0 = time.monotonic()
    marks: dict[str, float] = {}

    def client() -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            while not stop.is_set():
                start = time.monotonic() - t0
                try:
                    r = c.post("/segment", params={"format": "json"}, content=image,
                               headers={"Content-Type": "image/jpeg"})  # fmt: skip
                    status, by = r.status_code, r.headers.get("x-served-by", "")
                except httpx.HTTPError:
                    status, by = 0, ""
                with lock:
                    answers.append(Answer(status, by, start, time.monotonic() - t0))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(4)
        marks["term"] = time.monotonic() - t0
        daemons["drained"].proc.send_signal(signal.SIGTERM)
        time.sleep(5)
        marks["kill"] = time.monotonic() - t0
        daemons["killed"].proc.send_signal(signal.SIGKILL)
        time.sleep(7)
    finally:
        stop.set()
        for t in threads:
            t.join(90)
    daemons["drained"].proc.wait(30)
    for a in answers:
        a.served_by = a.served_by or "-"
    answers.sort(key=lambda a: a.started)
    return answers, marks


def max_per_instance() -> int:
    """The ``maxconn`` of the shipped default-server line: the most requests one instance holds."""
    match = re.search(r"(?m)^    default-server .*\bmaxconn (\d+)", HAPROXY_CFG.read_text())
    assert match, "default-server maxconn missing from deploy/haproxy/haproxy.cfg"
    return int(match.group(1))


def summarise(answers: list[Answer], marks: dict[str, float], final: dict[str, dict[str, str]], log: str) -> dict[str, object]:
    served = {name: sum(1 for a in answers if a.served_by == name and a.status == 200)
              for name in final if name != "BACKEND"}  # fmt: skip
    # Requests the killed instance held when it died: HAProxy counts, per server, the retries
    # (wretr) and redispatches (wredis) it made after that server failed a request; its log line
    # per request gives the final server and the retry count (%rc, "+N" when redispatched).
    retried_lines = [line for line in log.splitlines() if re.search(r" segd/\S+ .* \S+/\S+/\S+/\S+/\+?[1-9]\d* ", line)]
    # In flight on the killed one when it died: at most maxconn; HAProxy's redispatches away from
    # it (wredis) say how many exactly were sent again elsewhere.
    retried_from_killed = int(final["killed"]["wredis"] or 0)
    return {
        "total": len(answers),
        "ok": sum(1 for a in answers if a.status == 200),
        "failed": sum(1 for a in answers if a.status != 200),
        "failed_statuses": sorted({a.status for a in answers if a.status != 200}),
        "failed_on_drained": sum(1 for a in answers if a.status != 200 and a.served_by == "drained"),
        "served": served,
        "after_kill_served_by": {a.served_by for a in answers if a.started > marks["kill"] + 2.5 and a.status == 200},
        "killed_in_flight_max": max_per_instance(),
        "retried_from_killed": retried_from_killed,
        "retries": {name: (int(r["wretr"] or 0), int(r["wredis"] or 0)) for name, r in final.items()},
        "retried_requests_logged": len(retried_lines),
        "marks_s": {k: round(v, 2) for k, v in marks.items()},
    }


# --- Kubernetes ------------------------------------------------------------------------------
def k8s_documents() -> Iterator[tuple[Path, dict[str, object]]]:
    import yaml

    for path in sorted(K8S_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc


K8S_VERSION = "1.37.0"  # the newest schema set kubernetes-validate ships (read offline)


def test_k8s_manifests_pass_the_kubernetes_schemas_offline() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = list(k8s_documents())
    assert {d["kind"] for _, d in docs} >= {"Namespace", "ConfigMap", "DaemonSet", "Service"}
    for path, doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {doc['kind']} {doc['metadata']['name']}: {exc}")
    # The check can fail: a misspelt field in the same DaemonSet is refused.
    daemonset = next(d for _, d in docs if d["kind"] == "DaemonSet")
    broken = copy.deepcopy(daemonset)
    broken["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def unit_setting(name: str) -> str:
    match = re.search(rf"(?m)^{name}=(\S+)", (REPO / "segd" / "data" / "segd.service").read_text())
    assert match, name
    return match.group(1)


def test_k8s_daemonsets_run_on_coral_nodes_with_device_access_probes_and_the_units_limits() -> None:
    daemonsets = [d for _, d in k8s_documents() if d["kind"] == "DaemonSet"]
    assert len(daemonsets) == 2
    mounted = set()
    for ds in daemonsets:
        pod = ds["spec"]["template"]["spec"]
        assert set(pod["nodeSelector"]) == {"segd.io/edgetpu"}
        (container,) = pod["containers"]
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        # systemd/segd.service: MemoryHigh=768M, MemoryMax=1G, TimeoutStopSec=45
        assert unit_setting("MemoryHigh") == container["resources"]["requests"]["memory"].removesuffix("i")
        assert unit_setting("MemoryMax") == container["resources"]["limits"]["memory"].removesuffix("i")
        assert pod["terminationGracePeriodSeconds"] == int(unit_setting("TimeoutStopSec"))
        assert "cpu" not in container["resources"]["limits"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for mount in container["volumeMounts"]:
            host = volumes[mount["name"]].get("hostPath")
            if host:
                assert host["path"] == mount["mountPath"]
                mounted.add(host["path"])
    assert mounted == {"/dev/bus/usb", "/dev/apex_0"}
