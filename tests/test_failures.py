"""How a job names a failure: found by the exception's type through Ray's wrappers, never by its text, and
never by the error that was being handled when another one was raised."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "jobs"))

from _common import failure_cause  # noqa: E402

from lkd_ray.distributed.lossnet_server import LossNetPersistError  # noqa: E402
from lkd_ray.storage import StorageError, StorageUnavailable  # noqa: E402


def _raised_while_handling(first: BaseException, second: BaseException) -> BaseException:
    try:
        try:
            raise first
        except type(first):
            raise second
    except type(second) as e:
        return e


def _in_a_worker(exc: BaseException):
    """What Ray Train V2's driver receives when a worker raised ``exc``."""
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    return WorkerGroupError("rank 1 failed", {1: UserExceptionWithTraceback(exc, "Traceback ...\nsome text")})


def test_a_storage_error_is_found_through_rays_wrappers_by_type():
    cause = failure_cause(_in_a_worker(StorageUnavailable("s3://b/run: unreachable for 60 s; rerun to resume")))
    assert cause == ("storage", "s3://b/run: unreachable for 60 s; rerun to resume")
    wrapped = RuntimeError("upload failed")
    wrapped.__cause__ = StorageError("bucket missing")
    assert failure_cause(_in_a_worker(wrapped)) == ("storage", "bucket missing")


def test_an_error_raised_while_handling_a_storage_error_is_not_a_storage_error():
    e = _raised_while_handling(StorageError("blip"), KeyError("a bug in the handler"))
    assert e.__context__ is not None and failure_cause(e) is None
    assert failure_cause(_in_a_worker(e)) is None
    # text that merely mentions storage errors is not one either
    assert failure_cause(RuntimeError("StorageUnavailable: this is only text")) is None


def test_a_lossnet_persist_failure_has_its_own_kind():
    import ray.exceptions

    e = LossNetPersistError("the LossNetServer stopped saving loss-network versions: TypeError: cannot pickle")
    task = ray.exceptions.RayTaskError("LossNetServer.submit", "Traceback ...", e).as_instanceof_cause()
    assert isinstance(task, LossNetPersistError) and str(task).splitlines()[0] != str(e)  # how Ray delivers it
    kind, msg = failure_cause(_in_a_worker(task))
    assert kind == "lossnet" and msg == str(e)  # its own words, not the wrapper's task name, pid and colours
    stored = ray.exceptions.RayTaskError("SnapshotIndex.flush", "Traceback ...", StorageError("bucket gone")).as_instanceof_cause()
    assert failure_cause(_in_a_worker(stored)) == ("storage", "bucket gone")


@pytest.mark.parametrize("text,kind", [("AWS Error NETWORK_CONNECTION during PutObject", "storage"), ("disk quota", None)])
def test_pyarrows_s3_errors_are_storage_errors(text, kind):
    from ray.train import ControllerError

    cause = failure_cause(ControllerError(OSError(text)))
    assert (cause[0] if cause else None) == kind


def test_a_lossnet_server_that_storage_stopped_is_a_storage_failure():
    import ray.exceptions

    from lkd_ray.distributed.lossnet_server import LossNetStorageError

    e = LossNetStorageError("the LossNetServer could not save a loss-network version: version 3: S3 error AccessDenied")
    task = ray.exceptions.RayTaskError("LossNetServer.submit_async", "Traceback ...", e).as_instanceof_cause()
    assert failure_cause(_in_a_worker(task)) == ("storage", str(e))
