"""One MQTT connection (paho-mqtt 2.x, callback API v2), shared by the device agent and the
coordinator service: ``mqtt://`` and ``mqtts://`` URLs, credentials, CA file, client
certificate, last will, persistent session, automatic reconnect with backoff, subscriptions
restored after every reconnect, chunked publishing of large payloads, and a thread-safe inbox of
received messages.

A TLS handshake refused for good (client certificate missing, unknown, revoked or expired;
broker certificate not trusted) ends the connection's use: the reason is logged once and
``start``/``get`` raise ``CertificateRefused``, whose exit status (77) tells systemd not to
restart the service (``RestartPreventExitStatus=77`` in deploy/systemd/).
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cahfp.errors import CAHFPError
from cahfp.mqtt.inbox import DEFAULT_MEMORY, Incoming, SpoolingInbox
from cahfp.protocol import CLIENT_ID_PREFIX, DEFAULT_CHUNK, iter_chunks

log = logging.getLogger("cahfp.link")
HEADER_ROOM = 512  # chunk header + MQTT fixed header + topic, kept below the packet limit


class LinkError(CAHFPError):
    """The broker could not be reached or refused us."""


class CertificateRefused(LinkError):
    """The TLS handshake failed for a reason that retrying cannot fix."""

    exit_code = 77  # EX_NOPERM; the systemd units do not restart on it


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        u = urlparse(url)
        if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
            raise LinkError(
                f"broker URL must look like mqtt://HOST:PORT or mqtts://HOST:PORT, got {url!r}"
            )
        if u.username or u.password:
            raise LinkError(
                "do not put credentials in the broker URL; use --credentials FILE "
                "or CAHFP_MQTT_USERNAME / CAHFP_MQTT_PASSWORD"
            )
        return cls(
            u.hostname, u.port or (8883 if u.scheme == "mqtts" else 1883), u.scheme == "mqtts"
        )


def read_credentials(path: str | os.PathLike | None) -> tuple[str | None, str | None]:
    """Username and password from a file (``username:password`` on one line, or username and
    password on two lines), else from ``CAHFP_MQTT_USERNAME`` / ``CAHFP_MQTT_PASSWORD``."""
    if path:
        try:
            text = Path(path).read_text().strip()
        except OSError as exc:
            raise LinkError(f"cannot read credentials file {path}: {exc}") from None
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if len(lines) == 1 and ":" in lines[0]:
            user, pw = lines[0].split(":", 1)
            return user, pw
        if len(lines) == 2:
            return lines[0], lines[1]
        raise LinkError(f"credentials file {path} must hold 'username:password' or two lines")
    return os.environ.get("CAHFP_MQTT_USERNAME"), os.environ.get("CAHFP_MQTT_PASSWORD")


def client_certificate(cert: str | None, key: str | None) -> tuple[str | None, str | None]:
    """The client certificate and key files, else ``CAHFP_CERT`` / ``CAHFP_KEY`` (empty means
    none); both or neither, and both readable."""
    cert = cert or os.environ.get("CAHFP_CERT") or None
    key = key or os.environ.get("CAHFP_KEY") or None
    if bool(cert) != bool(key):
        raise LinkError(
            "a client certificate needs its key: give both --cert and --key "
            "(or CAHFP_CERT and CAHFP_KEY)"
        )
    for kind, path in (("certificate", cert), ("key", key)):
        if path:
            try:
                with open(path, "rb") as f:
                    f.read(1)
            except OSError as exc:
                raise LinkError(f"cannot read client {kind} file {path}: {exc.strerror}") from None
    return cert, key


# TLS alerts from the broker (and our own verification failure) that no retry can fix
_REFUSALS = (
    (
        "CERTIFICATE_REQUIRED",
        "the broker requires a client certificate: give --cert and --key "
        "(or CAHFP_CERT and CAHFP_KEY)",
    ),
    ("CERTIFICATE_REVOKED", "the broker refused the client certificate {cert}: it is revoked"),
    ("CERTIFICATE_EXPIRED", "the broker refused the client certificate {cert}: it has expired"),
    ("UNKNOWN_CA", "the broker refused the client certificate {cert}: not issued by its CA"),
    ("BAD_CERTIFICATE", "the broker refused the client certificate {cert}"),
    ("CERTIFICATE_UNKNOWN", "the broker refused the client certificate {cert}"),
    ("CERTIFICATE_VERIFY_FAILED", "the broker's certificate is not trusted with CA {ca} ({why})"),
)


def tls_refusal(error: str, cert: str | None, ca: str | None) -> str | None:
    """The one-line reason for a TLS failure ``error`` that retrying cannot fix, else None."""
    upper = error.upper()
    if cert is None and "HANDSHAKE_FAILURE" in upper:  # a TLS 1.2 broker says only this
        return _REFUSALS[0][1]
    for alert, text in _REFUSALS:
        if alert in upper:
            if cert is None and alert != "CERTIFICATE_VERIFY_FAILED":
                return _REFUSALS[0][1]  # whatever the alert says, we presented none
            why = error.split("]", 1)[-1].split("(_ssl", 1)[0].strip()
            return text.format(cert=cert, ca=ca or "(system CAs)", why=why)
    return None


def _tls_context(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    """Verify the broker with ``ca`` (else the system CAs); present ``cert``/``key`` if given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # hostname check and CERT_REQUIRED
    try:
        ctx.load_verify_locations(ca) if ca else ctx.load_default_certs()
    except (ssl.SSLError, OSError) as exc:
        raise LinkError(f"cannot use the CA file {ca}: {exc}") from None
    if cert:
        try:
            ctx.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            raise LinkError(
                f"cannot use the client certificate {cert} with the key {key}: {exc}"
            ) from None
    return ctx


class MqttLink:
    def __init__(
        self,
        url: str,
        client_id: str,
        *,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        will: tuple[str, bytes, int, bool] | None = None,
        protocol: int = 5,
        keepalive: int = 20,
        session_expiry: int = 3600,
        inbox_memory: int = DEFAULT_MEMORY,
        spool_dir: str | None = None,
    ):
        self.address = BrokerAddress.parse(url)
        self.client_id = client_id
        self.protocol = mqtt.MQTTv5 if protocol == 5 else mqtt.MQTTv311
        kwargs = {} if protocol == 5 else {"clean_session": False}
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=CLIENT_ID_PREFIX + client_id,  # see CLIENT_ID_PREFIX
            protocol=self.protocol,
            **kwargs,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.ca_file, self.cert_file = ca_file, cert_file
        if self.address.tls:
            self.client.tls_set_context(_tls_context(ca_file, cert_file, key_file))
        elif ca_file:
            raise LinkError("a CA file was given but the broker URL is not mqtts://")
        elif cert_file or key_file:
            raise LinkError(
                "a client certificate was given but the broker URL is not mqtts:// "
                "(certificates need TLS)"
            )
        if will:
            self.set_will(*will)
        self.client.reconnect_delay_set(min_delay=1, max_delay=16)
        self.client.max_inflight_messages_set(32)
        self.client.max_queued_messages_set(0)
        self.keepalive, self.session_expiry = keepalive, session_expiry
        self.inbox = SpoolingInbox(inbox_memory, spool_dir)
        self.subscriptions: dict[str, int] = {}
        self.connected = threading.Event()
        self.error: str | None = None
        self.refused: str | None = None  # a TLS refusal that retrying cannot fix
        self.max_packet: int | None = None  # announced by an MQTT 5 broker
        self.connects = 0
        self.stopping = False
        # admit(topic, size) -> bool, called in paho's thread before a message is buffered:
        # False drops it there (the coordinator's per-device byte budget)
        self.admit = None
        self.received = 0  # messages that arrived (admitted or not)
        self.last_arrival = 0.0  # time.monotonic() of the latest
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_log = self._on_log

    # ------------------------------------------------------------------ callbacks (paho thread)

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self.error = f"broker refused the connection: {reason_code}"
            log.error("%s: %s", self.client_id, self.error)
            return
        self.error = None
        self.connects += 1
        if properties is not None and hasattr(properties, "MaximumPacketSize"):
            self.max_packet = int(properties.MaximumPacketSize)
        for topic, qos in self.subscriptions.items():
            client.subscribe(topic, qos)
        self.connected.set()
        log.info(
            "%s connected to %s:%d (session present: %s)",
            self.client_id,
            self.address.host,
            self.address.port,
            getattr(flags, "session_present", None),
        )

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.connected.clear()
        if not self.stopping and not self.refused:
            log.warning(
                "%s disconnected (%s); reconnecting with backoff", self.client_id, reason_code
            )

    def _tls_failed(self, error: str) -> None:
        reason = tls_refusal(error, self.cert_file, self.ca_file)
        if reason and not self.refused:
            self.refused = self.error = reason
            log.error("%s: %s", self.client_id, reason)  # once; start/get raise it

    def _on_connect_fail(self, client, userdata):
        exc = sys.exc_info()[1]  # paho calls this inside its `except OSError`
        if isinstance(exc, ssl.SSLError):  # the handshake failed (TLS 1.2)
            self._tls_failed(str(exc))

    def _on_log(self, client, userdata, level, buf):
        if level == mqtt.MQTT_LOG_ERR and buf.startswith("failed to receive on socket: [SSL"):
            self._tls_failed(buf)  # TLS 1.3: the broker's alert arrives with the first read

    def _on_message(self, client, userdata, msg):
        self.received += 1
        self.last_arrival = time.monotonic()
        if self.admit is not None and not self.admit(msg.topic, len(msg.payload)):
            return
        self.inbox.put(Incoming(msg.topic, bytes(msg.payload), bool(msg.retain)))

    # ------------------------------------------------------------------ API

    def start(self, timeout: float = 30.0) -> None:
        """Connect (retrying in the background) and wait until connected or ``timeout``."""
        props = None
        if self.protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry
            clean = False
        else:
            clean = mqtt.MQTT_CLEAN_START_FIRST_ONLY
        try:
            self.client.connect_async(
                self.address.host,
                self.address.port,
                self.keepalive,
                clean_start=clean,
                properties=props,
            )
        except (OSError, ValueError) as exc:
            raise LinkError(
                f"cannot connect to {self.address.host}:{self.address.port}: {exc}"
            ) from None
        self.client.loop_start()
        if not self.wait_connected(timeout):
            self.stop()
            if self.refused:
                raise CertificateRefused(self.refused)
            raise LinkError(
                self.error
                or f"no connection to {self.address.host}:"
                f"{self.address.port} within {timeout:.0f} s"
            )

    def set_will(self, topic: str, payload: bytes, qos: int = 1, retain: bool = True) -> None:
        """The message the broker publishes if this connection ends uncleanly (takes effect at
        the next connect)."""
        self.client.will_set(topic, payload, qos, retain)

    def wait_connected(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.connected.wait(0.1):
                return True
            if self.refused:
                return False
            if self.error and "refused" in self.error and "authorized" in self.error.lower():
                return False
        return self.connected.is_set()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self.subscriptions[topic] = qos
        if self.connected.is_set():
            self.client.subscribe(topic, qos)

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        qos: int = 1,
        retain: bool = False,
        expiry: float | None = None,
    ) -> mqtt.MQTTMessageInfo:
        """Publish; while disconnected, QoS 1 messages are queued and sent on reconnect.
        ``expiry``: seconds after which the broker drops the message, retained copy included
        (MQTT 5 only; ignored with 3.1.1)."""
        props = None
        if expiry is not None and self.protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = max(1, round(expiry))
        return self.client.publish(topic, payload, qos=qos, retain=retain, properties=props)

    def chunk_size(self, wanted: int = DEFAULT_CHUNK) -> int:
        if self.max_packet:
            return max(1024, min(wanted, self.max_packet - HEADER_ROOM))
        return wanted

    def publish_payload(
        self, topic: str, data: bytes, chunk_size: int = DEFAULT_CHUNK, transfer: str | None = None
    ) -> tuple[str, list[mqtt.MQTTMessageInfo]]:
        """Publish ``data`` as chunks (QoS 1); returns the transfer id and publish handles."""
        transfer, chunks = iter_chunks(data, self.chunk_size(chunk_size), transfer)
        return transfer, [self.publish(topic, c, qos=1) for c in chunks]

    def get(self, timeout: float) -> Incoming | None:
        """The next message, waiting up to ``timeout``; raises ``CertificateRefused`` once the
        broker has refused this client's certificate (e.g. revoked while it ran)."""
        if self.refused:
            raise CertificateRefused(self.refused)
        return self.inbox.get(timeout)

    def _quiesce(self, timeout: float = 30.0, quiet: float = 0.3) -> None:
        """Unsubscribe and read what is still on its way (until nothing came for ``quiet``
        seconds, at most ``timeout``). Closing a socket with unread data sends a TCP reset,
        which can discard our DISCONNECT at the broker: it would then publish our last will
        (measured: a device flooding the coordinator made its final status "connection lost")."""
        if not self.subscriptions or not self.connected.is_set():
            return
        if time.monotonic() - self.last_arrival >= quiet:
            return  # nothing is streaming in: closing now is clean
        self.client.unsubscribe(list(self.subscriptions))
        start = time.monotonic()
        first = seen = self.received
        since = start
        while time.monotonic() < start + timeout and time.monotonic() - since < quiet:
            time.sleep(0.05)
            if self.received != seen:
                seen, since = self.received, time.monotonic()
        log.info(
            "%s: read %d messages still in flight in %.1f s before disconnecting%s",
            self.client_id,
            seen - first,
            time.monotonic() - start,
            "" if time.monotonic() - since >= quiet else " (more were coming)",
        )

    def stop(self, final: list[tuple[str, bytes, bool]] | None = None) -> None:
        """Publish ``final`` messages (topic, payload, retain), then disconnect cleanly."""
        self.stopping = True
        infos = [self.publish(t, p, qos=1, retain=r) for t, p, r in (final or [])]
        for info in infos:
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=3)
        self._quiesce()
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()
            self.inbox.close()
