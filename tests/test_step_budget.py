"""The baseline's step budget (raykd.schemes.offline.step_budget): with ``data.labelled`` the
baseline learns the labelled part alone, so equal epochs would give it a fraction of the
student's optimizer steps; its epochs are scaled until its steps reach the student's."""

from __future__ import annotations

from raykd.config import load_config
from raykd.schemes.offline import step_budget, steps_per_epoch


def test_steps_per_epoch_follows_the_workers_share_and_the_batch():
    cfg = load_config(None, ["train.num_workers=2", "train.batch_size=64"])
    # each worker takes ceil(N / 2) samples in batches of 64
    assert steps_per_epoch(1294, cfg) == 11  # 647 per worker
    assert steps_per_epoch(129, cfg) == 2  # 65 per worker: one full batch and one of 1
    assert steps_per_epoch(128, cfg) == 1


def test_a_labelled_part_gets_the_students_steps():
    cfg = load_config(None, ["data.labelled=0.1", "train.epochs=200", "train.num_workers=2",
                             "train.batch_size=64"])
    # the student learns the labelled part and every pool image: the whole train split
    base, (student_steps, baseline_steps) = step_budget(cfg, {"transfer_size": 1294})
    assert student_steps == 200 * 11
    assert base.train.epochs == 1100 and baseline_steps == 1100 * 2  # 129 labelled images
    assert baseline_steps >= student_steps
    assert cfg.train.epochs == 200  # the student's config is left as it was
    # a resumed student has no transfer size: the whole train split bounds it
    assert step_budget(cfg, {})[1] == (student_steps, baseline_steps)


def test_fully_labelled_data_keeps_the_epochs():
    cfg = load_config(None, ["data.labelled=null", "train.epochs=20"])
    base, (student_steps, baseline_steps) = step_budget(cfg, {"transfer_size": 1294})
    assert base is cfg and student_steps == baseline_steps == 20 * 11
    # a student on a class subset has fewer steps; the baseline is never cut down to them
    base, (student_steps, baseline_steps) = step_budget(cfg, {"transfer_size": 600})
    assert base is cfg and (student_steps, baseline_steps) == (20 * 5, 20 * 11)
