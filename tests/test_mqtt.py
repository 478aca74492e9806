"""MQTT publishing against a real broker: Debian's mosquitto on a free 127.0.0.1 port, the real
daemon segmenting a camera served by the test, and a paho-mqtt subscriber reading what a Home
Assistant instance would read (discovery configs, states, availability)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from camera import Camera
from daemon import Daemon, free_port, start_daemon
from test_sources import DM05, jpeg, source, wait_for, write_config

from segd.mqtt import areas


class Broker:
    def __init__(self, tmp: Path) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(exe).is_file():
            pytest.fail("mosquitto is not installed (scripts/setup test installs it)")
        self.port = free_port()
        conf = tmp / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        self.proc.kill()
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Subscriber:
    """Everything published under the given filters, in order, per topic."""

    def __init__(self, port: int, *filters: str) -> None:
        self.messages: dict[str, list[bytes]] = {}
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-{time.monotonic_ns()}")
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe([(f, 1) for f in filters])
        assert subscribed.wait(10)

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.setdefault(msg.topic, []).append(msg.payload)

    def get(self, topic: str) -> list[bytes]:
        with self.lock:
            return list(self.messages.get(topic, []))

    def topics(self, prefix: str) -> set[str]:
        with self.lock:
            return {t for t in self.messages if t.startswith(prefix)}

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(tmp_path_factory.mktemp("mosquitto"))
    yield b
    b.stop()


@pytest.fixture(scope="module")
def camera(test_data: Path) -> Iterator[Camera]:
    cam = Camera([jpeg(test_data / "bird.bmp")], fps=8)  # the same picture again and again
    yield cam
    cam.stop()


def start(tmp: Path, models_dir: Path, camera: Camera, broker: Broker, mqtt_table: str) -> Daemon:
    config = write_config(tmp, {"door": {"url": camera.url + "/stream", "fps": 4, "model": DM05,
                                         "thresholds": {"bird": 5, "person": 50}}},
                          extra=f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\n{mqtt_table}\n')  # fmt: skip
    return start_daemon(tmp, models_dir, "--config", str(config), "--model", DM05, "--accelerator", "cpu")


def test_class_areas_discovery_and_thresholds_reach_a_subscriber(
    tmp_path: Path, models_dir: Path, camera: Camera, broker: Broker
) -> None:
    sub = Subscriber(broker.port, "segd/#", "homeassistant/#")
    d = start(tmp_path, models_dir, camera, broker, 'mode = "change"')
    try:
        wait_for(lambda: source(d, "door")["frames"]["segmented"] >= 6, what="frames")
        wait_for(lambda: sub.get("segd/door/bird_over_5"), what="binary sensor state")
        latest = d.client().get("/sources/door/latest", params={"format": "json"}).json()
        mqtt_state = d.client().get("/sources").json()["mqtt"]
        assert mqtt_state == {"broker": f"127.0.0.1:{broker.port}", "connected": True, "topic_prefix": "segd", "mode": "change"}
        labels = d.client().get(f"/models/{DM05}").json()["labels"]
    finally:
        d.stop()
    try:
        wait_for(lambda: sub.get("segd/status")[-1:] == [b"offline"], timeout=10, what="offline on stop")
    finally:
        sub.stop()
    assert sub.get("segd/status")[0] == b"online"
    # discovery: one sensor per class, one binary sensor per threshold, all on one device
    sensors = sub.topics("homeassistant/sensor/segd_door/")
    assert sensors == {f"homeassistant/sensor/segd_door/{label}/config" for label in labels}
    bird = json.loads(sub.get("homeassistant/sensor/segd_door/bird/config")[0])
    assert bird["state_topic"] == "segd/door/state"
    assert bird["unit_of_measurement"] == "%" and bird["unique_id"] == "segd_door_bird"
    assert bird["value_template"] == '{{ value_json.areas["bird"] }}'
    assert bird["availability_topic"] == "segd/status"
    assert bird["device"]["identifiers"] == ["segd_door"] and bird["device"]["model"] == DM05
    over = json.loads(sub.get("homeassistant/binary_sensor/segd_door/bird_over_5/config")[0])
    assert over["state_topic"] == "segd/door/bird_over_5"
    assert (over["payload_on"], over["payload_off"]) == ("ON", "OFF")
    assert sub.get("homeassistant/binary_sensor/segd_door/person_over_50/config")
    # states: the same picture every frame, so "on change" publishes the areas once
    states = [json.loads(p) for p in sub.get("segd/door/state")]
    assert len(states) == 1, states
    assert states[0]["areas"] == areas(latest, tuple(labels), 1)
    assert set(states[0]["areas"]) == set(labels)
    assert states[0]["areas"]["bird"] > 5
    assert sub.get("segd/door/bird_over_5") == [b"ON"]
    assert sub.get("segd/door/person_over_50") == [b"OFF"]


def test_interval_mode_publishes_unchanged_areas_at_the_configured_rate(
    tmp_path: Path, models_dir: Path, camera: Camera, broker: Broker
) -> None:
    d = start(tmp_path, models_dir, camera, broker, 'mode = "interval"\ninterval = 0.5\ntopic_prefix = "seg2"\ndiscovery = false')
    sub = Subscriber(broker.port, "seg2/#")
    try:
        wait_for(lambda: len(sub.get("seg2/door/state")) >= 1, what="first state")
        time.sleep(2.6)
        states = [json.loads(p) for p in sub.get("seg2/door/state")]
    finally:
        d.stop()
        sub.stop()
    assert 4 <= len(states) <= 7, len(states)  # ~2 per second at 4 fps segmented, same areas
    assert len({json.dumps(s["areas"], sort_keys=True) for s in states}) == 1
