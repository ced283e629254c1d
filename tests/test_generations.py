"""The pieces of the generational schemes that need no cluster: the labelled split and its
hidden labels, pseudo-label targets, the transfer set, seeded v2 augmentation, stochastic depth,
the lineage key and the per-generation configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raykd.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_labelled_split_is_stratified_seeded_and_hides_the_pool():
    from raykd.data import build_dataset
    from raykd.data.labelled import HIDDEN, class_counts, labelled_split, training_view

    cfg = load_config(None, {"data.labelled": 100})
    labelled, pool = labelled_split(cfg.data)
    train = build_dataset(cfg.data, "train")
    assert len(labelled) == 100 and len(labelled) + len(pool) == len(train)
    assert not set(labelled.tolist()) & set(pool.tolist())
    assert class_counts(cfg.data) == [10] * 10  # digits' classes are near equal: 10 each
    # a fraction, and another seed: another choice
    frac = load_config(None, {"data.labelled": 0.25}).data
    assert len(labelled_split(frac)[0]) == round(0.25 * len(train))
    other = load_config(None, {"data.labelled": 100, "data.split_seed": 1}).data
    assert labelled_split(other)[0].tolist() != labelled.tolist()
    # training's view: pool labels hidden, labelled ones kept, rows shared (the same store)
    view = training_view(cfg.data)
    assert (view.labels[pool] == HIDDEN).all()
    assert torch.equal(view.labels[labelled], train.labels[labelled])
    assert view.folder == train.folder and view.files == train.files
    assert torch.equal(view.get_batch(pool[:50])[1], train.get_batch(pool[:50])[1])
    assert (train.labels[pool] != HIDDEN).all()  # the split itself keeps its labels
    # unset: everything labelled, the split itself
    full = load_config(None).data
    assert len(labelled_split(full)[1]) == 0 and training_view(full) is build_dataset(full,
                                                                                      "train")


def test_too_many_labels_is_a_config_error():
    from raykd.data.labelled import labelled_split

    with pytest.raises(ConfigError, match="data.labelled"):
        labelled_split(load_config(None, {"data.labelled": 10**6}).data)


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_targets_never_read_pool_labels(mode):
    """Pool rows: hard label = the teacher's argmax, soft target = its logits (soft) or that
    argmax as one-hot (hard). Labelled rows: their label, one-hot. Whatever the pool's stored
    labels say changes nothing."""
    from raykd.train.transfer import TransferSet

    pool = torch.tensor([False, True, False, True])
    tset = TransferSet(None, torch.arange(4), pool, mode)
    t = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0], [1.0, 1.0, 4.0], [9.0, 0.0, 1.0]])
    idx = torch.arange(4)
    y1, s1 = tset.targets(idx, torch.tensor([1, -1, 0, -1]), t)
    y2, s2 = tset.targets(idx, torch.tensor([1, 7, 0, 2]), t)  # other "pool labels"
    assert torch.equal(y1, y2) and torch.equal(s1, s2)
    assert y1.tolist() == [1, 2, 0, 0]
    probs = torch.softmax(s1, -1)
    assert torch.allclose(probs[0], torch.tensor([0.0, 1.0, 0.0]))  # labelled: its label
    assert torch.allclose(probs[2], torch.tensor([1.0, 0.0, 0.0]))
    if mode == "soft":
        assert torch.equal(s1[[1, 3]], t[[1, 3]])
    else:
        assert torch.allclose(probs[1], torch.tensor([0.0, 0.0, 1.0]))
        assert torch.allclose(probs[3], torch.tensor([1.0, 0.0, 0.0]))


class _FakeCache:
    """Stands in for CachedTeacher: confident (one-hot-ish) logits on even train indices."""

    def logits(self, idx, view=0):
        out = torch.zeros(len(idx), 10)
        out[torch.as_tensor(idx) % 2 == 0, 0] = 20.0
        return out


def test_transfer_set_per_role_and_confidence_threshold():
    from raykd.data.labelled import labelled_split
    from raykd.train.transfer import transfer_set

    cfg = load_config(None, {"data.labelled": 100, "distill.confidence_threshold": 0.5})
    labelled, pool = labelled_split(cfg.data)
    teacher = transfer_set(cfg, "teacher")  # round 0: the labelled part alone
    assert torch.equal(teacher.indices, labelled)
    assert torch.equal(transfer_set(cfg, "baseline").indices, labelled)
    student = transfer_set(cfg, "student", _FakeCache())
    confident = pool[pool % 2 == 0]
    assert torch.equal(student.indices, torch.sort(torch.cat([labelled, confident])).values)
    assert student.counts == {"labelled": 100, "pool": len(pool),
                              "pseudo_labelled": len(confident)}
    # the student never gets a hidden label from the dataset it trains on
    _, _, y = student.dataset.get_batch(student.indices)
    in_pool = student.pool[student.indices]
    assert (y[in_pool] == -1).all() and (y[~in_pool] >= 0).all()


def test_v2_augmentation_is_per_sample_and_seeded():
    from raykd.data.augment import apply_transform, build_transform

    cfg = load_config(None, {"train.augment": [
        {"name": "RandomAffine", "args": {"degrees": 15, "translate": [0.2, 0.2]}}]})
    t = build_transform(cfg.train.augment)
    x = torch.rand(1, 1, 8, 8).expand(4, 1, 8, 8).contiguous()  # one image, four times
    before = torch.random.get_rng_state()
    a = apply_transform(x, torch.tensor([5, 6, 5, 7]), t)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG untouched
    assert torch.equal(a[0], a[2])  # same seed, same image
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[1], a[3])  # own draws per sample
    assert torch.equal(a, apply_transform(x, torch.tensor([5, 6, 5, 7]), t))
    assert build_transform([]) is None


def test_stochastic_depth_drops_branches_only_while_training():
    from raykd.data import dataset_info
    from raykd.models import build_model
    from raykd.config import ModelConfig

    info = dataset_info(load_config(None).data)
    plain = build_model(ModelConfig(name="resnet8"), info)
    noisy = build_model(ModelConfig(name="resnet8", args={"stochastic_depth": 0.5}), info)
    assert plain.state_dict().keys() == noisy.state_dict().keys()  # no new weights
    noisy.load_state_dict(plain.state_dict())
    x = torch.rand(16, *info.input_shape)
    plain.eval(), noisy.eval()
    assert torch.allclose(plain(x), noisy(x))
    noisy.train()
    torch.manual_seed(0)
    first = noisy(x)
    assert not torch.allclose(first, noisy(x))  # another draw of dropped blocks


def test_lineage_key_ignores_the_length_of_the_chain():
    from raykd.schemes.lineage import lineage_key

    a = load_config(None, {"born_again.generations": 2})
    b = load_config(None, {"born_again.generations": 5, "tracking.uri": "sqlite:////x.db"})
    c = load_config(None, {"born_again.generations": 2, "train.lr": 0.5})
    assert lineage_key(a, "born-again") == lineage_key(b, "born-again")
    assert lineage_key(a, "born-again") != lineage_key(c, "born-again")
    assert lineage_key(a, "born-again") != lineage_key(a, "noisy-student")


def test_generation_and_round_configs():
    from raykd.schemes.born_again import generation_config
    from raykd.schemes.noisy_student import round_config

    cfg = load_config(CONFIGS / "digits_born_again.yaml",
                      {"born_again.students": [{"name": "mlp", "args": {"hidden_sizes": [64]}}]})
    g1, g2 = generation_config(cfg, 1), generation_config(cfg, 2)
    assert g1.teacher.args == cfg.teacher.args and g1.student.args == {"hidden_sizes": [64]}
    assert g2.teacher.args == {"hidden_sizes": [64]} == g2.student.args  # the last repeats
    plain = generation_config(load_config(CONFIGS / "digits_born_again.yaml"), 1)
    assert plain.student.name == plain.teacher.name and plain.student.args == plain.teacher.args

    ns = load_config(CONFIGS / "digits_noisy_student.yaml")
    r1 = round_config(ns, 1)
    assert r1.student.args["dropout"] == ns.noisy_student.noise.dropout
    assert [t.name for t in r1.train.augment] == ["RandomAffine"]
    assert r1.teacher.args == ns.teacher.args and r1.teacher.checkpoint is None


def test_a_given_teacher_is_generation_zero(digits_teacher, mlflow_uri):
    """``teacher.checkpoint`` as generation 0: its own model (from the file, not the config's
    teacher section) is the default for generation 1; it is evaluated in the driver and logged
    as the lineage's first child run."""
    from mlflow.tracking import MlflowClient

    from raykd.schemes.born_again import generation_config
    from raykd.schemes.chain import first_member
    from raykd.schemes.lineage import lineage_run

    cfg = load_config(CONFIGS / "digits_born_again.yaml", {
        "teacher.checkpoint": str(digits_teacher), "tracking.uri": mlflow_uri})
    assert cfg.teacher.args["hidden_sizes"] == [256, 256]
    assert generation_config(cfg, 1).student.args["hidden_sizes"] == [512, 512]
    with lineage_run(mlflow_uri, cfg, "born-again", False, "ban") as lineage:
        member = first_member(cfg, mlflow_uri, lineage)
    assert member.source == str(digits_teacher) and member.teacher_run_id is None
    assert member.accuracy > 0.85  # the session's 3-epoch digits teacher (about 0.94)
    run = MlflowClient(tracking_uri=mlflow_uri).get_run(member.run_id)
    assert run.data.tags["raykd.generation"] == "0"
    assert run.data.tags["raykd.checkpoint"] == str(digits_teacher)
    assert run.data.tags["mlflow.parentRunId"] == lineage.parent
    assert run.data.metrics["test_accuracy"] == pytest.approx(member.accuracy)
