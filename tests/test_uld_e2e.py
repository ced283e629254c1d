"""Cross-tokenizer distillation end to end: a tiny GPT-2 teacher with a byte-level BPE of 1024
tokens and a student with a BPE of 512, both trained on one corpus the test writes; `raykd
distill` with `teacher.tokenizer` and `token_uld` (2 Ray Train workers, the teacher actor's
per-token cache, real MLflow). Then the cache is checked against the two tokenizers by hand, and
each configuration that cannot align the text is one line before Ray starts."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

STUDENT = "{model_type: gpt2, config: {n_layer: 1, n_embd: 32, n_head: 2, n_positions: 64}}"
BLOCK = 32
ULD = "[{name: ce, weight: 0.5}, {name: token_uld, weight: 0.5}]"


def write_corpus(path: Path, sentences: int = 1500, seed: int = 0) -> Path:
    """A toy grammar over a few hundred made-up words: enough distinct pairs that byte-level BPEs
    of 512 and 1024 tokens both fill their vocabularies (and so differ)."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sha", "tor", "vel", "quin", "bra", "dor", "fen",
                 "gal", "hum", "jix", "wyn", "zel", "pra", "sto", "cre"]

    def word() -> str:
        return "".join(rng.choice(syllables) for _ in range(rng.randint(2, 3)))

    names = [word() for _ in range(300)]
    verbs = [word() + "s" for _ in range(150)]
    places = ["in the " + word() for _ in range(150)]
    lines = [f"{rng.choice(names)} {rng.choice(verbs)} {rng.choice(places)}."
             for _ in range(sentences)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from lm_corpus import write_teacher

    root = tmp_path_factory.mktemp("uld")
    corpus = write_corpus(root / "corpus.txt")
    teacher = write_teacher(root / "teacher", corpus, vocab_size=1024, steps=150)
    return corpus, teacher, root


CONFIG = Path(__file__).resolve().parents[1] / "configs" / "shakespeare_lm.yaml"


def distill_args(root: Path, corpus: Path, teacher: Path, *extra: str) -> list[str]:
    return ["--config", str(CONFIG),
            "--set", f"data.path={corpus}", "--set", "data.vocab_size=512",
            "--set", f"data.block_size={BLOCK}", "--set", f"teacher.checkpoint={teacher}",
            "--set", f"teacher.tokenizer={teacher}", "--set", "teacher.topk=16",
            "--set", f"student.args={STUDENT}", "--set", "student.init_from_teacher=false",
            "--set", f"distill.losses={ULD}",
            "--set", "train.epochs=2", "--set", "train.batch_size=16", "--set", "train.lr=0.003",
            "--set", "train.num_workers=2", "--set", "train.checkpoint_seconds=null",
            "--set", f"teacher.cache_dir={root / 'cache'}",
            "--set", f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
            "--set", "tracking.experiment=uld", *extra]


@pytest.fixture(scope="module")
def distilled(ray_session, files):
    """`raykd distill --baseline` in its own process (as a user runs it), on the session's Ray."""
    import os
    import subprocess
    import sys

    corpus, teacher, root = files
    run = root / "run"
    run.mkdir()
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    with (run / "console.txt").open("w") as console:
        rc = subprocess.run(
            [sys.executable, "-m", "raykd.cli", "distill",
             *distill_args(run, corpus, teacher), "--baseline", "--summary", str(run / "s.json")],
            cwd=run, env=env, stdout=console, stderr=subprocess.STDOUT, timeout=900).returncode
    assert rc == 0, (run / "console.txt").read_text()[-4000:]
    return json.loads((run / "s.json").read_text()), run


def test_the_teacher_labels_the_same_text_in_its_own_tokens(distilled, files):
    from raykd.data import build_dataset
    from raykd.data.tokenizer import load_tokenizer
    from raykd.teacher.token_cache import topk_from_rows

    summary, run = distilled
    corpus, teacher, root = files
    cache = summary["teacher"]["cache"]
    assert cache["status"] == "built" and cache["per_token"] is True
    t_tok = load_tokenizer(teacher / "tokenizer.json")
    t_vocab = t_tok.get_vocab_size(with_added_tokens=True)
    assert cache["num_classes"] == t_vocab == 1024
    topk = topk_from_rows({name: np.load(Path(cache["path"]) / f"{name}.npy")
                           for name in ("values", "ids", "tail_logmass")}, t_vocab)
    assert topk.vocab_size == t_vocab and int(topk.ids.long().max()) >= 512  # teacher ids
    # by hand: each student block's text, encoded by the teacher; its length is where the
    # cache's teacher positions end (NaN tail after them), position 0 onwards aligned
    cfg = config_of(distill_args(run, corpus, teacher))
    train = build_dataset(cfg.data, "train")
    s_tok = load_tokenizer(train.info.tokenizer_file)
    assert s_tok.get_vocab_size(with_added_tokens=True) == 512
    for i in (0, 1, len(train) // 2, len(train) - 1):
        n = int((train.labels[i] != -100).sum())
        text = s_tok.decode(train.inputs[i, :n].tolist(), skip_special_tokens=False)
        expected = min(len(t_tok.encode(text, add_special_tokens=False).ids), BLOCK)
        has_teacher = ~torch.isnan(topk.tail_logmass[i])
        assert has_teacher.tolist() == [p < expected for p in range(BLOCK)], i
    assert bool(torch.isnan(topk.tail_logmass).any())  # the 1024 BPE writes fewer tokens
    assert torch.isfinite(topk.values[~torch.isnan(topk.tail_logmass)].float()).all()


def test_teacher_tokens_read_the_blocks_text(files, workdir):
    """Without Ray: the teacher's inputs for a block are the teacher tokenizer's encoding of the
    text the student's block decodes to, cut at the block size; unset or same tokenizer: None."""
    from raykd.data import build_dataset
    from raykd.data.cross_tokens import teacher_tokens
    from raykd.data.tokenizer import load_tokenizer

    corpus, teacher, _ = files
    cfg = config_of(distill_args(workdir, corpus, teacher))
    train = build_dataset(cfg.data, "train")
    own = teacher_tokens(cfg, train)
    assert own.info.vocab_size == 1024 and own.inputs.shape == train.inputs.shape
    s_tok, t_tok = load_tokenizer(train.info.tokenizer_file), load_tokenizer(teacher /
                                                                             "tokenizer.json")
    for i in (0, len(train) - 1):
        n = int((train.labels[i] != -100).sum())
        text = s_tok.decode(train.inputs[i, :n].tolist(), skip_special_tokens=False)
        ids = t_tok.encode(text, add_special_tokens=False).ids[:BLOCK]
        assert own.lengths[i] == len(ids) and own.inputs[i, :len(ids)].tolist() == ids
        got = t_tok.decode(own.inputs[i, :int(own.lengths[i])].tolist(),
                           skip_special_tokens=False)
        assert text.startswith(got) and len(got) > 0
    assert (own.lengths < BLOCK).any()  # coarser tokens: some blocks end early for the teacher
    assert teacher_tokens(config_of(distill_args(workdir, corpus, teacher),
                                    "teacher.tokenizer=null"), train) is None


def test_the_student_trains_on_token_uld_across_vocabularies(distilled):
    summary, _ = distilled
    history = summary["student"]["history"]
    assert all(math.isfinite(h["loss_token_uld"]) and h["loss_token_uld"] > 0 for h in history)
    assert history[-1]["loss_token_uld"] < history[0]["loss_token_uld"]
    assert "teacher_agreement" not in history[-1]  # ids of two tokenizers: undefined
    lm = summary["language_model"]
    assert lm["student_teacher_agreement"] is None
    assert lm["teacher_tokens"] < lm["tokens"]  # the same test text in fewer teacher tokens
    assert math.isfinite(lm["teacher"]["perplexity"]) and math.isfinite(
        lm["student"]["perplexity"])
    print(json.dumps({"student_val": history[-1]["val_loss"],
                      "baseline_val": summary["baseline"]["history"][-1]["val_loss"],
                      "student_test_acc": summary["student"]["accuracy"],
                      "baseline_test_acc": summary["baseline"]["accuracy"], **lm}, indent=1))


def config_of(args: list[str], *more: str):
    """The validated config ``raykd distill ARGS`` would run (its --set values, in order)."""
    from raykd.config import load_config

    return load_config(str(CONFIG), [*args[3::2], *more])


def _main(args, cli_stderr):
    from raykd.cli import main

    rc = main(["distill", *args])
    return rc, cli_stderr()


def test_configs_without_a_text_alignment_are_one_line_before_ray(files, workdir, cli_stderr):
    import ray

    corpus, teacher, _ = files
    base = distill_args(workdir, corpus, teacher)
    started = ray.is_initialized()
    kd = "[{name: ce, weight: 0.5}, {name: token_kd, weight: 0.5}]"
    cases = [
        (["--set", f"distill.losses={kd}"],
         "distill.losses.1: token_kd compares teacher and student probabilities token id by "
         "token id, but the teacher reads its own tokenizer (teacher.tokenizer, 1024 ids) and "
         "the student another (512 ids); use token_uld"),
        (["--set", "teacher.mode=live"], "teacher.mode: a teacher with its own tokenizer"),
        (["--set", "teacher.replicas=2"], "teacher.replicas: a teacher with its own "
                                          "tokenizer (teacher.tokenizer) builds its cache in "
                                          "the teacher actor only"),
        (["--set", "teacher.checkpoint=null"], "teacher.tokenizer: a teacher trained by this "
                                               "job learns data.tokenizer's tokens"),
        # the teacher folder's own tokenizer, but no teacher.tokenizer: ids read as its own
        (["--set", "teacher.tokenizer=null", "--set", "data.vocab_size=512"],
         f"teacher.tokenizer: the teacher's folder {teacher} holds its own tokenizer.json"),
    ]
    for extra, start in cases:
        args = list(base)
        if "data.vocab_size=512" in extra:  # data.tokenizer unset defaults to the folder's
            extra = [*extra, "--set", f"data.tokenizer={workdir / 'student_tok'}"]
            _student_tokenizer(corpus, workdir / "student_tok")
        rc, err = _main([*args, *extra], cli_stderr)
        assert rc == 2, err
        assert err.startswith(f"raykd: error: {start}"), err
        assert "\n" not in err and "Traceback" not in err, err
    assert ray.is_initialized() == started


def test_vocabulary_mismatch_without_teacher_tokenizer_names_token_uld(files, workdir,
                                                                       cli_stderr):
    """One tokenizer, models of different vocabularies: token_kd is refused with a line naming
    token_uld, and token_uld itself passes the checks (the teacher reads the same ids)."""
    from raykd.preflight import preflight

    corpus, teacher, _ = files
    args = distill_args(workdir, corpus, teacher, "--set", "teacher.tokenizer=null",
                        "--set", f"data.tokenizer={teacher}",
                        "--set", "student.args.config.vocab_size=1100",
                        "--set", "distill.losses=[{name: token_kd}]")
    rc, err = _main(args, cli_stderr)
    assert rc == 2 and err.startswith(
        "raykd: error: student.args.config.vocab_size: the student's vocabulary has 1100 ids, "
        "the teacher's 1024; token_kd (distill.losses.0) needs one vocabulary"), err
    assert "use token_uld" in err and "\n" not in err
    preflight(config_of(args, f"distill.losses={ULD}"))  # no error


def _student_tokenizer(corpus: Path, folder: Path) -> None:
    from raykd.data.tokenizer import train_bpe

    if not (folder / "tokenizer.json").is_file():
        train_bpe([corpus.read_text()], 512, folder / "tokenizer.json")
