"""Writing a message held in pieces to a socket without joining them."""

from __future__ import annotations

import socket

# Linux's IOV_MAX: the most buffers one sendmsg takes.
PIECES_PER_CALL = 1024


def send_pieces(sock: socket.socket, pieces: list[bytes | memoryview]) -> None:
    """Write every piece, in order, with as few ``sendmsg`` calls as the socket takes.

    A piece partly written is taken up where it stopped (a view, not a
    copy), so nothing is joined or copied however large the pieces are, and
    a socket with a timeout (which writes what its buffer takes) gets the
    rest on the next call.  Errors are the socket's.
    """
    views = [memoryview(piece) for piece in pieces if len(piece)]
    first = 0
    while first < len(views):
        sent = sock.sendmsg(views[first:first + PIECES_PER_CALL])
        while sent:
            length = len(views[first])
            if sent < length:
                views[first] = views[first][sent:]
                break
            sent -= length
            first += 1


__all__ = ["PIECES_PER_CALL", "send_pieces"]
