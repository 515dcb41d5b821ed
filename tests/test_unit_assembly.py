"""The chunk bytes a node holds in pieces are capped per device (roles/storenode/assembly.py): past
the cap a piece is refused over_budget, its chunk dropped, and another device's pieces go on."""

import blake3

from schemas.messages import MAX_WIRE_CHUNK
from tests.corenode import CoreNode

CHUNK = 4 * 1024 * 1024
PIECE = 1024 * 1024


def open_upload(node, tid, device, chunks):
    node.send("OPEN", transfer_id=tid, device_id=device, dataset="ds", snapshot=tid, image_size=chunks * CHUNK,
              chunk_size=CHUNK, chunk_count=chunks)


def test_pieces_past_a_devices_cap_are_refused_and_another_device_still_assembles(tmp_path):
    node = CoreNode(tmp_path, window=MAX_WIRE_CHUNK)  # the cap: the node's window (at least one whole chunk)
    raws = [bytes([1]) * CHUNK]
    names = [blake3.blake3(raws[0]).digest()] + [blake3.blake3(bytes([i])).digest() for i in range(2, 22)]
    open_upload(node, "t-evil", "mallory", len(names))
    node.send("QUERY", transfer_id="t-evil", start=0, hashes=names)
    open_upload(node, "t-good", "honest", 1)
    node.send("QUERY", transfer_id="t-good", start=0, hashes=names[:1])
    node.settle()
    node.take_sent()
    # mallory starts every chunk and finishes none: each first piece is held
    held = 0
    for name in names:
        node.send("CHUNK", payload=[raws[0][:PIECE]], transfer_id="t-evil", hash=name, raw_len=CHUNK, codec="raw",
                  offset=0, total=CHUNK)
        held += PIECE
        if held > MAX_WIRE_CHUNK:
            break
    refused = [m for m in node.take_sent() if m.t == "ERROR"]
    assert [(m["code"], m["ref"]) for m in refused] == [("over_budget", "CHUNK")], refused
    assert node.core.assembler.device_bytes("mallory") <= MAX_WIRE_CHUNK
    # the honest device's chunk, in pieces, still assembles and is STORED
    for offset in range(0, CHUNK, PIECE):
        node.send("CHUNK", payload=[raws[0][offset:offset + PIECE]], transfer_id="t-good", hash=names[0],
                  raw_len=CHUNK, codec="raw", offset=offset, total=CHUNK)
    node.settle()
    assert [(m.t, m.get("transfer_id")) for m in node.take_sent()] == [("STORED", "t-good")]
    # an upload closed forgets its pieces, and the device's count with them
    node.send("ABORT", transfer_id="t-evil")
    assert node.core.assembler.device_bytes("mallory") == 0 and node.core.assembler.pending_bytes == 0
