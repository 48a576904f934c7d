"""One object-storage interface over a local folder (default) and ``s3://bucket/prefix`` on any
S3-compatible service. Writes are atomic (temp + rename locally; S3 PUTs are atomic per object and
manifests are written after the objects they describe); every object can be checksummed.

Credentials come from boto3's standard chain and are never logged; the endpoint from
``AWS_ENDPOINT_URL`` or the caller. Keys are validated so a run name cannot escape its prefix.

Outages: every S3 call (ours through boto3, Ray Train's through the pyarrow filesystem from
``arrow_fs()``) retries connection errors, timeouts and 5xx answers with capped exponential backoff
for up to ``outage_s`` (default 60 s; ``LKD_STORAGE_OUTAGE_S``, the jobs' ``--storage-outage-s``), so a
restarting S3 service or a flapping network costs a pause, not a run. One warning line when an
outage starts, one when it ends; beyond the bound a one-line ``StorageUnavailable``. Answers that
retrying cannot fix (missing object, refused credentials) are raised at once.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import StorageFailure


class StorageError(StorageFailure, RuntimeError):
    """Storage unreachable, missing, forbidden or corrupt — with what to do about it."""


class StorageUnavailable(StorageError):
    """Storage stayed unreachable for longer than the outage bound (transient in nature: rerun to resume)."""


class CorruptObject(StorageError):
    """The object was read but is not what was written (checksum) or does not load: retrying cannot help."""


class ChecksumMismatch(CorruptObject):
    pass


log = logging.getLogger(__name__)
DEFAULT_OUTAGE_S = 60.0
OUTAGE_ENV = "LKD_STORAGE_OUTAGE_S"


def default_outage_s() -> float:
    """The outage bound from ``LKD_STORAGE_OUTAGE_S`` (set by ``--storage-outage-s`` for every process of a run)."""
    raw = os.environ.get(OUTAGE_ENV)
    if not raw:
        return DEFAULT_OUTAGE_S
    try:
        v = float(raw)
    except ValueError:
        raise StorageError(f"{OUTAGE_ENV}={raw!r} is not a number of seconds") from None
    if not (math.isfinite(v) and v >= 0):
        raise StorageError(f"{OUTAGE_ENV}={raw!r}: the storage outage bound must be a finite number of seconds ≥ 0")
    return v


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
            raise CorruptObject(f"{self.uri}/{key} is not a weights-only torch file ({type(e).__name__}: {e})") from e


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
        try:
            return path.read_bytes()
        except OSError as e:
            raise StorageError(f"cannot read {path} ({e.strerror or e})") from e

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
    """Per-attempt timeouts are short (a black-holed endpoint is noticed in seconds) and never longer than
    the outage bound itself. Two layers of retries: botocore's ``standard`` retry mode (exponential backoff
    with jitter and a retry quota, the AWS SDKs' own behaviour for throttling, 5xx and dropped connections)
    makes up to ``botocore_attempts()`` attempts per call — as many as fit in half the outage bound — and
    ``S3Storage._call`` keeps calling with capped backoff until ``outage_s`` has passed, so a long outage is
    ridden out and a dead endpoint fails within the bound."""
    endpoint_url: str | None = None
    region: str | None = None
    outage_s: float = field(default_factory=default_outage_s)
    connect_timeout: float = 3.0
    read_timeout: float = 10.0
    backoff_s: tuple[float, float] = (0.5, 8.0)

    def timeouts(self) -> tuple[float, float]:
        return min(self.connect_timeout, max(1.0, self.outage_s)), min(self.read_timeout, max(2.0, self.outage_s))

    def botocore_attempts(self) -> int:
        """Attempts botocore makes per call: its worst case (timeouts plus ≤ 2 s of backoff each) within half the
        bound, at most 3 (60 s → 2; a bound of a few seconds → 1, our loop alone)."""
        connect, read = self.timeouts()
        return max(1, min(3, int((self.outage_s / 2) // (connect + read + 2))))

    def arrow_retries(self) -> int:
        """pyarrow's ``AwsDefaultS3RetryStrategy(max_attempts=n)`` retries n times (despite the name), sleeping
        25 ms · 2^k before retry k ≥ 1: the smallest n whose sleeps alone cover ``outage_s`` (60 s → 12, up to
        102 s of sleeps; a black-holed endpoint adds up to a request timeout per attempt)."""
        n = 1
        while 0.025 * (2 ** n - 2) < self.outage_s:
            n += 1
        return n


# 5xx and throttling answers that a later attempt can get past; 4xx answers are final
_RETRY_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling", "ThrottlingException",
                "RequestLimitExceeded", "TooManyRequestsException", "BadGateway", "GatewayTimeout"}
_outages: dict[str, float] = {}  # storage uri → when its current outage started (one warning line per outage)
_outage_lock = threading.Lock()


def transient_reason(e: BaseException) -> str | None:
    """A short reason when ``e`` is a failure a retry can get past (network, timeout, 5xx), else None."""
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        HTTPClientError,
        ReadTimeoutError,
        SSLError,
    )

    if isinstance(e, SSLError):
        return None  # certificates do not heal with time
    if isinstance(e, ConnectTimeoutError):
        return "connect timed out"
    if isinstance(e, EndpointConnectionError):
        return "cannot connect"
    if isinstance(e, ReadTimeoutError):
        return "no answer in time"
    if isinstance(e, HTTPClientError):
        return "connection reset or closed"
    if isinstance(e, ClientError):
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        code = str(e.response.get("Error", {}).get("Code", ""))
        if status >= 500 or code in _RETRY_CODES:
            return f"HTTP {status or '?'} {code}".strip()
    return None


class S3Storage(Storage):
    """boto3 for objects (botocore's retries, bounded over outages), pyarrow for Ray Train."""

    def __init__(self, bucket: str, prefix: str = "", settings: S3Settings | None = None):
        import boto3
        from botocore.config import Config as BotoConfig

        self.bucket = bucket
        self.prefix = safe_key(prefix) if prefix.strip("/") else ""
        self.settings = settings or S3Settings()
        self.endpoint_url = self.settings.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self.region = self.settings.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        connect, read = self.settings.timeouts()
        # botocore's standard mode retries first; ``_call`` bounds the whole outage on top of it and logs it once
        cfg = BotoConfig(retries={"total_max_attempts": self.settings.botocore_attempts(), "mode": "standard"},
                         connect_timeout=connect, read_timeout=read)
        self.client = boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region, config=cfg)
        # start-up checks should answer in seconds, not after a full retry budget
        fast = BotoConfig(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=3, read_timeout=10)
        self._check_client = boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region, config=fast)

    def _key(self, key: str) -> str:
        k = safe_key(key)
        return f"{self.prefix}/{k}" if self.prefix else k

    def _where(self) -> str:
        return f"{self.uri} (endpoint {self.endpoint_url or 'AWS default'})"

    def _wrap(self, e: Exception, what: str) -> StorageError:
        from botocore.exceptions import (
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
        )

        where = self._where()
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
        reason = transient_reason(e)
        if reason is not None:
            return StorageError(f"S3 endpoint for {where} failed ({reason}) while trying to {what}: check the endpoint and the network")
        return StorageError(f"S3 failure for {where} while trying to {what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

    def _call(self, what: str, fn):
        """Run one S3 operation, retrying transient failures with capped backoff for up to ``outage_s``."""
        bound = self.settings.outage_s
        delay, cap = self.settings.backoff_s
        t0 = time.monotonic()
        while True:
            try:
                out = fn()
            except Exception as e:
                reason = transient_reason(e)
                if reason is None:
                    self._answered()
                    raise self._wrap(e, what) from None
                now = time.monotonic()
                with _outage_lock:
                    if self.uri not in _outages:
                        _outages[self.uri] = now
                        log.warning("storage %s unreachable (%s); retrying for up to %.0f s", self._where(), reason, bound)
                if now - t0 >= bound:
                    raise StorageUnavailable(
                        f"storage {self._where()} unreachable for {now - t0:.0f} s ({reason}) while trying to {what}; gave up "
                        f"at the outage bound of {bound:.0f} s (--storage-outage-s / {OUTAGE_ENV}): check the endpoint and "
                        "the network, then rerun the same command to resume") from None
                time.sleep(min(delay, max(0.0, bound - (now - t0))) or 0.01)
                delay = min(delay * 2, cap)
                continue
            self._answered()
            return out

    def _answered(self) -> None:
        """The endpoint answered: close the outage this process saw (one line)."""
        if self.uri in _outages:
            with _outage_lock:
                began = _outages.pop(self.uri, None)
            if began is not None:
                log.warning("storage %s reachable again after %.1f s", self._where(), time.monotonic() - began)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call(f"write {key}", lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data))

    def get_bytes(self, key: str) -> bytes:
        return self._call(f"read {key}", lambda: self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read())

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        def head() -> bool:
            try:
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
                return True
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise

        return self._call(f"look up {key}", head)

    def list(self, prefix: str) -> list[str]:
        full = (self._key(prefix) + "/") if prefix.strip("/.") else (f"{self.prefix}/" if self.prefix else "")

        def listing() -> list[str]:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
            return [o["Key"] for page in pages for o in page.get("Contents", [])]

        strip = len(self.prefix) + 1 if self.prefix else 0
        return sorted(k[strip:] for k in self._call(f"list {prefix}", listing))

    def delete(self, key: str) -> None:
        self._call(f"delete {key}", lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key)))

    def check(self) -> None:
        """Fail early: endpoint reachable, bucket present, credentials accepted."""
        try:
            self._check_client.head_bucket(Bucket=self.bucket)
        except Exception as e:
            raise self._wrap(e, "check the bucket") from None

    def arrow_fs(self):
        """A pyarrow S3 filesystem for Ray Train/Tune/Data, with the same outage bound as our own calls
        (AWS retry strategy, short timeouts). No keys are passed in: pyarrow resolves the same standard
        chain (environment, profile, instance role) wherever it runs, so the object that Ray pickles into
        experiment state and ships to workers carries no secret."""
        # allow_delayed_open: small objects go up as one PutObject instead of a multipart upload
        connect, read = self.settings.timeouts()
        kw: dict[str, Any] = {"region": self.region, "allow_delayed_open": True, "connect_timeout": connect,
                              "request_timeout": read}
        if self.endpoint_url:
            scheme, _, host = self.endpoint_url.partition("://")
            kw.update(endpoint_override=host.rstrip("/"), scheme=scheme)
        return _make_arrow_s3(kw, self.settings.arrow_retries()), f"{self.bucket}/{self.prefix}".rstrip("/")

    def __repr__(self) -> str:  # never shows credentials
        return f"S3Storage({self.uri!r}, endpoint={self.endpoint_url!r})"


_ARROW_S3 = None


def _make_arrow_s3(kw: dict[str, Any], retries: int):
    """``pyarrow.fs.S3FileSystem`` pickles without its retry strategy, so the copies Ray ships to its
    controller and workers would fall back to 3 attempts: this subclass pickles its settings whole."""
    global _ARROW_S3
    if _ARROW_S3 is None:
        import pyarrow.fs as pafs

        class BoundedRetryS3FileSystem(pafs.S3FileSystem):
            def __init__(self, kw: dict[str, Any], retries: int):
                # the default strategy backs off deterministically and has no retry quota to run dry mid-outage
                super().__init__(retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=retries), **kw)
                self._lkd_args = (kw, retries)

            def __reduce__(self):
                return _make_arrow_s3, self._lkd_args

        _ARROW_S3 = BoundedRetryS3FileSystem
    return _ARROW_S3(kw, retries)


def open_storage(uri: str, endpoint_url: str | None = None, outage_s: float | None = None) -> Storage:
    """``/path`` or ``file:///path`` → LocalStorage; ``s3://bucket[/prefix]`` → S3Storage (``outage_s``
    None: ``LKD_STORAGE_OUTAGE_S`` or 60 s)."""
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[5:].partition("/")
        if not bucket:
            raise StorageError(f"{uri!r} names no bucket; use s3://bucket/prefix")
        settings = S3Settings(endpoint_url=endpoint_url)
        if outage_s is not None:
            settings.outage_s = float(outage_s)
        return S3Storage(bucket, prefix, settings)
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"unsupported storage URI {uri!r}; use a local path, file:// or s3://bucket/prefix")
    return LocalStorage(uri[len("file://"):] if uri.startswith("file://") else uri)


def read_uri_bytes(uri: str) -> bytes:
    """Read one object named by a full URI (used for teacher checkpoints on S3)."""
    if not uri.startswith("s3://"):
        return Path(uri).read_bytes()
    bucket, _, key = uri[5:].partition("/")
    return S3Storage(bucket).get_bytes(key)
