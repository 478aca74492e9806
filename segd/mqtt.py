"""Publish what the cameras see to an MQTT broker, with Home Assistant MQTT discovery.

Per source, ``{prefix}/{source}/state`` (retained) carries every class's area in percent of the
frame, published when an area changed at the configured precision (``mode = "change"``) or every
``interval`` seconds (``mode = "interval"``). Each class becomes a Home Assistant sensor, and
each configured threshold (``person = 5``: "person > 5 %") a binary sensor whose ON/OFF state
segd publishes on ``{prefix}/{source}/{class}_over_{percent}``. ``{prefix}/status`` is
``online``/``offline`` (the broker publishes ``offline`` as segd's last will).
The client is paho-mqtt: it reconnects by itself, and segd never waits for the broker.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import TYPE_CHECKING, Any

from segd import __version__
from segd.settings import MqttSettings

if TYPE_CHECKING:
    from segd.sources.runner import Frame, Source, SourceManager

log = logging.getLogger("segd.mqtt")


def slug(text: str) -> str:
    """A topic / entity id fragment: lower case, runs of other characters as ``_``."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "class"


def threshold_id(label: str, percent: float) -> str:
    """The binary sensor of "``label`` covers more than ``percent`` % of the frame"."""
    return f"{slug(label)}_over_{percent:g}".replace(".", "_")


def areas(document: dict[str, Any], labels: tuple[str, ...], precision: int) -> dict[str, float]:
    """Every class's area in percent of the frame (0 for absent classes), rounded."""
    out = dict.fromkeys(labels, 0.0)
    for c in document["classes"]:
        out[c["label"]] = round(100.0 * c["fraction"], precision)
    return out


class MqttPublisher:
    def __init__(self, settings: MqttSettings, sources: SourceManager) -> None:
        import paho.mqtt.client as mqtt

        self.settings = settings
        self.sources = sources
        self.prefix = settings.topic_prefix.rstrip("/")
        self.status_topic = f"{self.prefix}/status"
        self._last: dict[str, tuple[float, dict[str, float]]] = {}
        self._binary: dict[str, str] = {}  # topic -> last published ON/OFF
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=settings.client_id)
        if settings.username:
            client.username_pw_set(settings.username, settings.password)
        client.will_set(self.status_topic, "offline", qos=1, retain=True)
        client.reconnect_delay_set(1, 30)
        client.max_queued_messages_set(1000)  # a broker that is away costs bounded memory
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        self.client = client
        self.connected = False

    def start(self) -> None:
        for source in self.sources.sources.values():
            source.listeners.append(self.on_frame)
        self.client.connect_async(self.settings.host, self.settings.port, self.settings.keepalive)
        self.client.loop_start()

    def stop(self) -> None:
        if self.connected:
            self.client.publish(self.status_topic, "offline", qos=1, retain=True).wait_for_publish(2)
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any = None) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("MQTT broker %s:%s refused the connection: %s", self.settings.host, self.settings.port, reason)
            return
        self.connected = True
        log.info("MQTT connected to %s:%s", self.settings.host, self.settings.port)
        if self.settings.discovery:
            for topic, payload in self.discovery_messages():
                client.publish(topic, json.dumps(payload), qos=1, retain=True)
        client.publish(self.status_topic, "online", qos=1, retain=True)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any = None) -> None:
        if self.connected:
            log.warning("MQTT broker %s:%s disconnected (%s); reconnecting", self.settings.host, self.settings.port, reason)
        self.connected = False

    def describe(self) -> dict[str, Any]:
        return {"broker": f"{self.settings.host}:{self.settings.port}", "connected": self.connected,
                "topic_prefix": self.prefix, "mode": self.settings.mode}  # fmt: skip

    # --- Home Assistant discovery ----------------------------------------------------------
    def discovery_messages(self) -> list[tuple[str, dict[str, Any]]]:
        disc = self.settings.discovery_prefix.rstrip("/")
        out: list[tuple[str, dict[str, Any]]] = []
        for name, source in self.sources.sources.items():
            node = f"segd_{slug(name)}"
            device = {"identifiers": [node], "name": f"segd {name}", "manufacturer": "segd",
                      "model": source.model, "sw_version": __version__}  # fmt: skip
            state = f"{self.prefix}/{name}/state"
            common = {"availability_topic": self.status_topic, "device": device}
            for label in self.labels(source):
                out.append((f"{disc}/sensor/{node}/{slug(label)}/config", {
                    "name": label,
                    "unique_id": f"{node}_{slug(label)}",
                    "state_topic": state,
                    "value_template": "{{ value_json.areas[" + json.dumps(label) + "] }}",
                    "unit_of_measurement": "%",
                    "state_class": "measurement",
                    **common,
                }))  # fmt: skip
            for label, percent in source.settings.thresholds.items():
                oid = threshold_id(label, percent)
                out.append((f"{disc}/binary_sensor/{node}/{oid}/config", {
                    "name": f"{label} over {percent:g} %",
                    "unique_id": f"{node}_{oid}",
                    "state_topic": f"{self.prefix}/{name}/{oid}",
                    "payload_on": "ON",
                    "payload_off": "OFF",
                    **common,
                }))  # fmt: skip
        return out

    @staticmethod
    def labels(source: Source) -> tuple[str, ...]:
        return source.service.slot(source.model).variant.labels.names

    # --- per frame (called on the event loop; paho's publish only queues) -------------------
    def on_frame(self, source: Source, frame: Frame) -> None:
        s = self.settings
        now = time.monotonic()
        current = areas(frame.document, self.labels(source), s.precision)
        for label, percent in source.settings.thresholds.items():  # on every frame, on change
            topic = f"{self.prefix}/{source.name}/{threshold_id(label, percent)}"
            value = "ON" if current.get(label, 0.0) > percent else "OFF"
            if self._binary.get(topic) != value:
                self._binary[topic] = value
                self.client.publish(topic, value, qos=1, retain=True)
        last = self._last.get(source.name)
        if last is not None:
            if s.mode == "change" and last[1] == current:
                return
            if s.mode == "interval" and now - last[0] < s.interval:
                return
        self._last[source.name] = (now, current)
        payload = {"areas": current, "frame": frame.seq, "time": frame.time, "model": frame.document["model"]}
        self.client.publish(f"{self.prefix}/{source.name}/state", json.dumps(payload), qos=0, retain=True)
