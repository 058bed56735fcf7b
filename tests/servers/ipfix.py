"""Real IPFIX collectors for the ipfix sink tests, and what reads back from them.

- Nfcapd: nfdump's collector on 127.0.0.1 (UDP), read back with `nfdump -o json`.
- Nfacctd: pmacct's collector with its print plugin writing JSON lines.
- Tshark: a capture on loopback, decoded by Wireshark's cflow dissector.
- TcpCollector: IPFIX over TCP (neither nfcapd 1.7 nor nfacctd 1.7 takes
  it): a socket server that keeps every message it receives.
- decode(): messages decoded by the `ipfix` library (python3-ipfix), a
  reference implementation independent of conntracct's encoder.

All come from Debian packages that `./tasks.py test` installs (nfdump,
pmacct, tshark, python3-ipfix).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# An empty IPFIX message (header only, observation domain 0): wakes a
# collector blocked in recv without adding a record.
_EMPTY_MESSAGE = struct.pack("!HHIII", 10, 16, 0, 0, 0)


def _stop(proc: subprocess.Popen | None, nudge_port: int | None = None, timeout: float = 10,
          sig: int = signal.SIGTERM) -> None:
    """`sig`, an empty message now and then to wake a collector blocked in
    recv, then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if nudge_port:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(_EMPTY_MESSAGE, ("127.0.0.1", nudge_port))
        time.sleep(0.2)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


class Nfcapd:
    """nfdump's nfcapd on 127.0.0.1:<port>, files in its own directory."""

    def __init__(self, port: int | None = None):
        self.port = port or free_udp_port()
        self.dir = Path(tempfile.mkdtemp(prefix="conntracct-nfcapd-"))
        self.proc: subprocess.Popen | None = None

    def start(self) -> Nfcapd:
        self.log = open(self.dir / "nfcapd.log", "ab")   # noqa: SIM115 - closed in stop()
        (self.dir / "flows").mkdir(exist_ok=True)
        self.proc = subprocess.Popen(["nfcapd", "-b", "127.0.0.1", "-p", str(self.port),
                                      "-l", str(self.dir / "flows"), "-t", "3600"],
                                     stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while b"Startup" not in (self.dir / "nfcapd.log").read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nfcapd did not start:\n{self.log_text()}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """Stop; nfcapd writes its file on SIGTERM."""
        _stop(self.proc)
        self.proc = None
        self.log.close()

    def log_text(self) -> str:
        return (self.dir / "nfcapd.log").read_text(errors="replace")

    def flows(self) -> list[dict[str, Any]]:
        """Every record nfcapd stored, as `nfdump -o json` prints it."""
        out = subprocess.run(["nfdump", "-R", str(self.dir / "flows"), "-o", "json"],
                             capture_output=True, text=True, timeout=60, env=dict(os.environ, TZ="UTC"))
        text = out.stdout.strip()
        if not text.startswith("["):
            if "No matching flows" in text or not text:
                return []
            raise AssertionError(f"nfdump: {out.stdout}\n{out.stderr}")
        return json.loads(text)

    def cleanup(self) -> None:
        self.stop() if self.proc else None
        shutil.rmtree(self.dir, ignore_errors=True)


class Nfacctd:
    """pmacct's nfacctd with a print plugin writing one JSON object per record.

    Aggregated by everything that tells records apart (keys, post-NAT fields,
    start and end), so each exported record stays a line of its own."""

    AGGREGATE = ("src_host, dst_host, src_port, dst_port, proto, post_nat_src_host, post_nat_dst_host, "
                 "post_nat_src_port, post_nat_dst_port, timestamp_start, timestamp_end")

    def __init__(self, port: int | None = None):
        self.port = port or free_udp_port()
        self.dir = Path(tempfile.mkdtemp(prefix="conntracct-nfacctd-"))
        self.output = self.dir / "flows.json"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Nfacctd:
        conf = self.dir / "nfacctd.conf"
        conf.write_text(f"""daemonize: false
nfacctd_ip: 127.0.0.1
nfacctd_port: {self.port}
plugins: print[flows]
aggregate[flows]: {self.AGGREGATE}
print_output[flows]: json
print_output_file[flows]: {self.output}
print_output_file_append[flows]: true
print_refresh_time[flows]: 1
nfacctd_time_new: false
""")
        self.log = open(self.dir / "nfacctd.log", "ab")   # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(["nfacctd", "-f", str(conf)], stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while b"waiting for NetFlow/IPFIX data" not in (self.dir / "nfacctd.log").read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nfacctd did not start:\n{self.log_text()}")
            time.sleep(0.05)
        return self

    def log_text(self) -> str:
        return (self.dir / "nfacctd.log").read_text(errors="replace")

    def records(self) -> list[dict[str, Any]]:
        if not self.output.exists():
            return []
        return [json.loads(line) for line in self.output.read_text().splitlines() if line.strip()]

    def wait_for(self, predicate, timeout: float = 20) -> list[dict[str, Any]]:
        """Records once `predicate(records)` holds (the plugin writes every second)."""
        deadline = time.monotonic() + timeout
        while not predicate(records := self.records()) and time.monotonic() < deadline:
            time.sleep(0.3)
        return records

    def stop(self) -> None:
        # nfacctd leaves its receive loop only when one more packet arrives
        # (and ignores SIGTERM there: SIGINT, then it purges the plugin and
        # exits); its process group holds the plugin too.
        if self.proc is not None and self.proc.poll() is None:
            _stop(self.proc, nudge_port=self.port, sig=signal.SIGINT)
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc = None
        self.log.close()

    def cleanup(self) -> None:
        self.stop() if self.proc else None
        shutil.rmtree(self.dir, ignore_errors=True)


class Tshark:
    """A tshark capture of UDP to `port` on loopback, decoded as IPFIX."""

    def __init__(self, port: int):
        self.port = port
        self.dir = Path(tempfile.mkdtemp(prefix="conntracct-tshark-"))
        self.pcap = self.dir / "ipfix.pcap"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Tshark:
        self.log = open(self.dir / "tshark.log", "ab")   # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(["tshark", "-i", "lo", "-f", f"udp dst port {self.port}",
                                      "-w", str(self.pcap)],
                                     stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while b"Capturing on" not in (self.dir / "tshark.log").read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tshark did not start: {(self.dir / 'tshark.log').read_text()}")
            time.sleep(0.05)
        time.sleep(1.0)   # "Capturing on" comes a moment before dumpcap's filter is live
        return self

    def stop(self) -> None:
        time.sleep(0.5)   # let the last packets reach the file
        _stop(self.proc)
        self.proc = None
        self.log.close()

    def _read(self, *args: str) -> str:
        out = subprocess.run(["tshark", "-r", str(self.pcap), "-d", f"udp.port=={self.port},cflow", *args],
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise AssertionError(f"tshark -r: {out.stderr}")
        return out.stdout

    def packets(self) -> list[dict[str, Any]]:
        """Every captured packet as `tshark -T json` layers."""
        return [p["_source"]["layers"] for p in json.loads(self._read("-T", "json") or "[]")]

    def problems(self) -> list[str]:
        """What the dissector found wrong: expert-info warnings and errors
        (malformed packets, unusable templates), and packets it shows as a
        "partial flow" (a message longer than its datagram, which raises no
        expert info).  Empty for a clean capture."""
        expert = [line.strip() for line in self._read("-q", "-z", "expert,warn").splitlines()
                  if line.strip() and not line.startswith(("=", "Warns", "Errors", "   Frequency"))]
        partial = [line.strip() for line in self._read().splitlines()
                   if "partial flow" in line or "Malformed" in line]
        return expert + partial

    def payloads(self) -> list[bytes]:
        """The UDP payloads (IPFIX messages), in capture order."""
        return [bytes.fromhex(line.strip()) for line in self._read("-T", "fields", "-e", "udp.payload").splitlines()
                if line.strip()]

    def cleanup(self) -> None:
        self.stop() if self.proc else None
        shutil.rmtree(self.dir, ignore_errors=True)


class TcpCollector:
    """IPFIX over TCP on 127.0.0.1: accepts connections one after another and
    keeps each connection's messages (split by the header's length)."""

    def __init__(self, port: int = 0):
        self._server = socket.create_server(("127.0.0.1", port))
        self.port = self._server.getsockname()[1]
        self.connections: list[list[bytes]] = []
        self._lock = threading.Lock()
        self._current: socket.socket | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            messages: list[bytes] = []
            with self._lock:
                self.connections.append(messages)
                self._current = conn
            self._read(conn, messages)

    @staticmethod
    def _read(conn: socket.socket, messages: list[bytes]) -> None:
        buffer = b""
        with conn:
            while True:
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                buffer += chunk
                while len(buffer) >= 4:
                    length = struct.unpack_from("!H", buffer, 2)[0]
                    if len(buffer) < length:
                        break
                    messages.append(buffer[:length])
                    buffer = buffer[length:]

    def messages(self) -> list[bytes]:
        with self._lock:
            return [m for conn in self.connections for m in conn]

    def close(self) -> None:
        """Stop listening and drop the open connection (a collector going away)."""
        self._server.close()
        with self._lock:
            if self._current is not None:
                try:
                    self._current.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._thread.join(5)


# -- the reference decoder ---------------------------------------------------------

def _information_model(pen: int) -> None:
    import ipfix.ie

    ipfix.ie.use_iana_default()
    ipfix.ie.use_5103_default()
    for spec in ("reverseOctetTotalCount(29305/85)<unsigned64>[8]",
                 "reversePacketTotalCount(29305/86)<unsigned64>[8]",
                 f"conntrackZone({pen}/1)<unsigned16>[2]", f"conntrackMark({pen}/2)<unsigned32>[4]"):
        ipfix.ie.for_spec(spec)


def decode(messages: list[bytes], pen: int = 32473) -> list[tuple[dict[str, int], list[dict[str, Any]]]]:
    """(header, records) of each message, decoded by the `ipfix` library;
    templates carry over from message to message as a collector keeps them.
    Header: version, length, export_time, sequence, domain."""
    import ipfix.message

    _information_model(pen)
    buffer = ipfix.message.MessageBuffer()
    out = []
    for message in messages:
        version, length, export_time, sequence, domain = struct.unpack_from("!HHIII", message)
        buffer.from_bytes(message)
        records = [dict(r) for r in buffer.namedict_iterator()]
        out.append(({"version": version, "length": length, "export_time": export_time,
                     "sequence": sequence, "domain": domain}, records))
    return out
