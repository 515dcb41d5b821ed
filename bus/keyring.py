"""The broker's key directories, scanned into immutable key tables, and what
changed between two scans (DESIGN.md "Fleet operations — contract", Live
enrolment).

Theory of operation. Four directories of public keys (`NAME.key`, pyzmq's
certificate format): devices, nodes, operators and admins. A scan lists each
directory and reads only the files whose (mtime, size, inode) changed since
the scan before, so rescanning 10,000 unchanged keys costs a directory
listing and a stat each. A scan builds a new `KeySets` (never mutated): the
ZAP table `{domain: {raw key: name}}` (admins are admitted on the status
socket, so the "operators" domain holds operator and admin keys) and, per
directory, which keys each name has. `changes(old, new)` gives per domain
the names added and the names removed; a name whose keys changed counts as
removed (its connections may use the old key) and added again.

One key may speak for one identity only: a key listed for two roles (a
device and a node), or under two names, is a conflict. At start a conflict
or a missing directory is a configuration error (the broker does not start);
a malformed or unreadable key file is only that one key refused (named in
`skipped`, which the broker logs as a warning): one bad file must not keep
every other device out.
On a rescan the conflicting key is refused everywhere and named in a
problem; a file that cannot be read keeps the key it had (an operator's
copy in progress must not revoke a device), and a new unreadable file waits
for the next scan; a directory gone keeps its previous keys.

A `KeyScanner` is used by one thread at a time (the driver keeps one scan
in flight).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import zmq.auth
from zmq.utils import z85

DOMAINS = ("devices", "nodes", "operators", "admins")
# ZAP domain of each directory (the socket that admits its keys)
ZAP_DOMAIN = {"devices": "devices", "nodes": "nodes", "operators": "operators", "admins": "operators"}


class KeyFileError(Exception):
    """A key file or directory is missing or malformed (a configuration error)."""


@dataclass(frozen=True)
class KeySets:
    by_name: dict = field(default_factory=dict)  # directory -> {name: frozenset of raw keys}
    zap: dict = field(default_factory=dict)  # ZAP domain -> {raw key: name}

    def names(self, domain: str) -> set:
        """Names admitted in `domain` (devices, nodes, operators with admins, admins)."""
        if domain == "operators":
            return set(self.by_name.get("operators", {})) | set(self.by_name.get("admins", {}))
        return set(self.by_name.get(domain, {}))

    def size(self) -> int:
        return sum(len(keys) for keys in self.zap.values())


@dataclass(frozen=True)
class ScanResult:
    keys: KeySets
    changes: dict  # domain -> (added names, removed names); only domains that changed
    problems: list  # human sentences: conflicts, unreadable files, missing directories
    skipped: list = field(default_factory=list)  # the sentences of `problems` that name one unreadable key file


def read_public(path: str) -> bytes:
    """The raw 32-byte public key of a NAME.key file."""
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot load public key {path}: {exc}") from None
    try:
        raw = z85.decode(public)
    except (ValueError, TypeError, KeyError) as exc:
        raise KeyFileError(f"{path}: not a z85 public key: {exc}") from None
    if len(raw) != 32:
        raise KeyFileError(f"{path}: a CURVE public key has 32 bytes, not {len(raw)}")
    return raw


def _names_of(by_name: dict, domain: str) -> dict:
    """{name: keys} of a ZAP-level domain ("operators" merges operators and admins)."""
    if domain != "operators":
        return by_name.get(domain, {})
    merged = {name: set(keys) for name, keys in by_name.get("operators", {}).items()}
    for name, keys in by_name.get("admins", {}).items():
        merged.setdefault(name, set()).update(keys)
    return merged


def changes(old: KeySets, new: KeySets) -> dict:
    """{domain: (added, removed)} for devices, nodes, operators (with admins) and admins."""
    out = {}
    for domain in DOMAINS:
        before, after = _names_of(old.by_name, domain), _names_of(new.by_name, domain)
        removed = {n for n, keys in before.items() if n not in after or set(keys) - set(after[n])}
        added = {n for n, keys in after.items() if n not in before or set(keys) != set(before[n])}
        if added or removed:
            out[domain] = (frozenset(added), frozenset(removed))
    return out


class KeyScanner:
    def __init__(self, directories: dict):
        """`directories`: domain -> directory of public keys ("" for none: admins are optional)."""
        self.directories = {d: directories.get(d, "") for d in DOMAINS}
        self._files: dict[str, tuple] = {}  # path -> ((mtime_ns, size, inode), raw key)
        self.last = KeySets()
        self.files_read = 0  # key files parsed, over every scan (unchanged files are not read again)

    def scan(self, strict: bool = False) -> ScanResult:
        """Read the directories; `strict` (at start) raises KeyFileError on a conflict or a missing
        directory (a malformed key file is only skipped: see `ScanResult.skipped`)."""
        problems: list[str] = []
        skipped: list[str] = []
        by_path: dict[str, dict] = {}
        seen_files = set()
        for domain, directory in self.directories.items():
            if not directory:
                by_path[domain] = {}
                continue
            listed = self._list(directory, problems, seen_files, skipped)
            if listed is None:  # gone: keep what it held
                by_path[domain] = {name: (f"{directory}/{name}.key", key)
                                   for name, keys in self.last.by_name.get(domain, {}).items() for key in keys}
                continue
            by_path[domain] = listed
        for path in list(self._files):
            if path not in seen_files:
                del self._files[path]
        keys = self._tables(by_path, problems)
        fatal = [p for p in problems if p not in skipped]
        if strict and fatal:
            raise KeyFileError("; ".join(fatal))
        result = ScanResult(keys, changes(self.last, keys), problems, skipped)
        self.last = keys
        return result

    def _list(self, directory: str, problems: list, seen: set, skipped: list) -> dict | None:
        """{name: (path, raw key)} of one directory, or None if it cannot be listed."""
        out = {}
        try:
            entries = list(os.scandir(directory))
        except OSError as exc:
            problems.append(f"{directory} is not a directory of public keys ({exc.strerror})")
            return None
        for entry in entries:
            if not entry.name.endswith(".key") or entry.name.startswith("."):
                continue
            path = entry.path
            seen.add(path)
            try:
                st = entry.stat()
                stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            except OSError:
                continue  # removed while we looked
            cached = self._files.get(path)
            if cached is not None and cached[0] == stamp:
                out[entry.name[:-4]] = (path, cached[1])
                continue
            self.files_read += 1
            try:
                key = read_public(path)
            except KeyFileError as exc:
                problems.append(str(exc))
                skipped.append(str(exc))
                if cached is not None:  # half-written? keep the key it had until it reads again
                    out[entry.name[:-4]] = (path, cached[1])
                continue
            self._files[path] = (stamp, key)
            out[entry.name[:-4]] = (path, key)
        return out

    @staticmethod
    def _tables(by_path: dict, problems: list) -> KeySets:
        """The tables, with every key claimed by two identities left out of all of them."""
        claims: dict[bytes, dict] = {}  # raw key -> {(ZAP domain, name): path}
        for domain, listed in by_path.items():
            for name, (path, key) in listed.items():
                claims.setdefault(key, {}).setdefault((ZAP_DOMAIN[domain], name), path)
        refused = set()
        for key, who in claims.items():
            if len(who) > 1:
                refused.add(key)
                problems.append(f"one key is listed for {len(who)} identities, refused for all: "
                                f"{', '.join(sorted(who.values()))}")
        by_name: dict[str, dict] = {}
        zap: dict[str, dict] = {"devices": {}, "nodes": {}, "operators": {}}
        for domain, listed in by_path.items():
            names: dict[str, frozenset] = {}
            for name, (path, key) in listed.items():
                if key in refused:
                    continue
                names[name] = names.get(name, frozenset()) | {key}
                zap[ZAP_DOMAIN[domain]][key] = name
            by_name[domain] = names
        return KeySets(by_name, zap)
