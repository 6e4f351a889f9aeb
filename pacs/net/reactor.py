"""Event-driven waiting for the two threads pynetdicom runs per association.

pynetdicom 3.0 polls: the upper-layer (DUL) thread checks its socket and its
outgoing queue, and sleeps 1 ms whenever both are empty; the association's
reactor thread sleeps 1 ms at the top of *every* loop before it looks for a
decoded DIMSE message.  A C-STORE therefore waits up to three such sleeps —
the request's last PDU noticed by the DUL, the message noticed by the
reactor, the response noticed by the DUL — about 1.5 ms that no work fills.
Measured on loopback with a store handler that does nothing (dcmtk
``storescu``, 1,000 instances of 64x64, one association): ~390 instances/s
polling, ~1,100/s with the waits below.

What changes, for the associations the archive accepts
(:class:`EventDrivenRequestHandler`) and requests (:class:`EventDrivenAE`):

* the DUL thread, when idle, blocks in ``select`` on its socket and on a
  wake-up pipe that :meth:`EventDrivenDUL.send_pdu` and ``kill_dul`` write
  to, so incoming bytes and outgoing primitives are handled at once;
* data PDUs of an established association are written by the thread that
  sends the message, as the state machine would write them, instead of being
  handed to the DUL thread one by one;
* a received PDU is read into one buffer instead of 4 kB pieces, and a
  P-DATA-TF of an established association goes to DIMSE as views of that
  buffer, past pynetdicom's PDU objects and state machine
  (:meth:`EventDrivenDUL._read_pdu_data`);
* a DIMSE message the archive sends has its command set encoded directly
  (``pacs.net.commands``) and goes out whole, and C-GET/C-MOVE Pending
  responses are thinned to a few a second (:func:`_sending_messages_directly`);
* a C-STORE request, and the plain C-STORE response a retrieve's
  sub-operation waits for, are decoded with ``struct``
  (:class:`_StoreRequestReceiver`), not with pydicom;
* the reactor blocks on the DIMSE message queue, which the DUL thread fills
  as soon as a message is complete, and on nothing else: a ``send_c_*``
  call that pauses it (pynetdicom clears a checkpoint event for that) wakes
  it too, so the archive's own requests — C-MOVE sub-operations, ``pacs
  push`` — do not wait for it either; a sender of many such requests in a
  row leaves it paused between them, for up to ``LINGER_S``
  (:func:`release_reactor`).

Both still wake every ``IDLE_WAIT_S`` to run the checks the polling loops run
(timers, release and abort requests, a dead peer), so timeouts behave as
before.  Everything else — the state machine, PDU handling, the checkpoint
that ``send_c_*`` calls use to pause the reactor — is pynetdicom's own,
reached through the same attributes its loops use (pinned to pynetdicom 3.0
in ``pyproject.toml``; ``tests/unit/test_net_reactor.py`` checks them).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import queue
import select
import ssl
import struct
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator
from io import BytesIO

from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dul import DULServiceProvider
from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE, C_STORE
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.pdu import A_ABORT_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler

from pacs.net.commands import (
    command_set,
    data_set_of,
    part10_head,
    store_request,
    store_response,
    store_response_of,
)
from pacs.sockio import send_pieces

log = logging.getLogger(__name__)

# How long an idle thread waits before it re-checks timers and flags.  Work
# never waits for it: bytes, outgoing primitives and DIMSE messages wake the
# threads at once.
IDLE_WAIT_S = 0.005
# How long a sender waits for the reactor of its association to pause.
_HOLD_TIMEOUT_S = 5.0
# How long a reactor left paused between a sender's requests waits for the next one (see _WakingCheckpoint).
LINGER_S = 0.05
# A C-GET/C-MOVE Pending response (a progress report) at most this often per request.
PENDING_INTERVAL_S = 0.25
PENDING = 0xFF00
FIND_PENDING = (0xFF00, 0xFF01)
# Data PDUs sent directly are written at the end of their message, or once this much is held.
_BATCH_BYTES = 4 << 20
# Coalesced messages (C-FIND matches) are written once this much is held.
_COALESCE_BYTES = 64 << 10
# A message written in pieces where sendmsg cannot be used (see EventDrivenDUL._write_pieces):
# whole PDUs joined up to this many bytes a write.
_JOINED_BYTES = 1 << 20
# The longest PDU taken other than a P-DATA-TF (an A-ASSOCIATE-RQ of 128 presentation contexts
# with every transfer syntax pynetdicom knows is ~300 kB; the others are 10 bytes).
MAX_CONTROL_PDU_LENGTH = 1 << 20
# A P-DATA-TF may exceed the announced maximum by this much (see EventDrivenDUL._oversized).
_PDU_LENGTH_SLACK = 64 << 10
# The most of a message that pynetdicom assembles that the archive lets it hold (see
# _StoreRequestReceiver._to_pynetdicom): a command set is a few hundred bytes; the data set of
# anything but a C-STORE (a C-FIND identifier, a list of UIDs) a few kB, rarely a few MB.
MAX_COMMAND_SET_BYTES = 1 << 20
MAX_OTHER_DATA_SET_BYTES = 16 << 20


class EventDrivenDUL(DULServiceProvider):
    """pynetdicom's DUL provider, waiting in ``select`` instead of sleeping."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        # Held for every PDU written to the socket, so that PDUs sent directly
        # by the calling thread (see send_pdu) and by this thread never interleave.
        self._send_lock = threading.RLock()
        self._held: list[bytes] = []  # encoded data PDUs of the message being sent (see _send_data_now)
        self._held_bytes = 0
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)

    @property
    def socket(self) -> AssociationSocket | None:
        return self._socket

    @socket.setter
    def socket(self, sock: AssociationSocket | None) -> None:
        # Every socket attached (an acceptor's when adopted, a requestor's by
        # Association.set_socket) reads each PDU into one buffer.  pynetdicom
        # assigns the same socket again on every read: only a new one is set up.
        if sock is not None and sock is not getattr(self, "_socket", None):
            sock.recv = types.MethodType(_recv_exactly, sock)
        self._socket = sock

    def adopt(self, previous: DULServiceProvider) -> None:
        """Take over a provider that was created but never started.

        An acceptor's socket is attached (and its "connection open" event
        queued) before the association starts; the timers carry the
        association's network and ARTIM timeouts.
        """
        self.socket = previous.socket
        self.event_queue = previous.event_queue
        self._idle_timer = previous._idle_timer
        self.artim_timer = previous.artim_timer

    def send_pdu(self, primitive) -> None:  # noqa: ANN001 - pynetdicom's primitive types
        if isinstance(primitive, P_DATA) and self._send_data_now(primitive):
            return
        super().send_pdu(primitive)
        self._wake()

    def _send_data_now(self, primitive: P_DATA) -> bool:
        """Send a P-DATA-TF PDU from the calling thread, if that is what the state machine would do.

        In Sta6 (association established) with nothing queued before it, the
        state machine's answer to a P-DATA request is to send the PDU and stay
        in Sta6 (PS3.8 9.2, action DT-1).  Doing that here spares each PDU two
        thread hand-offs; a message of many PDUs (a 0.5 MB image to a peer
        that takes 16 kB PDUs is 32 of them) otherwise waits for the DUL
        thread to be scheduled for each one.  The PDUs of one message are
        written to the socket together when its last fragment is encoded (or
        every ``_BATCH_BYTES``), one system call instead of one per PDU.
        Anything else — another state, a queued release or abort — goes
        through the state machine as before, after the PDUs held back.
        """
        with self._send_lock:
            if not self._may_send_now():
                self._flush()
                return False
            pdu = P_DATA_TF(primitive)
            encoded = pdu.encode()
            self._held.append(encoded)
            self._held_bytes += len(encoded)
            evt.trigger(self.assoc, evt.EVT_PDU_SENT, {"pdu": pdu})
            last = any(value[0] & 0x02 for _, value in primitive.presentation_data_value_list)
            if last or self._held_bytes >= _BATCH_BYTES:
                self._flush()
            return True

    def send_message_now(self, context_id: int, command: bytes, dataset: bytes | memoryview | None,
                         max_pdu_length: int, *, coalesce: bool = False) -> bool:
        """Write one whole DIMSE message (encoded command set and data set) as P-DATA-TF PDUs, now.

        The fragmenting of PS3.8 9.3.5 / Annex E: one presentation data value
        per PDU, each at most ``max_pdu_length`` (the peer's maximum; 0 means
        no limit) including its 6-byte item header, the command's fragments
        before the data set's, the last of each flagged.  Only where the state
        machine would do the same (see :meth:`_send_data_now`); returns False
        otherwise, and the caller sends the message the usual way.  For a
        large data set this replaces a P-DATA primitive, a PDU object and an
        encode per fragment by one buffer and one system call.

        ``coalesce`` (for a stream of small messages, C-FIND matches) holds
        the message back with those before it until ``_COALESCE_BYTES`` are
        held, another message is sent, or this thread's loop next goes idle
        (within ``IDLE_WAIT_S``): one system call for many responses.
        """
        with self._send_lock:
            if not self._may_send_now():
                return False
            if not coalesce:
                return self.send_encoded_now(message_pieces(context_id, command, dataset, max_pdu_length))
            message = encode_message(context_id, command, dataset, max_pdu_length)
            self._held.append(message)
            self._held_bytes += len(message)
            if self._held_bytes >= _COALESCE_BYTES:
                self._flush()
            return True

    def send_encoded_now(self, pieces: list[bytes | memoryview]) -> bool:
        """Write a message's :func:`message_pieces`, now; False (nothing sent) where
        :meth:`send_message_now` would return False."""
        with self._send_lock:
            if not self._may_send_now():
                return False
            self._flush()
            self._write_pieces(pieces)
            return True

    def _write_pieces(self, pieces: list[bytes | memoryview]) -> None:
        """Write :func:`message_pieces` without joining them (caller holds the send lock).

        Joined, a retrieved object is in memory twice while it is sent, as
        read and as PDUs: 523 MiB of server at its peak for a 210 MB
        multi-frame object, against one copy when the pieces (the PDU headers
        and views of the object between them) go to ``sendmsg`` as they are.
        An SSL socket has no ``sendmsg``, and a handler bound to
        EVT_DATA_SENT is handed the bytes written: there, whole PDUs are
        joined up to ``_JOINED_BYTES`` a write.  A failure queues Evt17
        (connection closed), as pynetdicom's ``AssociationSocket.send`` does.
        """
        sock = self.socket.socket
        if isinstance(sock, ssl.SSLSocket) or self.assoc.get_handlers(evt.EVT_DATA_SENT):
            for joined in _joined_pdus(pieces, _JOINED_BYTES):
                self.socket.send(joined)
            return
        try:
            send_pieces(sock, pieces)
        except Exception:  # as AssociationSocket.send: the connection is gone, or timed out
            self.socket.event_queue.put("Evt17")

    def _read_pdu_data(self) -> None:
        """pynetdicom's read of one PDU, with a P-DATA-TF PDU of an established association handed on directly.

        pynetdicom copies a received PDU three more times (into the PDU
        buffer, into ``bytes``, into each presentation data value), builds
        PDU and item objects, queues an event and runs the state machine,
        whose action in Sta6 for a P-DATA-TF (DT-2) is to hand DIMSE the
        P-DATA indication.  Here the values are views of the one buffer the
        PDU was read into, and DIMSE gets them at once: a 0.5 MB image in
        128 kB PDUs is six PDUs.  Anything else (another PDU type, another
        state, an event already queued, a handler bound to the PDU, data or
        state-machine events) goes through pynetdicom, the PDU header it was
        read by handed back to it.
        """
        assoc = self.assoc
        if self.socket is None:
            super()._read_pdu_data()
            return
        try:
            header = self.socket.recv(6)
        except OSError as exc:  # TimeoutError and ssl.SSLError included
            log.error("association with %s: reading a PDU failed: %s", self._peer(), exc)
            self.event_queue.put("Evt17")  # transport connection closed, as pynetdicom reports it
            return
        whole = len(header) == 6  # else the peer closed: pynetdicom reports it
        length = _PDU_LENGTH.unpack_from(header, 2)[0] if whole else 0
        if whole and self._oversized(header[0], length):
            return
        if whole and not 0x01 <= header[0] <= 0x07:
            # Answered as pynetdicom answers it (Evt19: A-ABORT), the peer named in the log, and its body
            # (at most MAX_CONTROL_PDU_LENGTH, see _oversized) read past: pynetdicom left it to be read
            # as the next PDU's header, and the abort waited for bytes that never came.
            log.error("association with %s: a PDU of unknown type 0x%02X (%d bytes); aborting", self._peer(),
                      header[0], length + 6)
            try:
                self.socket.recv(length)
            except OSError:
                self.event_queue.put("Evt17")  # gone meanwhile: the connection closed, as pynetdicom reports it
                return
            self.event_queue.put("Evt19")
            return
        if (not whole or header[0] != 0x04 or self.state_machine.current_state != "Sta6"
                or not self.event_queue.empty() or not self._recv_pdu.empty()
                or not isinstance(assoc.dimse.receive_primitive, _StoreRequestReceiver)
                or any(assoc.get_handlers(e) for e in (evt.EVT_DATA_RECV, evt.EVT_PDU_RECV, evt.EVT_FSM_TRANSITION))):
            self.socket._pacs_pushed_back = bytes(header)
            super()._read_pdu_data()
            return
        body = self.socket.recv(length)
        if len(body) != length:
            log.error("The received PDU is shorter than expected (%d of %d bytes received)", len(body) + 6, length + 6)
            self.event_queue.put("Evt17")  # transport connection closed, as pynetdicom reports it
            return
        values = _presentation_data_values(body)
        if values is None:
            log.error("Unable to decode the received PDU data: a malformed P-DATA-TF")
            self.event_queue.put("Evt19")  # an invalid PDU, as pynetdicom reports it
            return
        primitive = P_DATA()
        primitive._presentation_data_value_list = values  # views: the setter takes only bytes
        assoc.dimse.receive_primitive(primitive)  # DT-2; the state stays Sta6

    def _decode_pdu(self, bytestream: bytearray):  # noqa: ANN202 - pynetdicom's (PDU, event)
        """pynetdicom's decoding of a PDU, a failure logged in one line that names the peer.

        pynetdicom then answers it as an invalid PDU (Evt19: A-ABORT); its own
        tracebacks of it are left out of the log (``pacs.net.transport``).
        """
        try:
            return super()._decode_pdu(bytestream)
        except Exception as exc:
            log.error("association with %s: a PDU of type 0x%02X (%d bytes) could not be decoded: %s; aborting",
                      self._peer(), bytestream[0], len(bytestream), exc)
            exc.pacs_logged = True
            raise

    def _oversized(self, pdu_type: int, length: int) -> bool:
        """A PDU announced longer than the archive takes: refused before any of it is read.

        A PDU is read into one buffer of the length its header announces;
        unchecked, six bytes from anyone who can connect made the process
        allocate and clear up to 4 GiB.  A P-DATA-TF may be as long as the
        maximum this side announced at association (with
        ``_PDU_LENGTH_SLACK`` for peers that count it differently; no limit
        where that was 0), any other PDU ``MAX_CONTROL_PDU_LENGTH``.  The
        association is aborted (A-ABORT, invalid PDU parameter value) and
        the reason logged with the peer and the length.
        """
        if pdu_type == 0x04:
            assoc = self.assoc
            local = assoc.acceptor if assoc.is_acceptor else assoc.requestor
            announced = local.maximum_length
            if not announced or length <= announced + _PDU_LENGTH_SLACK:
                return False
            limit = f"the {announced} bytes announced as this side's maximum"
        elif length <= MAX_CONTROL_PDU_LENGTH:
            return False
        else:
            limit = f"the {MAX_CONTROL_PDU_LENGTH} bytes taken for a PDU of type 0x{pdu_type:02X}"
        log.error("association with %s: a PDU of type 0x%02X announced %d bytes, more than %s; aborting",
                  self._peer(), pdu_type, length, limit)
        negotiating = not self.assoc.is_established
        self._abort_now(reason=0x06)  # invalid PDU parameter value
        if negotiating:
            self.to_user_queue.put(None)  # the association thread, waiting on ACSE, ends at once
        return True

    def _peer(self) -> str:
        """The peer, for the log: its AE title once known, and its address."""
        assoc = self.assoc
        title = (assoc.requestor.ae_title if assoc.is_acceptor else assoc.acceptor.ae_title) or ""
        try:
            host, port = self.socket.socket.getpeername()[:2]
            address = f"{host}:{port}"
        except (AttributeError, OSError):
            address = "a closed connection"
        return f"{title.strip()} at {address}" if title.strip() else address

    def _flush_held(self) -> None:
        if self._held:
            with self._send_lock:
                self._flush()

    def _may_send_now(self) -> bool:
        """Established (Sta6) with no primitive queued before: the state machine would send a P-DATA as is."""
        return self.state_machine.current_state == "Sta6" and self.to_provider_queue.empty()

    def _flush(self) -> None:
        """Write the data PDUs held back (caller holds the send lock)."""
        if not self._held:
            return
        data = self._held[0] if len(self._held) == 1 else b"".join(self._held)
        self._held.clear()
        self._held_bytes = 0
        self.socket.send(data)  # a failure queues Evt17 (connection closed), as any send does

    def _send(self, pdu) -> None:  # noqa: ANN001 - pynetdicom's PDU types
        with self._send_lock:
            self._flush()  # PDUs keep their order on the wire
            super()._send(pdu)

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_write, b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake-up is pending anyway) or closed (the thread has ended)

    def _wait_for_work(self) -> None:
        """Block until the peer sends something, a primitive is queued, or IDLE_WAIT_S passes."""
        waiting = [self._wake_read]
        sock = self.socket.socket if self.socket is not None else None
        if sock is not None:
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return  # decrypted bytes buffered in the SSL object: select would not see them
            try:
                if sock.fileno() >= 0:
                    waiting.append(sock)
            except OSError:
                pass
        try:
            ready, _, _ = select.select(waiting, [], [], IDLE_WAIT_S)
        except (OSError, ValueError):
            return  # the socket closed under us: the loop's own checks report it
        if self._wake_read in ready:
            try:
                while os.read(self._wake_read, 4096):
                    pass
            except (BlockingIOError, OSError):
                pass

    def run_reactor(self) -> None:
        """The DUL thread: pynetdicom's loop (one primitive sent or one PDU read, then one event), waiting when idle."""
        self._idle_timer.start()
        self._tls_handshake()
        idle = False
        try:
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                if idle:
                    self._flush_held()  # coalesced messages wait at most one idle period
                    self._wait_for_work()
                if self._kill_thread:
                    return
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    if not self._process_recv_primitive() and self._is_transport_event():
                        self._idle_timer.restart()
                except Exception:
                    log.exception("DICOM upper layer failed; aborting the association")
                    self._abort_now()
                    return
                try:
                    event = self.event_queue.get_nowait()
                except queue.Empty:
                    idle = True
                    continue
                self.state_machine.do_action(event)
                idle = False
        finally:
            self._end_wait_for_request()
            for fd in (self._wake_read, self._wake_write):
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _tls_handshake(self) -> None:
        """The TLS handshake of an accepted connection, which the server leaves to this thread (pacs.net.scp).

        Within the ACSE timeout, the time pynetdicom gives a peer to send its
        association request.  A failed handshake (a plain DICOM peer, a
        client that says nothing) ends the association as one whose request
        never came: logged, and the state machine told the connection closed
        (Evt17), which ends this thread (see :meth:`_end_wait_for_request`).
        """
        sock = self.socket.socket if self.socket is not None else None
        if not isinstance(sock, ssl.SSLSocket) or not sock.server_side or sock.version() is not None:
            return  # not TLS, a requestor's connection, or shaken hands already
        peer = self._peer()  # before the handshake: the connection may not outlive it
        try:
            sock.settimeout(self.assoc.acse_timeout)
            sock.do_handshake()
            sock.settimeout(None)
        except (OSError, ValueError) as exc:
            log.warning("TLS handshake with %s failed: %s", peer, exc or type(exc).__name__)
            self.event_queue.put("Evt17")  # the loop then ends, and _end_wait_for_request wakes the association

    def _end_wait_for_request(self) -> None:
        """An accepted connection that ends before its A-ASSOCIATE-RQ ends its association thread too, at once.

        That thread waits for the request for up to the ACSE timeout; when the
        connection closes first (a TCP health check or a port scan connects
        and closes; a TLS handshake fails) pynetdicom leaves it waiting the
        whole time, counted among the associations the AE may hold at once:
        100 connections opened and closed left ~50 such threads in each of two
        workers for a minute, and every association was rejected as over the
        local limit.  Handed the nothing it gets on a timeout, it ends now.
        """
        if awaiting_request(self.assoc) and self.to_user_queue.empty():
            self.to_user_queue.put(None)

    def _abort_now(self, reason: int = 0x00) -> None:
        """Send an A-ABORT past the state machine, whose state can no longer be trusted."""
        pdu = A_ABORT_RQ()
        pdu.source = 0x02  # service provider
        pdu.reason_diagnostic = reason
        try:
            self.socket.send(pdu.encode())
        except Exception:  # noqa: BLE001 - the connection may be gone already
            pass
        assoc = self.assoc
        assoc.is_aborted = True
        assoc.is_established = False
        assoc._kill = True
        self._kill_thread = True


class _WakingCheckpoint(threading.Event):
    """The reactor's pause checkpoint, which also wakes a reactor waiting for a message.

    pynetdicom's ``send_c_*`` methods clear the checkpoint and then wait until
    the reactor reports itself paused; a reactor blocked on the message queue
    must notice at once, or every request the archive sends waits for it.

    A sender of many requests in a row (a C-MOVE's sub-operations, ``pacs
    push``) may leave the reactor paused between them (:meth:`linger`,
    :meth:`take_lingering`): pausing and resuming it around every request
    costs three thread switches each time.  A reactor left paused resumes by
    itself once the sender has not come back for ``LINGER_S``, so its checks
    (a release or abort from the peer, the network timeout) wait no longer
    than that.
    """

    def __init__(self, messages: queue.Queue) -> None:
        super().__init__()
        self._messages = messages
        self._parking = threading.Condition()
        self._parked = False  # the reactor is blocked in wait(): cleared only by set()
        self._lingering = False  # left paused by a sender between its requests
        self._taken = False  # ... and that sender (or another) is using the pause again
        self._lingered_at = 0.0

    def clear(self) -> None:
        super().clear()
        with self._messages.not_empty:
            self._messages.not_empty.notify_all()

    def set(self) -> None:
        with self._parking:
            self._parked = self._lingering = self._taken = False
        super().set()

    def wait(self, timeout: float | None = None) -> bool:
        with self._parking:
            if self.is_set():
                return True
            self._parked = True
            self._parking.notify_all()
        if timeout is not None:
            return super().wait(timeout)
        while True:
            with self._parking:
                remaining = LINGER_S
                if self._lingering and not self._taken:
                    remaining = self._lingered_at + LINGER_S - time.monotonic()
                    if remaining <= 0:  # the sender has not come back: resume
                        self._parked = self._lingering = False
                        super().set()
                        return True
            if super().wait(remaining):
                return True

    def linger(self) -> None:
        """Instead of :meth:`set` after a request: leave the reactor paused for the sender's next one."""
        with self._parking:
            self._lingering, self._taken, self._lingered_at = True, False, time.monotonic()

    def take_lingering(self) -> bool:
        """Instead of :meth:`clear` and :meth:`hold`: use a pause left by :meth:`linger`, if it still holds."""
        with self._parking:
            if self._lingering and self._parked and not self.is_set():
                self._taken = True
                return True
            return False

    def hold(self, alive: Callable[[], bool], timeout: float) -> bool:
        """After :meth:`clear`: return once the reactor is blocked here (False: it stopped, or ``timeout``).

        A sender that holds the reactor this way is woken by the reactor
        itself, instead of polling its ``_is_paused`` flag (a sleep of 0.1 ms
        and a thread switch per C-STORE sub-operation).
        """
        deadline = time.monotonic() + timeout
        with self._parking:
            while not self._parked:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not alive():
                    return False
                self._parking.wait(min(remaining, IDLE_WAIT_S))
        return True


class _WakingQueue(queue.Queue):
    """The DUL's queue of primitives for the upper layer, which also wakes a reactor waiting for a message.

    The reactor checks for a release request only between messages; without
    this, an A-RELEASE-RQ waits up to IDLE_WAIT_S for its answer (measured:
    5 ms of every association).
    """

    def __init__(self, messages: queue.Queue) -> None:
        super().__init__()
        self._messages = messages

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:  # noqa: ANN001
        super().put(item, block, timeout)
        with self._messages.not_empty:
            self._messages.not_empty.notify_all()


def _next_message(assoc: Association) -> tuple[int | None, object | None]:
    """A decoded DIMSE message, waiting up to IDLE_WAIT_S; none while a sender has paused the reactor."""
    messages = assoc.dimse.msg_queue
    checkpoint = assoc._reactor_checkpoint
    with messages.not_empty:
        if not messages.queue and checkpoint.is_set():
            messages.not_empty.wait(IDLE_WAIT_S)
        if not messages.queue or not checkpoint.is_set():
            return None, None  # nothing yet, or the message belongs to the paused sender
        item = messages.queue.popleft()
        messages.not_full.notify()  # as Queue.get does
        return item


_PDU_AND_PDV_HEADER = struct.Struct(">BBLLBB")  # PDU type, reserved, PDU length, PDV length, context ID, control


_PDU_LENGTH = struct.Struct(">L")
_PDV_HEADER = struct.Struct(">LB")  # item length, presentation context ID


def _presentation_data_values(body: bytearray) -> list[list] | None:
    """``[context ID, view of the control header and fragment]`` of each item of a P-DATA-TF's body, or None if malformed."""
    values, view, position = [], memoryview(body), 0
    while position < len(body):
        if len(body) - position < _PDV_HEADER.size:
            return None
        length, context_id = _PDV_HEADER.unpack_from(body, position)
        end = position + 4 + length
        if length < 2 or end > len(body):  # at least the context ID and the control header
            return None
        values.append([context_id, view[position + 5:end]])
        position = end
    return values or None


def message_pieces(context_id: int, command: bytes, dataset: bytes | memoryview | None,
                   max_pdu_length: int) -> list[bytes | memoryview]:
    """A whole DIMSE message as P-DATA-TF PDUs, in pieces: each PDU's header (with its PDV's), then a
    view of the command set or data set it carries; nothing of the data set is copied."""
    parts: list[bytes | memoryview] = []
    _fragment(parts, context_id, memoryview(command), 0x01, max_pdu_length)
    if dataset is not None:
        _fragment(parts, context_id, memoryview(dataset), 0x00, max_pdu_length)
    return parts


def encode_message(context_id: int, command: bytes, dataset: bytes | memoryview | None, max_pdu_length: int) -> bytes:
    """A whole DIMSE message as the P-DATA-TF PDUs :meth:`EventDrivenDUL.send_message_now` writes, joined."""
    return b"".join(message_pieces(context_id, command, dataset, max_pdu_length))


def _joined_pdus(pieces: list[bytes | memoryview], limit: int) -> Iterator[bytes]:
    """:func:`message_pieces` joined into writes of whole PDUs, each at most ``limit`` bytes unless one PDU is
    longer; built one write at a time as the caller takes them."""
    held: list[bytes | memoryview] = []
    held_bytes = 0
    for header, payload in zip(pieces[::2], pieces[1::2]):
        size = len(header) + len(payload)
        if held and held_bytes + size > limit:
            yield b"".join(held)
            held, held_bytes = [], 0
        held += (header, payload)
        held_bytes += size
    if held:
        yield b"".join(held)


def _fragment(parts: list, context_id: int, data: memoryview, control: int, max_pdu_length: int) -> None:
    """Append P-DATA-TF PDUs carrying ``data`` as PDVs of one kind (control 0x01: command, 0x00: data set)."""
    size = len(data) if max_pdu_length == 0 else max_pdu_length - 6
    if size <= 0:
        raise ValueError(f"expected a maximum PDU length above 6, got {max_pdu_length}")
    start = 0
    while True:
        piece = data[start:start + size]
        start += len(piece)
        last = start >= len(data)
        flags = control | (0x02 if last else 0x00)
        parts.append(_PDU_AND_PDV_HEADER.pack(0x04, 0x00, len(piece) + 6, len(piece) + 2, context_id, flags))
        parts.append(piece)
        if last:
            return


def _run_reactor(assoc: Association) -> None:
    """The association's reactor: serve each DIMSE request as soon as it is decoded.

    The checks after each wait are pynetdicom's: a release request is
    answered, an abort or a dead upper layer ends the association, and the
    network timeout releases or aborts it as configured.
    """
    assoc._is_paused = False
    while not assoc._kill:
        # send_c_*() calls clear the checkpoint and wait for _is_paused, so the
        # reactor never takes their responses off the queue.
        assoc._is_paused = True
        assoc._reactor_checkpoint.wait()
        assoc._is_paused = False
        context_id, message = _next_message(assoc)
        if message is not None and not _served_store(assoc, message, context_id):
            assoc._serve_request(message, context_id)

        if assoc.is_established and assoc.acse.is_release_requested():
            assoc.acse.send_release(is_response=True)
            assoc.is_released = True
            assoc.is_established = False
            evt.trigger(assoc, evt.EVT_RELEASED, {})
            assoc.kill()
            return
        if assoc.acse.is_aborted():
            assoc.dul.receive_pdu(wait=False)  # so EVT_ACSE_RECV fires for the abort
            assoc.is_aborted = True
            assoc.is_established = False
            evt.trigger(assoc, evt.EVT_ABORTED, {})
            assoc.kill()
            return
        if not assoc.dul.is_alive():
            assoc.kill()
            return
        if assoc.dul.idle_timer_expired():
            log.warning("association with %s: network timeout, no data for %s s",
                        assoc.requestor.ae_title, assoc.network_timeout)
            if assoc.network_timeout_response == "A-RELEASE":
                assoc._is_paused = True
                assoc._reactor_checkpoint.wait()
                assoc.release()
                assoc._is_paused = False
            else:
                assoc.abort()
            assoc.kill()
            return


def _served_store(assoc: Association, request: object, context_id: int) -> bool:
    """Serve a C-STORE-RQ that :class:`_StoreRequestReceiver` decoded, as pynetdicom's Storage SCP would.

    pynetdicom's ``_serve_request`` looks the service class up, builds it,
    builds the response primitive through its validating setters, runs the
    handler, checks the status and encodes the response from a dataset:
    about a tenth of the server's time per small instance.  Here the handler
    runs through ``evt.trigger`` as there, and a Success is answered with a
    command set encoded directly (``pacs.net.commands.store_response``) and
    sent whole.  Returns False, and pynetdicom serves the request, for
    anything else: a request pynetdicom decoded, one under a context the
    association did not accept or whose SOP class maps to another service
    (extended negotiation, unrestricted storage), during a release, or with a
    handler bound to EVT_DIMSE_SENT.  Any other status the handler returns,
    or an exception it raises, is answered by pynetdicom's own code.
    """
    if type(request) is not C_STORE or not getattr(request, "_pacs_decoded", False) or assoc._sent_release:
        return False
    context = assoc._accepted_cx.get(context_id)
    class_uid = request.AffectedSOPClassUID
    if (context is None or not request.is_valid_request or _config.UNRESTRICTED_STORAGE_SERVICE
            or class_uid in assoc.acceptor.accepted_common_extended
            or uid_to_service_class(class_uid) is not StorageServiceClass
            or assoc.get_handlers(evt.EVT_DIMSE_SENT)):
        return False
    assoc.dimse.cancel_req = {}
    assoc._is_paused = True  # as _serve_request: the handler may call send_c_*()
    try:
        status = evt.trigger(assoc, evt.EVT_C_STORE, {"request": request, "context": context.as_tuple})
    except Exception:  # noqa: BLE001 - pynetdicom's answer to a failing handler (0xC211), below
        log.exception("the C-STORE handler failed on %s", request.AffectedSOPInstanceUID)
        status = 0xC211
    finally:
        assoc._is_paused = False
        assoc.dimse.cancel_req = {}
    if not assoc.is_established:
        return True  # the handler aborted or released the association
    if status == 0x0000 and type(status) is int:
        command = store_response(request.MessageID, class_uid, request.AffectedSOPInstanceUID, 0x0000)
        if command is not None and assoc.dul.send_message_now(context_id, command, None,
                                                              assoc.dimse.maximum_pdu_size):
            return True
    rsp = C_STORE()
    rsp.MessageID = rsp.MessageIDBeingRespondedTo = request.MessageID
    rsp.AffectedSOPInstanceUID = request.AffectedSOPInstanceUID
    rsp.AffectedSOPClassUID = class_uid
    rsp = StorageServiceClass(assoc).validate_status(status, rsp)
    assoc.dimse.send_msg(rsp, context_id)
    return True


def hold_reactor(assoc: Association) -> None:
    """Return once the association's reactor is blocked at its checkpoint (or has stopped).

    Called from the reactor itself — a C-GET's sub-operations go out on the
    association whose request the reactor is serving — it returns at once:
    a reactor serving a request takes no message off the queue.  A reactor
    that :func:`release_reactor` left paused is taken as it is.
    """
    checkpoint = assoc._reactor_checkpoint
    if isinstance(checkpoint, _WakingCheckpoint) and checkpoint.take_lingering():
        return
    checkpoint.clear()
    if threading.current_thread() is assoc:
        return
    if isinstance(checkpoint, _WakingCheckpoint):  # an event-driven association: the reactor says when
        checkpoint.hold(assoc.is_alive, _HOLD_TIMEOUT_S)
        return
    assoc._is_paused = False
    deadline = time.monotonic() + _HOLD_TIMEOUT_S
    while not assoc._is_paused and assoc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.0001)


def release_reactor(assoc: Association, *, more_to_send: bool = False) -> None:
    """Let the reactor held by :func:`hold_reactor` go on; with ``more_to_send``, only once the sender stops.

    ``more_to_send`` (a sender of requests in a row, after a complete
    exchange) leaves an event-driven reactor paused for the next request,
    up to ``LINGER_S``; the reactor's own thread, or any other kind of
    association, resumes at once.
    """
    checkpoint = assoc._reactor_checkpoint
    if more_to_send and isinstance(checkpoint, _WakingCheckpoint) and threading.current_thread() is not assoc:
        checkpoint.linger()
    else:
        checkpoint.set()


def _recv_exactly(sock: AssociationSocket, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv`` reading straight into one buffer.

    pynetdicom reads 4 kB at a time and appends each piece to a growing
    array: for a 0.5 MB PDU that is 128 calls and as many copies.  Same
    contract: block until ``nr_bytes`` have come, or return what came before
    the peer closed the connection.
    """
    buffer = bytearray(nr_bytes)
    view = memoryview(buffer)
    got = 0
    pushed_back = getattr(sock, "_pacs_pushed_back", b"")  # see EventDrivenDUL._read_pdu_data
    if pushed_back:
        got = min(len(pushed_back), nr_bytes)
        view[:got] = pushed_back[:got]
        sock._pacs_pushed_back = pushed_back[got:]
    while got < nr_bytes:
        n = sock.socket.recv_into(view[got:], nr_bytes - got)
        if n == 0:
            del view
            del buffer[got:]
            return buffer
        got += n
    return buffer


def _sending_messages_directly(assoc: Association, send_msg: Callable[[object, int], None]) -> Callable:
    """Wrap ``assoc.dimse.send_msg``: command sets encoded directly, sent whole; retrieve progress thinned.

    pynetdicom turns every primitive into a pydicom command set and encodes
    it (``pacs.net.commands`` explains the cost), then hands each fragment
    to the state machine.  Here the command set is encoded by
    :func:`pacs.net.commands.command_set` and the message written in one
    piece by ``send_message_now``; what that cannot take (a failure with an
    Error Comment, a state where the machine must see the PDU) goes the usual
    way, as does everything when a handler is bound to ``EVT_DIMSE_SENT``
    (none of the archive's is: the event's argument is pynetdicom's message).

    C-GET and C-MOVE Pending responses — optional in PS3.4 C.4.2.3 and
    C.4.3.3, a progress report — go out at most every ``PENDING_INTERVAL_S``
    per request instead of after every sub-operation: the final response
    carries the counts, and a peer still sees progress several times a second.

    C-FIND matches share one command set per query and are coalesced
    (``send_message_now(coalesce=True)``): thousands of small responses go
    out in a few system calls.
    """
    last_pending: dict[int, float] = {}
    find_command: list = [None, None]  # (key, encoded command set) of the last C-FIND match sent

    def send(primitive, context_id: int) -> None:  # noqa: ANN001 - a DIMSE primitive
        responding_to = primitive.MessageIDBeingRespondedTo
        if (isinstance(primitive, C_FIND) and responding_to is not None and primitive.Status in FIND_PENDING
                and primitive.Identifier is not None and not assoc.get_handlers(evt.EVT_DIMSE_SENT)):
            # a match: the same command set as the one before, coalesced with the matches around it
            key = (responding_to, primitive.Status, primitive.AffectedSOPClassUID)
            if find_command[0] != key:
                find_command[:] = [key, command_set(primitive)]
            if find_command[1] is not None and assoc.dul.send_message_now(
                    context_id, find_command[1], primitive.Identifier.getbuffer(), assoc.dimse.maximum_pdu_size,
                    coalesce=True):
                return
        if isinstance(primitive, (C_GET, C_MOVE)) and responding_to is not None:
            if primitive.Status == PENDING:
                now = time.monotonic()
                if now - last_pending.get(responding_to, -math.inf) < PENDING_INTERVAL_S:
                    return
                last_pending[responding_to] = now
            else:
                last_pending.pop(responding_to, None)
        if not assoc.get_handlers(evt.EVT_DIMSE_SENT):
            command = command_set(primitive)
            if command is not None:
                data = data_set_of(primitive)
                if assoc.dul.send_message_now(context_id, command, data.getbuffer() if data else None,
                                              assoc.dimse.maximum_pdu_size):
                    return
        send_msg(primitive, context_id)

    return send


class _StoreRequestReceiver:
    """``DIMSEServiceProvider.receive_primitive`` with C-STORE requests and responses decoded directly.

    pynetdicom decodes every command set with pydicom (about 0.2 ms of
    Python for a C-STORE response) and copies each data set fragment before
    writing it to the message's buffer.  A C-STORE-RQ is decoded by
    :func:`pacs.net.commands.store_request` instead, and its data set
    fragments are written to the buffer from views of the received PDVs; a
    plain C-STORE-RSP — the peer's answer to each sub-operation of a C-GET
    or C-MOVE, on whose arrival the next sub-operation waits — by
    :func:`pacs.net.commands.store_response_of`.  Every other message, one
    that those decoders leave alone, and every message while a handler is
    bound to EVT_DIMSE_RECV (which is handed pynetdicom's decoded message)
    take pynetdicom's path.
    """

    def __init__(self, dimse) -> None:  # noqa: ANN001 - pynetdicom's DIMSEServiceProvider
        self.dimse = dimse
        self.pynetdicom = dimse.receive_primitive
        self.request = None  # the C-STORE-RQ whose data set is arriving
        self.data_set = BytesIO()
        self.digest = None  # the SHA-256 of its Part 10 object, so far
        # Bytes of a data set past the AE's max_received_object_bytes, whose rest is
        # dropped as it arrives: the handler refuses it without its bytes (0 otherwise).
        self.oversized = 0
        # The AE's limits (EventDrivenAE): a C-STORE data set past the first is refused as it
        # arrives, one past the second goes on in an unnamed file (see _spool).
        ae = dimse.assoc.ae
        self.max_bytes = getattr(ae, "max_received_object_bytes", None) or math.inf
        self.spool_at = getattr(ae, "spool_received_bytes", None) or math.inf

    def __call__(self, primitive: P_DATA) -> None:
        dimse = self.dimse
        if self.request is None and (dimse.message is not None or type(primitive) is not P_DATA
                                     or _config.STORE_RECV_CHUNKED_DATASET
                                     or dimse.assoc.get_handlers(evt.EVT_DIMSE_RECV)):
            self._to_pynetdicom(primitive)
            return
        values = primitive.presentation_data_value_list
        for index, (context_id, data) in enumerate(values):
            control = data[0]
            if self.request is None:
                whole = control & 0x03 == 0x03  # a command set in one fragment
                request = store_request(memoryview(data)[1:]) if whole else None
                if request is None:
                    response = store_response_of(memoryview(data)[1:]) if whole else None
                    if response is not None:  # complete in itself: no data set follows
                        dimse.msg_queue.put((context_id, response))
                        continue
                    # neither: pynetdicom takes it from here
                    del values[:index]  # this primitive's own list, made for it by the PDU's to_primitive
                    self._to_pynetdicom(primitive)
                    return
                request._context_id = context_id
                self.request, self.data_set = request, BytesIO()
                self.digest = self._start_digest(request, context_id)
            elif control & 0x01:
                log.error("association with %s: a command fragment arrived before the data set of message %s ended",
                          dimse.assoc.requestor.ae_title, self.request.MessageID)
                self.request = None
                dimse.dul.event_queue.put("Evt19")  # an invalid message, as pynetdicom answers one
                return
            else:
                fragment = memoryview(data)[1:]
                if self.oversized:
                    self.oversized += len(fragment)  # counted, not kept
                else:
                    self.data_set.write(fragment)
                    if self.digest is not None:
                        self.digest.update(fragment)
                    size = self.data_set.tell()
                    if size > self.max_bytes:
                        self.oversized = size
                        self.data_set.close()  # a spooled file goes with it
                        self.data_set, self.digest = BytesIO(), None
                    elif size > self.spool_at and type(self.data_set) is BytesIO:
                        self._spool()
                if control & 0x02:
                    request, self.request = self.request, None
                    if type(self.data_set) is BytesIO:
                        request.DataSet = self.data_set
                    else:  # spooled: the primitive takes only a BytesIO
                        request.DataSet, request._pacs_spooled = BytesIO(), self.data_set
                    request._pacs_decoded = True  # see _served_store
                    if self.oversized:
                        request._pacs_oversized, self.oversized = self.oversized, 0
                    elif self.digest is not None:
                        request._pacs_sha256 = self.digest.hexdigest()
                    dimse.msg_queue.put((request._context_id, request))

    def _spool(self) -> None:
        """Go on with the data set being received in an unnamed temporary file, its file meta first.

        A large object is then held on disk rather than in memory: the
        handler stores the file (``request._pacs_spooled``; it holds the
        whole Part 10 object, so no head is put before it).  The file
        has no name (``O_TMPFILE``): it is gone once closed, or with the
        process, whatever ends the association.  Only for a request whose
        head was made (:meth:`_start_digest`); any other stays in memory.
        """
        request = self.request
        head = getattr(request, "_pacs_head", None)
        if head is None:
            return
        spooled = tempfile.TemporaryFile(dir=self.dimse.assoc.ae.spool_dir)
        spooled.write(head)
        with self.data_set.getbuffer() as received:
            spooled.write(received)
        self.data_set = spooled

    def _start_digest(self, request: C_STORE, context_id: int):  # noqa: ANN205 - a hashlib object or None
        """The SHA-256 of the Part 10 object the handler will store, begun with its file meta.

        The data set is hashed fragment by fragment as it arrives, while the
        reactor would otherwise wait for the next PDU, so that ingest need not
        read the whole object again before writing it (0.47 ms per 0.5 MB).
        The head hashed is kept on the request (``_pacs_head``) for the
        handler to store, so the digest covers exactly the bytes stored.  None
        under a context the association did not accept, or with UIDs
        ``part10_head`` cannot encode: the handler then builds its own head
        and ingest hashes the object itself.
        """
        context = self.dimse.assoc._accepted_cx.get(context_id)
        if context is None:
            return None
        try:
            head = part10_head(request.AffectedSOPClassUID, request.AffectedSOPInstanceUID,
                               context.transfer_syntax[0])
        except (UnicodeEncodeError, TypeError):
            return None
        request._pacs_head = head
        return hashlib.sha256(head)

    def _to_pynetdicom(self, primitive: P_DATA) -> None:
        """pynetdicom's own handling, with values that are views of a received buffer made ``bytes``.

        pynetdicom assembles a message's command set and data set in memory
        with no limit of its own; a message growing past the archive's
        (``MAX_COMMAND_SET_BYTES``, the AE's ``max_received_object_bytes``
        for a C-STORE's data set, ``MAX_OTHER_DATA_SET_BYTES`` for any other)
        is let go and the association aborted, the reason logged.
        """
        for value in primitive.presentation_data_value_list:
            if not isinstance(value[1], bytes):
                value[1] = bytes(value[1])
        self.pynetdicom(primitive)
        message = self.dimse.message
        if message is None:
            return
        command_bytes = message.encoded_command_set.tell()
        data_set = message.data_set
        data_bytes = data_set.tell() if isinstance(data_set, BytesIO) else 0
        data_limit = self.max_bytes if isinstance(message, C_STORE_RQ) else MAX_OTHER_DATA_SET_BYTES
        if command_bytes <= MAX_COMMAND_SET_BYTES and data_bytes <= data_limit:
            return
        self.dimse.message = None
        dul = self.dimse.assoc.dul  # an EventDrivenDUL: make_event_driven installs both
        log.error("association with %s: a %s passed %s (%d bytes of command set, %d of data set); aborting",
                  dul._peer(), type(message).__name__.replace("_", "-"),
                  f"the {MAX_COMMAND_SET_BYTES} bytes taken for a command set" if command_bytes > MAX_COMMAND_SET_BYTES
                  else f"the {data_limit} bytes taken for its data set", command_bytes, data_bytes)
        dul._abort_now()


def awaiting_request(assoc: Association) -> bool:
    """An association the archive accepted whose A-ASSOCIATE-RQ has not come (it may never)."""
    return assoc.is_acceptor and assoc.requestor.primitive is None


def make_event_driven(assoc: Association) -> None:
    """Give an association whose threads have not started the event-driven threads."""
    if assoc.is_alive() or assoc.dul.is_alive():
        raise RuntimeError("expected an association that has not started, got a running one")
    dul = EventDrivenDUL(assoc)
    dul.adopt(assoc.dul)
    assoc.dul = dul
    assoc.dimse.send_msg = _sending_messages_directly(assoc, assoc.dimse.send_msg)
    assoc.dimse.receive_primitive = _StoreRequestReceiver(assoc.dimse)
    # A release or abort request arrives there, not as a message: the
    # association thread, waiting for a message, must look at once.
    dul.to_user_queue = _WakingQueue(assoc.dimse.msg_queue)
    checkpoint = _WakingCheckpoint(assoc.dimse.msg_queue)
    if assoc._reactor_checkpoint.is_set():
        checkpoint.set()
    assoc._reactor_checkpoint = checkpoint
    assoc._run_reactor = types.MethodType(_run_reactor, assoc)


class EventDrivenAE(AE):
    """pynetdicom's AE whose requested associations (C-MOVE sub-operations, push, echo) are event-driven.

    ``max_received_object_bytes``: a C-STORE data set growing past it is no
    longer kept as it arrives (:class:`_StoreRequestReceiver`), so that one
    peer sending more than the archive would store cannot fill its memory.
    ``spool_received_bytes``: one growing past it goes on in an unnamed file
    in ``spool_dir`` instead of memory.  None: no limit, no spooling.
    """

    max_received_object_bytes: int | None = None
    spool_received_bytes: int | None = None
    spool_dir: str | None = None

    def _create_socket(self, assoc: Association, address, tls_args):  # noqa: ANN001, ANN202 - pynetdicom's hook
        sock = super()._create_socket(assoc, address, tls_args)
        make_event_driven(assoc)  # before AE.associate attaches the socket and starts the DUL
        return sock


class EventDrivenRequestHandler(RequestHandler):
    """pynetdicom's connection handler, with event-driven association threads."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        make_event_driven(assoc)
        return assoc


__all__ = ["EventDrivenAE", "EventDrivenDUL", "EventDrivenRequestHandler", "IDLE_WAIT_S", "awaiting_request",
           "hold_reactor", "make_event_driven", "release_reactor"]
