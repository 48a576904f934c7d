"""Loss-network versions in storage: ``<prefix>/v<N>.pt`` objects, a ``latest.json`` pointer
(``{"key", "size", "sha256", "version"}``) written after the object it names, and a sharded manifest of each
version's content hash (``hashes/NNNNN.json``), recorded when the version was applied.

Reading takes the newest *intact* version: the pointer's target if its sha256 matches, else — with a
warning that says what happened — the newest object that loads, so a truncated or overwritten
pointer target never stops a restart or a reuse, and a version written just before a crash (object
stored, pointer not yet) is not lost.
"""
from __future__ import annotations

import hashlib
import logging
import re
from typing import Any

import torch

from ..storage import ChecksumMismatch, CorruptObject, Storage, StorageError

log = logging.getLogger(__name__)
_VERSION = re.compile(r"v(\d+)\.pt$")


def _feed(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=str):
            h.update(repr(k).encode())
            _feed(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            _feed(h, v)
        h.update(b"]")
    else:
        h.update(repr(obj).encode())


COVERS = "sha256_covers"  # marks a payload whose state_sha256 covers every entry (absent: φ, Adam, version only)


def content_sha256(payload: dict[str, Any]) -> str:
    """A hash of what a saved loss-network version *is*: every entry of the payload but the hash itself (φ and ψ,
    the optimizer's state, the version, the counters, the applied rounds, the ES state, the config) — computed
    from the tensors' values, so a file whose content changed after the hash was taken fails it. Payloads saved
    before it covered everything (no ``sha256_covers`` entry) are checked over what their hash covered then."""
    h = hashlib.sha256()
    if payload.get(COVERS) == "all":
        _feed(h, {k: v for k, v in payload.items() if k != "state_sha256"})
    else:
        _feed(h, {k: payload.get(k) for k in ("lossnets", "adam", "version")})
    return h.hexdigest()


def with_hash(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload with its content hash over every entry (``state_sha256``)."""
    out = {k: v for k, v in payload.items() if k != "state_sha256"}
    out[COVERS] = "all"
    out["state_sha256"] = content_sha256(out)
    return out


class VersionContentMismatch(ChecksumMismatch):
    """A version file whose content is not the one recorded when it was queued."""


def check_content(sd: Any, where: str) -> None:
    """Refuse (``VersionContentMismatch``) a loaded version whose content does not hash to its ``state_sha256``."""
    if isinstance(sd, dict) and sd.get("state_sha256") and content_sha256(sd) != sd["state_sha256"]:
        raise VersionContentMismatch(f"{where}: its content does not hash to the value recorded when the version was "
                                     "saved (changed or corrupted since)")


HASH_SHARD = 256


class VersionStore:
    def __init__(self, storage: Storage, prefix: str = "lossnet"):
        self.storage = storage
        self.prefix = prefix.strip("/") if prefix not in (".", "") else ""
        self._shards: dict[int, dict[int, str]] = {}  # hash-manifest shards this process has read or written

    def key(self, version: int) -> str:
        return f"{self.prefix}/v{version}.pt" if self.prefix else f"v{version}.pt"

    @property
    def pointer(self) -> str:
        return f"{self.prefix}/latest.json" if self.prefix else "latest.json"

    def save(self, version: int, payload: dict[str, Any]) -> dict[str, Any]:
        """The object, then the pointer, then (when the payload carries one) its content hash in the sharded hash
        manifest ``hashes/NNNNN.json`` (256 versions a shard: a save rewrites one small shard)."""
        if not payload.get("state_sha256"):
            payload = with_hash(payload)
        entry = self.storage.put_torch(self.key(version), payload)
        self.storage.put_json(self.pointer, {**entry, "version": int(version)})
        if payload.get("state_sha256"):
            shard = int(version) // HASH_SHARD
            if shard not in self._shards:
                key = self._hash_key(shard)
                self._shards[shard] = {int(k): v for k, v in self.storage.get_json(key).items()} \
                    if self.storage.exists(key) else {}
            self._shards[shard][int(version)] = payload["state_sha256"]
            self.storage.put_json(self._hash_key(shard), {str(k): v for k, v in sorted(self._shards[shard].items())})
        return {**entry, "version": int(version)}

    def _hash_key(self, shard: int) -> str:
        return f"{self.prefix}/hashes/{shard:05d}.json" if self.prefix else f"hashes/{shard:05d}.json"

    def hashes(self) -> dict[int, str]:
        """Every saved version's content hash, as recorded when it was applied (from every server incarnation)."""
        out: dict[int, str] = {}
        hash_prefix = f"{self.prefix}/hashes" if self.prefix else "hashes"
        for key in sorted(k for k in self.storage.list(hash_prefix) if k.endswith(".json")):
            out.update({int(k): v for k, v in self.storage.get_json(key).items()})
        return out

    def versions(self) -> list[tuple[int, str]]:
        """Stored versions, newest first."""
        keys = self.storage.list(self.prefix)
        out = []
        for k in keys:
            name = k.rsplit("/", 1)[-1]
            m = _VERSION.fullmatch(name)
            if m and (not self.prefix or k == self.key(int(m.group(1)))):
                out.append((int(m.group(1)), k))
        return sorted(out, reverse=True)

    def load_latest(self, warn=None) -> dict[str, Any] | None:
        """The newest intact version's payload (with ``version`` set), or None when there is none."""
        warn = warn or log.warning
        pointer = None
        if self.storage.exists(self.pointer):
            try:
                pointer = self.storage.get_json(self.pointer)
            except (StorageError, ValueError) as e:
                warn(f"{self.storage.uri}/{self.pointer} is unreadable ({e}); using the newest intact version instead")
        for version, key in self.versions():
            expect = pointer["sha256"] if pointer and pointer.get("key") == key else None
            try:
                sd = self.storage.get_torch(key, expect_sha256=expect)
                check_content(sd, key)
            except CorruptObject as e:  # checksum, content hash, or not a loadable file: by type, never by text
                warn(f"loss-network version {version} is corrupt ({e}); falling back to an earlier intact version")
                continue
            if pointer and int(pointer.get("version", -1)) > version:
                warn(f"{self.storage.uri}/{self.pointer} names version {pointer['version']}, which is missing or corrupt; "
                     f"restored version {version}, the newest intact one")
            sd = dict(sd)
            sd["version"] = version
            return sd
        return None
