"""End to end: one malformed key file does not keep the broker from starting (issue 11).

The broker starts with CURVE on and, among the listed device keys, one file
that is not a key: that key is refused with a warning naming its file, every
other key loads, and a listed device replicates as usual.
"""

from __future__ import annotations

from roles.sampleimages import generate_image
from tests.harness import MiB


def test_a_malformed_key_file_is_refused_alone_with_a_warning_naming_it(secure_cluster):
    c = secure_cluster
    c.enroll("node-a", "node")
    c.enroll("office-1", "device")
    broken = c.keys / "devices" / "broken.key"
    broken.parent.mkdir(parents=True, exist_ok=True)
    broken.write_text("curve\n    public-key = \"not a z85 key\"\n")
    c.start_broker()
    c.start_storage("node-a")

    log = (c.logs / "broker.log").read_text()
    warning = [line for line in log.splitlines() if "WARNING" in line and str(broken) in line]
    assert warning, log[-4000:]
    directory = c.dataset_dir("office-1", "fileserver")
    generate_image(str(directory / "s1.img"), 2 * MiB, seed=11)
    rc, _, stderr = c.run_agent_once(c.agent_config("office-1", [{"name": "fileserver", "path": directory}]))
    assert rc == 0, stderr
    assert [r["snapshot"] for r in c.catalog("office-1")] == ["s1"]
