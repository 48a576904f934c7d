"""Rank 0 chooses the checkpoint a resumed run starts from and every rank loads that one: a rank whose own
view of storage differs (a transient listing error) must not resume from another epoch."""
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("ray")

from lkd_ray.storage import LocalStorage, StorageError  # noqa: E402


class FlakyListing:
    """Local storage whose listing fails (as S3 may for one rank during a blip); reads work."""

    def __init__(self, inner, fail: bool):
        self.inner, self.fail = inner, fail

    def list(self, prefix):
        if self.fail:
            raise StorageError("listing timed out")
        return self.inner.list(prefix)

    def get_torch(self, key, **kw):
        return self.inner.get_torch(key, **kw)


def _rank(rank: int, world: int, port: int, root: str, out: str) -> None:
    from lkd_ray.distributed.worker import resume_state

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        state, registered = resume_state(FlakyListing(LocalStorage(root), fail=rank == 1), "run", None, rank, world, "cpu")
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump({"epoch": None if state is None else state["epoch"], "registered": registered,
                       "w": None if state is None else state["w"].tolist()}, f)
    finally:
        dist.destroy_process_group()


def test_every_rank_resumes_from_the_checkpoint_rank_0_chose(tmp_path):
    from tests.conftest import free_port

    st = LocalStorage(tmp_path / "store")
    for epoch in (1, 2):  # uploaded, but their registration was cut short: found only by listing storage
        st.put_torch(f"run/ray/checkpoint_00000{epoch}/trainer.pt", {"epoch": epoch, "w": torch.full((3,), float(epoch))})
    (tmp_path / "out").mkdir()
    mp.spawn(_rank, args=(2, free_port(), str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2, join=True)
    got = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert got[0] == got[1] == {"epoch": 2, "registered": False, "w": [2.0, 2.0, 2.0]}
