"""Who may talk to the archive: the calling-AE allow-list and per-AE permissions."""

from __future__ import annotations

import logging
import socket

from pynetdicom import evt

from pacs.index.database import Database
from pacs.index.repository import find_remote_ae

log = logging.getLogger(__name__)

STORE, QUERY, RETRIEVE = 0, 1, 2


def handle_requested(event: evt.Event, db: Database) -> None:
    """Reject an association whose calling AE is not in the remote AE table (PS3.8 7.1.1.9).

    Bound only when the allow-list is on.  The peer must use a known AE title
    from the host recorded for it (``*`` allows any host).
    """
    assoc = event.assoc
    # The requestor's AE title is filled in by negotiation, which comes after this event.
    calling = str(assoc.requestor.primitive.calling_ae_title or "").strip()
    address = assoc.requestor.address
    with db.session() as session:
        peer = find_remote_ae(session, calling)
        allowed = peer is not None and _host_matches(peer.host, address)
        if allowed:
            assoc.pacs_peer = (peer.may_store, peer.may_query, peer.may_retrieve)
    if not allowed:
        log.warning("rejected association from %s at %s: calling AE title not recognised", calling, address)
        # rejected-permanent, by the service user, calling AE title not recognised;
        # then end the association the way pynetdicom's own negotiation does.
        assoc.acse.send_reject(0x01, 0x01, 0x03)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()


def _host_matches(host: str, address: str) -> bool:
    if host == "*" or host == address:
        return True
    try:
        return socket.gethostbyname(host) == address
    except OSError:
        return False


def may(event: evt.Event, what: int) -> bool:
    """Whether the association's peer may STORE, QUERY or RETRIEVE.

    Without the allow-list every peer may do everything.
    """
    permissions = getattr(event.assoc, "pacs_peer", None)
    return permissions is None or permissions[what]
