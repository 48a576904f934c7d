"""Storage against a real local folder and a real S3 endpoint (moto_server over HTTP on 127.0.0.1)."""
import os
import time

import pytest
import torch

from lkd_ray.storage import ChecksumMismatch, LocalStorage, S3Settings, S3Storage, StorageError, open_storage, safe_key


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket")
    return S3Storage(bucket, "runs", S3Settings(endpoint_url=request.getfixturevalue("moto_endpoint")))


def test_roundtrip_list_delete_and_checksums(storage):
    storage.check()
    entry = storage.put_torch("r1/snapshots/10.pt", {"w": torch.arange(6.0)})
    assert entry["size"] > 0 and len(entry["sha256"]) == 64
    assert torch.equal(storage.get_torch(entry["key"], expect_sha256=entry["sha256"])["w"], torch.arange(6.0))
    storage.put_json("r1/snapshots/manifest.json", {"snapshots": [entry]})
    assert storage.list("r1/snapshots") == ["r1/snapshots/10.pt", "r1/snapshots/manifest.json"]
    assert storage.exists("r1/snapshots/10.pt") and not storage.exists("r1/nothing.pt")
    storage.put_bytes("r1/snapshots/10.pt", b"garbage")  # corrupted / overwritten behind the manifest's back
    with pytest.raises(ChecksumMismatch, match="does not match the manifest"):
        storage.get_torch("r1/snapshots/10.pt", expect_sha256=entry["sha256"])
    with pytest.raises(StorageError, match="not a weights-only torch file"):
        storage.get_torch("r1/snapshots/10.pt")
    storage.delete("r1/snapshots/10.pt")
    assert not storage.exists("r1/snapshots/10.pt")
    with pytest.raises(StorageError):
        storage.get_bytes("r1/snapshots/10.pt")


def test_pickled_objects_are_refused(storage):
    import pickle

    storage.put_bytes("r/evil.pt", pickle.dumps({"f": os.system}))
    with pytest.raises(StorageError, match="weights-only"):
        storage.get_torch("r/evil.pt")


@pytest.mark.parametrize("bad", ["../x", "a/../../b", "/etc/passwd/..", "a/./b", "a b", "~/x"])
def test_keys_cannot_escape_the_prefix(bad, tmp_path):
    with pytest.raises(StorageError, match="unsafe storage key|empty"):
        LocalStorage(tmp_path).put_bytes(bad, b"x")


def test_local_writes_are_atomic_and_leave_no_temp_files(tmp_path):
    st = LocalStorage(tmp_path)
    for i in range(5):
        st.put_bytes("run/obj.bin", bytes([i]) * 1000)
    assert st.get_bytes("run/obj.bin") == bytes([4]) * 1000
    assert sorted(os.listdir(tmp_path / "run")) == ["obj.bin"]


def test_missing_bucket_and_unreachable_endpoint_fail_early_and_clearly(moto_endpoint):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        S3Storage("no-such-bucket", "", S3Settings(endpoint_url=moto_endpoint)).check()
    from tests.conftest import free_port

    t0 = time.time()
    with pytest.raises(StorageError, match="cannot reach S3 endpoint"):
        S3Storage("b", "", S3Settings(endpoint_url=f"http://127.0.0.1:{free_port()}")).check()
    assert time.time() - t0 < 30


def test_credentials_never_appear_in_repr_or_errors(moto_endpoint):
    st = S3Storage("no-such-bucket", "", S3Settings(endpoint_url=moto_endpoint))
    assert "testing" not in repr(st)
    with pytest.raises(StorageError) as e:
        st.check()
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in str(e.value)


def test_open_storage_uris(tmp_path):
    assert isinstance(open_storage(str(tmp_path)), LocalStorage)
    assert isinstance(open_storage(f"file://{tmp_path}"), LocalStorage)
    with pytest.raises(StorageError, match="unsupported storage URI"):
        open_storage("gs://bucket/x")
    with pytest.raises(StorageError, match="names no bucket"):
        open_storage("s3:///x")
    assert safe_key("a", "b/c") == "a/b/c"


def test_arrow_filesystem_reads_what_boto3_wrote_and_pickles_no_secret(s3_bucket, moto_endpoint, monkeypatch):
    import pickle

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-for-this-test")
    st = S3Storage(s3_bucket, "p", S3Settings(endpoint_url=moto_endpoint))
    st.put_bytes("run/x.txt", b"hello")
    fs, base = st.arrow_fs()
    with fs.open_input_stream(f"{base}/run/x.txt") as f:
        assert f.read() == b"hello"
    assert b"s3cr3t-value-for-this-test" not in pickle.dumps(fs)  # Ray stores and ships this object


def test_bad_credentials_fail_early_and_clearly(tmp_path):
    """A second moto_server that enforces authentication: unknown keys are refused."""
    from tests.conftest import start_moto

    proc, url = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        with pytest.raises(StorageError, match="refused the credentials") as e:
            S3Storage("any-bucket", "", S3Settings(endpoint_url=url)).check()
        assert "testing" not in str(e.value)
    finally:
        proc.terminate()
        proc.wait(10)
