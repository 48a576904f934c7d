"""One object-storage interface over a local folder (default) and ``s3://bucket/prefix`` on any
S3-compatible service. Writes are atomic (temp + rename locally; S3 PUTs are atomic per object and
manifests are written after the objects they describe); every object can be checksummed.

Credentials come from boto3's standard chain and are never logged; the endpoint from
``AWS_ENDPOINT_URL`` or the caller. Keys are validated so a run name cannot escape its prefix.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


class StorageError(RuntimeError):
    """Storage unreachable, missing, forbidden or corrupt — with what to do about it."""


class ChecksumMismatch(StorageError):
    pass


_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]*$")


def safe_key(*parts: str) -> str:
    """Join key segments, refusing anything that could climb out of the prefix."""
    segs: list[str] = []
    for part in parts:
        for seg in str(part).split("/"):
            if not seg:
                continue
            if seg in (".", "..") or not _SEGMENT.match(seg):
                raise StorageError(f"unsafe storage key segment {seg!r} in {'/'.join(map(str, parts))!r}: "
                                   "use letters, digits and . _ = - only (no '..', no absolute paths)")
            segs.append(seg)
    if not segs:
        raise StorageError("empty storage key")
    return "/".join(segs)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temp file in the same folder + fsync + rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Storage:
    uri: str

    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def check(self) -> None: ...
    def arrow_fs(self) -> tuple[Any, str]: ...

    # -- helpers shared by both backends
    def put_json(self, key: str, obj: Any) -> None:
        self.put_bytes(key, (json.dumps(obj, indent=1, default=float) + "\n").encode())

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    def put_torch(self, key: str, obj: Any) -> dict[str, Any]:
        """Serialise with torch.save and store; returns ``{"key", "size", "sha256"}`` for a manifest."""
        buf = io.BytesIO()
        torch.save(obj, buf)
        data = buf.getvalue()
        self.put_bytes(key, data)
        return {"key": key, "size": len(data), "sha256": sha256(data)}

    def get_torch(self, key: str, expect_sha256: str | None = None, map_location: str = "cpu") -> Any:
        data = self.get_bytes(key)
        if expect_sha256 is not None and sha256(data) != expect_sha256:
            raise ChecksumMismatch(f"{self.uri}/{key}: sha256 {sha256(data)[:12]}… does not match the manifest's "
                                   f"{expect_sha256[:12]}…; the object is corrupt or was overwritten — it is not loaded")
        try:
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
        except Exception as e:
            raise StorageError(f"{self.uri}/{key} is not a weights-only torch file ({type(e).__name__}: {e})") from e


class LocalStorage(Storage):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        p = (self.root / safe_key(key)).resolve()
        if self.root not in p.parents and p != self.root:
            raise StorageError(f"key {key!r} escapes {self.root}")
        return p

    def put_bytes(self, key: str, data: bytes) -> None:
        try:
            atomic_write_bytes(self._path(key), data)
        except OSError as e:
            raise StorageError(f"cannot write {self.root}/{key} ({e.strerror or e}): check the disk and permissions") from e

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise StorageError(f"{path} does not exist")
        return path.read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix) if prefix.strip("/.") else self.root
        if not base.is_dir():
            return []
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file() and not p.name.startswith("."))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-probe-{os.getpid()}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            raise StorageError(f"storage folder {self.root} is not writable ({e}); choose another --storage") from e

    def arrow_fs(self):
        import pyarrow.fs as pafs

        return pafs.LocalFileSystem(), str(self.root)


@dataclass
class S3Settings:
    endpoint_url: str | None = None
    region: str | None = None
    max_attempts: int = 5
    connect_timeout: float = 5.0
    read_timeout: float = 60.0


class S3Storage(Storage):
    """boto3 for objects (with botocore's bounded, backed-off retries), pyarrow for Ray Train."""

    def __init__(self, bucket: str, prefix: str = "", settings: S3Settings | None = None):
        import boto3
        from botocore.config import Config as BotoConfig

        self.bucket = bucket
        self.prefix = safe_key(prefix) if prefix.strip("/") else ""
        self.settings = settings or S3Settings()
        self.endpoint_url = self.settings.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self.region = self.settings.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        cfg = BotoConfig(retries={"max_attempts": self.settings.max_attempts, "mode": "standard"},
                         connect_timeout=self.settings.connect_timeout, read_timeout=self.settings.read_timeout)
        self.client = boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region, config=cfg)
        # start-up checks should answer in seconds, not after a full retry budget
        fast = BotoConfig(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=3, read_timeout=10)
        self._check_client = boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region, config=fast)

    def _key(self, key: str) -> str:
        k = safe_key(key)
        return f"{self.prefix}/{k}" if self.prefix else k

    def _wrap(self, e: Exception, what: str) -> StorageError:
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        where = f"{self.uri} (endpoint {self.endpoint_url or 'AWS default'})"
        if isinstance(e, EndpointConnectionError):
            return StorageError(f"cannot reach S3 endpoint for {where} while trying to {what}: check --storage, AWS_ENDPOINT_URL and the network")
        if isinstance(e, NoCredentialsError):
            return StorageError(f"no S3 credentials found for {where}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, or an instance role")
        if isinstance(e, ClientError):
            code = e.response.get("Error", {}).get("Code", "?")
            if code in ("NoSuchBucket", "404") and what == "check the bucket":
                return StorageError(f"bucket {self.bucket!r} does not exist at {where}: create it first (e.g. `aws s3 mb s3://{self.bucket}`)")
            if code in ("NoSuchKey", "404"):
                return StorageError(f"{where}: object not found while trying to {what}")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
                return StorageError(f"S3 refused the credentials for {where} ({code}) while trying to {what}: check the access key/secret or role")
            return StorageError(f"S3 error {code} for {where} while trying to {what}")
        return StorageError(f"S3 failure for {where} while trying to {what}: {type(e).__name__}: {e}")

    def put_bytes(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except Exception as e:
            raise self._wrap(e, f"write {key}") from None

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except Exception as e:
            raise self._wrap(e, f"read {key}") from None

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._wrap(e, f"look up {key}") from None
        except Exception as e:
            raise self._wrap(e, f"look up {key}") from None

    def list(self, prefix: str) -> list[str]:
        full = (self._key(prefix) + "/") if prefix.strip("/.") else (f"{self.prefix}/" if self.prefix else "")
        out: list[str] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                out += [o["Key"] for o in page.get("Contents", [])]
        except Exception as e:
            raise self._wrap(e, f"list {prefix}") from None
        strip = len(self.prefix) + 1 if self.prefix else 0
        return sorted(k[strip:] for k in out)

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as e:
            raise self._wrap(e, f"delete {key}") from None

    def check(self) -> None:
        """Fail early: endpoint reachable, bucket present, credentials accepted."""
        try:
            self._check_client.head_bucket(Bucket=self.bucket)
        except Exception as e:
            raise self._wrap(e, "check the bucket") from None

    def arrow_fs(self):
        """A pyarrow S3 filesystem for Ray Train/Tune/Data. No keys are passed in: pyarrow resolves the
        same standard chain (environment, profile, instance role) wherever it runs, so the object that
        Ray pickles into experiment state and ships to workers carries no secret."""
        import pyarrow.fs as pafs

        # allow_delayed_open: small objects go up as one PutObject instead of a multipart upload
        kw: dict[str, Any] = {"region": self.region, "allow_delayed_open": True}
        if self.endpoint_url:
            scheme, _, host = self.endpoint_url.partition("://")
            kw.update(endpoint_override=host.rstrip("/"), scheme=scheme)
        return pafs.S3FileSystem(**kw), f"{self.bucket}/{self.prefix}".rstrip("/")

    def __repr__(self) -> str:  # never shows credentials
        return f"S3Storage({self.uri!r}, endpoint={self.endpoint_url!r})"


def open_storage(uri: str, endpoint_url: str | None = None) -> Storage:
    """``/path`` or ``file:///path`` → LocalStorage; ``s3://bucket[/prefix]`` → S3Storage."""
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[5:].partition("/")
        if not bucket:
            raise StorageError(f"{uri!r} names no bucket; use s3://bucket/prefix")
        return S3Storage(bucket, prefix, S3Settings(endpoint_url=endpoint_url))
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"unsupported storage URI {uri!r}; use a local path, file:// or s3://bucket/prefix")
    return LocalStorage(uri[len("file://"):] if uri.startswith("file://") else uri)


def read_uri_bytes(uri: str) -> bytes:
    """Read one object named by a full URI (used for teacher checkpoints on S3)."""
    if not uri.startswith("s3://"):
        return Path(uri).read_bytes()
    bucket, _, key = uri[5:].partition("/")
    return S3Storage(bucket).get_bytes(key)
