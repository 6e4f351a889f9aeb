"""Who may talk to the archive: the calling-AE allow-list and per-AE permissions."""

from __future__ import annotations

import logging
import socket

from pynetdicom import build_context, evt, register_uid, sop_class
from pynetdicom.association import Association
from pynetdicom.service_class import ServiceClass, StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from pacs.index.database import Database
from pacs.index.repository import find_remote_ae
from pacs.net.reactor import awaiting_request

log = logging.getLogger(__name__)

STORE, QUERY, RETRIEVE = 0, 1, 2


def handle_requested(event: evt.Event, max_associations: int, db: Database | None,
                     storage_syntaxes: list[str] | None) -> None:
    """Decide on an association request before pynetdicom negotiates it.

    Past ``max_associations`` associations whose request came (this one
    included), reject it as transient, local limit exceeded (PS3.8 7.1.1.9),
    as pynetdicom would; but pynetdicom counts every accepted connection,
    including those that have not sent a request (and may never), so it is
    given a limit that leaves room for them (``pacs.net.scp``).  With ``db``
    (the allow-list is on), reject a calling AE that is not in the remote AE
    table: the peer must use a known AE title from the host recorded for it
    (``*`` allows any host).  With ``storage_syntaxes`` (unknown SOP classes
    are accepted), every proposed abstract syntax pynetdicom does not know
    becomes a storage context.
    """
    assoc = event.assoc
    serving = sum(1 for other in assoc.ae.active_associations if other.is_acceptor and not awaiting_request(other))
    if serving > max_associations:
        log.warning("rejected association from %s at %s: %d associations already, the most one worker serves "
                    "(dicom.max_associations=%d); the peer may retry", _calling(assoc), assoc.requestor.address,
                    serving - 1, max_associations)
        _reject(assoc, 0x02, 0x03, 0x02)  # rejected-transient, by the service provider (presentation), local limit
        return
    if db is not None and not _known_peer(assoc, db):
        return
    if storage_syntaxes is not None:
        _support_unknown_sop_classes(assoc, storage_syntaxes)


def _support_unknown_sop_classes(assoc: Association, syntaxes: list[str]) -> None:
    supported = {str(c.abstract_syntax) for c in assoc.acceptor.supported_contexts}
    added = []
    for proposed in assoc.requestor.primitive.presentation_context_definition_list:
        uid = str(proposed.abstract_syntax)
        if uid in supported or uid_to_service_class(uid) is not ServiceClass:
            continue  # ours already, or a known non-storage service
        keyword = "UnknownStorage_" + uid.replace(".", "_")
        if not hasattr(sop_class, keyword):
            register_uid(uid, keyword, StorageServiceClass)
        context = build_context(uid, syntaxes)
        context.scp_role, context.scu_role = True, False  # as for the known storage classes: C-GET peers store
        assoc.acceptor.supported_contexts.append(context)
        supported.add(uid)
        added.append(uid)
    if added:
        log.info("accepting unknown SOP classes as storage: %s", ", ".join(added))


def _calling(assoc: Association) -> str:
    # The requestor's AE title is filled in by negotiation, which comes after this event.
    return str(assoc.requestor.primitive.calling_ae_title or "").strip()


def _reject(assoc: Association, result: int, source: int, reason: int) -> None:
    """Send an A-ASSOCIATE-RJ and end the association the way pynetdicom's own negotiation does."""
    assoc.acse.send_reject(result, source, reason)
    evt.trigger(assoc, evt.EVT_REJECTED, {})
    assoc.kill()


def _known_peer(assoc: Association, db: Database) -> bool:
    calling = _calling(assoc)
    address = assoc.requestor.address
    with db.session() as session:
        peer = find_remote_ae(session, calling)
        allowed = peer is not None and _host_matches(peer.host, address)
        if allowed:
            assoc.pacs_peer = (peer.may_store, peer.may_query, peer.may_retrieve)
    if not allowed:
        log.warning("rejected association from %s at %s: calling AE title not recognised", calling, address)
        _reject(assoc, 0x01, 0x01, 0x03)  # rejected-permanent, by the service user, calling AE title not recognised
    return allowed


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
