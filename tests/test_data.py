import numpy as np
import pytest
import torch

from lkd_ray.config import DataCfg, build_config
from lkd_ray.data import DataNotFound, build_data, stratified_split
from lkd_ray.data.fashion import load_fashion_mnist


def test_stratified_split_is_disjoint_seeded_and_stratified():
    labels = np.repeat(np.arange(5), [100, 50, 20, 200, 30])
    tr, qz = stratified_split(labels, 0.1, seed=3)
    assert len(np.intersect1d(tr, qz)) == 0 and len(tr) + len(qz) == len(labels)
    for c, n in zip(range(5), [100, 50, 20, 200, 30]):
        assert (labels[qz] == c).sum() == round(0.1 * n)
    assert np.array_equal(stratified_split(labels, 0.1, 3)[1], qz)
    assert not np.array_equal(stratified_split(labels, 0.1, 4)[1], qz)
    with pytest.raises(ValueError, match="at least 2 per class"):
        stratified_split(np.array([0, 0, 1]), 0.1, 0)


def test_quiz_split_comes_from_training_set_not_test(fashion_available):
    raw = load_fashion_mnist()
    assert raw["train"][0].shape == (60000, 28, 28) and raw["test"][0].shape == (10000, 28, 28)
    d = build_data(DataCfg(quiz_fraction=0.1, augment=False))
    assert (d.train_size, d.quiz_size, d.test_size) == (54000, 6000, 10000)
    # the quiz images are exactly the training file's images at the quiz indices ...
    quiz_imgs = d.quiz.images
    expect = torch.from_numpy(raw["train"][0][d.quiz_indices].astype(np.float32) / 255)
    assert torch.allclose(quiz_imgs[:, 0] * 0.3530 + 0.2860, expect, atol=1e-5)
    # ... and are not in the training loader
    train_ids = {hash(x.numpy().tobytes()) for x in d.train.images[:, 0]}
    overlap = sum(hash(x.numpy().tobytes()) in train_ids for x in quiz_imgs[:, 0])
    dup_in_raw = len(raw["train"][0]) - len({hash(x.tobytes()) for x in raw["train"][0]})
    assert overlap <= dup_in_raw  # only byte-identical duplicates that the raw file itself contains


def test_loader_shapes_augmentation_and_sharding(fashion_available):
    d = build_data(DataCfg(image_size=32, channels=3, batch_size=64, train_subset=1000))
    x, y = next(iter(d.train))[:2]
    assert x.shape == (64, 3, 32, 32) and y.shape == (64,)
    r0 = build_data(DataCfg(train_subset=1000, batch_size=10), rank=0, world_size=2).train
    r1 = build_data(DataCfg(train_subset=1000, batch_size=10), rank=1, world_size=2).train
    a = {i for b in r0 for i in b.ids.tolist()}
    b_ = {i for b in r1 for i in b.ids.tolist()}
    assert not a & b_ and len(a) == len(b_) == 500 and len(r0) == 50  # DistributedSampler: disjoint, equal shards


def test_a_samples_view_depends_on_seed_epoch_and_id_not_on_its_rank_or_batch(fashion_available):
    """The shared spec keys augmentation by (seed, epoch, id): the same sample gets the same tensor
    on any rank, in any batch; another epoch or seed gives another view; views are uniform."""
    cfg = DataCfg(train_subset=600, batch_size=20)
    one = {int(i): x for b in build_data(cfg, seed=3).train for i, x in zip(b.ids, b.x)}
    two = {}
    for r in (0, 1):
        two.update({int(i): x for b in build_data(cfg, seed=3, rank=r, world_size=2).train for i, x in zip(b.ids, b.x)})
    common = set(one) & set(two)
    assert len(common) == 600 and all(torch.equal(one[i], two[i]) for i in common)
    loader = build_data(cfg, seed=3).train
    loader.set_epoch(1)
    other = {int(i): x for b in loader for i, x in zip(b.ids, b.x)}
    assert sum(not torch.equal(one[i], other[i]) for i in common) > 500
    from scipy.stats import chisquare

    views = loader.augment.views(np.arange(20000), 3, 0)
    assert chisquare(np.bincount(views, minlength=loader.augment.num_views)).pvalue > 1e-3


def test_missing_data_paths_fail_clearly(tmp_path):
    with pytest.raises(DataNotFound, match="the folder lacks train-images-idx3-ubyte.gz"):
        build_data(DataCfg(root=str(tmp_path)))
    with pytest.raises(DataNotFound, match="is not a folder"):
        build_data(build_config("cifar100", data={"root": str(tmp_path / "nope")}).data)
    with pytest.raises(DataNotFound, match="no cifar100 there"):
        build_data(build_config("cifar100", data={"root": str(tmp_path)}).data)
    with pytest.raises(DataNotFound, match="train/ and val/"):
        build_data(build_config("imagenet", data={"root": str(tmp_path)}).data)
