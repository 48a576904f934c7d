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


def _particle_rank(rank: int, world: int, port: int, root: str, out: str) -> None:
    from lkd_ray.distributed.worker import PARTICLE_FILE, resume_state

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        state, _ = resume_state(LocalStorage(root), "run", None, rank, world, "cpu", own_file=PARTICLE_FILE.format(rank),
                                need=tuple(PARTICLE_FILE.format(r) for r in range(1, world)))
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump({"epoch": state["epoch"], "w": state["w"].tolist()}, f)
    finally:
        dist.destroy_process_group()


def test_every_es_particle_resumes_its_own_state_from_a_checkpoint_that_holds_every_particles(tmp_path):
    """ES on Ray: each particle's state is its own file in the checkpoint. The epoch-2 checkpoint lost particle 1's
    upload: both particles resume from epoch 1, each its own student (w 1 for particle 0, −1 for particle 1) —
    not particle 1 from particle 0's epoch-2 student."""
    from tests.conftest import free_port

    st = LocalStorage(tmp_path / "store")
    st.put_torch("run/ray/checkpoint_000001/trainer.pt", {"epoch": 1, "w": torch.full((3,), 1.0)})
    st.put_torch("run/ray/checkpoint_000001/particle-001.pt", {"epoch": 1, "w": torch.full((3,), -1.0)})
    st.put_torch("run/ray/checkpoint_000002/trainer.pt", {"epoch": 2, "w": torch.full((3,), 2.0)})
    (tmp_path / "out").mkdir()
    mp.spawn(_particle_rank, args=(2, free_port(), str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2, join=True)
    got = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert got == [{"epoch": 1, "w": [1.0, 1.0, 1.0]}, {"epoch": 1, "w": [-1.0, -1.0, -1.0]}]


def test_no_checkpoint_with_every_particles_state_stops_instead_of_starting_over(tmp_path):
    from lkd_ray.distributed.worker import newest_checkpoint

    st = LocalStorage(tmp_path / "store")
    st.put_torch("run/ray/checkpoint_000001/trainer.pt", {"epoch": 1, "w": torch.zeros(3)})
    with pytest.raises(RuntimeError, match="no checkpoint of run holds every ES particle's state.*particle-001.pt"):
        newest_checkpoint(st, "run", None, "cpu", need=("particle-001.pt",))
    assert newest_checkpoint(st, "run", None, "cpu")[0]["epoch"] == 1  # not ES: rank 0's file is the whole state
