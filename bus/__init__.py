"""The SpeedSync message bus: framing, limits, heartbeats, credit, sockets.

`frames`, `errors`, `credit`, `heartbeat` are pure logic (no zmq) and are
unit-tested without sockets; `sockets` and `pipeline` own the zmq side.
The bus knows nothing of snapshots: it moves headers and payload frames.
"""
