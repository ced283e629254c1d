"""Sequence-level KD (issue 19; Kim & Rush 2016): generation, the fingerprinted dataset of
generated sequences, the student's view of it as train blocks, config errors, and one real run of
`raykd seq-kd` (2 Ray Train workers, MLflow in sqlite) on a corpus and a tiny GPT-2 teacher the
test writes. Nothing is downloaded."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

VOCAB = 300
BLOCK = 32


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """(corpus, teacher folder, root): a seeded toy corpus and a tiny GPT-2 trained on it."""
    from lm_corpus import write_corpus, write_teacher

    root = tmp_path_factory.mktemp("seqkd")
    corpus = write_corpus(root / "corpus.txt")
    teacher = write_teacher(root / "teacher", corpus, vocab_size=VOCAB, steps=150)
    return corpus, teacher, root


def _config(lm, cache: Path, **seq):
    from raykd.config import validate

    corpus, teacher, _ = lm
    return validate({
        "data": {"name": "text", "path": str(corpus), "tokenizer": str(teacher),
                 "block_size": BLOCK},
        "teacher": {"name": "hf_causal_lm", "args": {"pretrained": str(teacher)},
                    "checkpoint": str(teacher), "cache_dir": str(cache)},
        "student": {"name": "hf_causal_lm", "args": {"model_type": "gpt2", "config": {
            "n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64}}},
        "distill": {"losses": [{"name": "ce"}]},
        "sequence_kd": {"prompts": 6, "prompt_tokens": 4, "new_tokens": 8, **seq}})


def _teacher(lm):
    from raykd.models.hf import load_hf_folder

    return load_hf_folder(lm[1]).eval()


def _spec(decoding="greedy", new_tokens=8, seed=0, eos=None):
    from raykd.data.sequences import SequenceSpec

    sample = decoding == "sample"
    return SequenceSpec(teacher_fingerprint="t", corpus_sha256="c", tokenizer_sha256="k",
                        block_size=BLOCK, prompts=4, prompt_tokens=4, new_tokens=new_tokens,
                        decoding=decoding, temperature=1.0 if sample else None,
                        seed=seed if sample else None, batch_size=2 if sample else None,
                        eos_token_id=eos)


def _prompts(lm, n=4):
    from raykd.data import build_dataset

    return build_dataset(_config(lm, lm[2] / "cache").data, "train").inputs[:n, :4]


def test_greedy_is_the_argmax_continuation(lm):
    from raykd.teacher.generate import generate_continuations

    model, prompts = _teacher(lm), _prompts(lm)

    tokens, lengths = generate_continuations(model, prompts, _spec(), batch_size=3,
                                             progress=False)
    assert tokens.shape == (4, 12) and torch.equal(tokens[:, :4], prompts)
    by_hand = prompts.clone()
    with torch.no_grad():
        for _ in range(8):  # the whole prefix every step, no key/value cache: argmax by hand
            by_hand = torch.cat([by_hand, model(by_hand)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(tokens, by_hand) and lengths.tolist() == [12] * 4


def test_sampling_repeats_for_a_seed_and_changes_with_it(lm):
    from raykd.teacher.generate import generate_continuations

    model, prompts = _teacher(lm), _prompts(lm)
    runs = [generate_continuations(model, prompts, _spec("sample", seed=s), 2,
                                   progress=False)[0] for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    generate_continuations(model, prompts, _spec("sample", seed=7), 2, progress=False)
    assert torch.equal(torch.rand(1), before)  # the caller's RNG is left as it was


def test_a_continuation_ends_at_end_of_text():
    from raykd.data.sequences import sequence_blocks
    from raykd.teacher.generate import _lengths

    eos = 0
    tokens = torch.tensor([[5, 6, 7, eos, eos, eos], [5, 6, 7, 8, 9, 10]])
    lengths = _lengths(tokens, prompt_tokens=2, eos=eos)
    assert lengths.tolist() == [4, 6]
    inputs, labels = sequence_blocks(tokens, lengths, block_size=8, pad=eos)
    assert labels[0].tolist() == [6, 7, eos] + [-100] * 5  # learns to end, then masked
    assert labels[1].tolist() == [6, 7, 8, 9, 10] + [-100] * 3
    assert inputs[1, :5].tolist() == [5, 6, 7, 8, 9]


def test_dataset_round_trips_is_reused_and_rebuilt_on_change(lm, tmp_path):
    from raykd.data import build_dataset
    from raykd.data.sequences import DATA_FILE
    from raykd.schemes.sequence_kd import student_config
    from raykd.teacher.generate import ensure_sequences

    model = _teacher(lm)
    cfg = _config(lm, tmp_path)
    train = build_dataset(cfg.data, "train")
    first = ensure_sequences(cfg, model, train, "fp-1", tmp_path)
    assert first["status"] == "built" and first["rows"] == 6 and first["width"] == 12
    assert len(first["samples"]) == 4 and first["samples"][0]["continuation"]
    again = ensure_sequences(cfg, model, train, "fp-1", tmp_path)
    assert again["status"] == "reused" and again["key"] == first["key"]
    assert again["sha256"] == first["sha256"]
    # greedy draws nothing: a sampling seed is no part of its identity
    assert ensure_sequences(cfg.with_overrides({"sequence_kd.seed": 3}), model, train, "fp-1",
                            tmp_path)["status"] == "reused"
    for changed, fp in ((cfg.with_overrides({"sequence_kd.new_tokens": 6}), "fp-1"),
                        (cfg.with_overrides({"sequence_kd.decoding": "sample"}), "fp-1"),
                        (cfg, "fp-2")):  # a setting, the decoding, the teacher's weights
        other = ensure_sequences(changed, model, train, fp, tmp_path)
        assert other["status"] == "built" and other["key"] != first["key"]
    path = Path(first["path"])
    data = path / DATA_FILE
    data.write_bytes(data.read_bytes()[:-8] + b"\0" * 8)  # damaged in place
    assert ensure_sequences(cfg, model, train, "fp-1", tmp_path)["status"] == "rebuilt"

    # the student's train split: the generated rows as blocks; val and test the corpus's
    student = student_config(cfg, str(path)).data
    blocks = build_dataset(student, "train")
    assert len(blocks) == 6 and blocks.inputs.shape == (6, BLOCK)
    from safetensors.torch import load_file

    rows = load_file(str(data))
    assert torch.equal(blocks.inputs[:, :11], rows["tokens"][:, :-1])
    assert torch.equal(blocks.labels[:, :11], rows["tokens"][:, 1:])
    assert (blocks.labels[:, 11:] == -100).all()
    assert torch.equal(rows["tokens"][:, :4], train.inputs[rows["prompt_rows"], :4])
    assert torch.equal(build_dataset(student, "test").inputs, build_dataset(cfg.data,
                                                                           "test").inputs)
    assert blocks.info.identity != train.info.identity  # the teacher cache keys on it
    mixed = build_dataset(student_config(cfg.with_overrides({"sequence_kd.mix_original": True}),
                                         str(path)).data, "train")
    assert len(mixed) == 6 + len(train)


@pytest.mark.parametrize("override, field", [
    ({"sequence_kd": {"decoding": "beam"}}, "sequence_kd.decoding"),
    ({"sequence_kd": {"temperature": 0.7}}, "sequence_kd.temperature"),
    ({"sequence_kd": {"decoding": "sample", "temperature": 0}}, "sequence_kd.temperature"),
    ({"sequence_kd": {"top_k": 5}}, "sequence_kd.top_k"),
    ({"sequence_kd": {"prompts": 0}}, "sequence_kd.prompts"),
    ({"sequence_kd": {"prompt_tokens": 32}}, "sequence_kd.prompt_tokens"),
    ({"sequence_kd": {"prompt_tokens": 4, "new_tokens": 30}}, "sequence_kd.new_tokens"),
    ({"sequence_kd": {"beams": 4}}, "sequence_kd.beams"),
    ({"data": {"name": "digits"}, "sequence_kd": {}}, "sequence_kd"),
])
def test_bad_config_values_fail_with_one_line(override, field):
    from raykd.config import ConfigError, validate

    raw = {"data": {"name": "text", "path": "corpus.txt", "block_size": BLOCK}, **override}
    with pytest.raises(ConfigError) as err:
        validate(raw)
    message = str(err.value)
    assert message.startswith(f"{field}:") and "\n" not in message, message


def test_cli_rejects_more_prompts_than_blocks_before_ray(lm, tmp_path, capsys):
    import ray

    from raykd.cli import main

    corpus, teacher, _ = lm
    ray_before = ray.is_initialized()
    rc = main(["seq-kd", "--config", str(_CONFIG), "--set", f"data.path={corpus}",
               "--set", f"data.tokenizer={teacher}", "--set", f"teacher.checkpoint={teacher}",
               "--set", f"data.block_size={BLOCK}", "--set", f"student.args={STUDENT}",
               "--set", f"teacher.cache_dir={tmp_path}", "--set", "sequence_kd.prompts=100000",
               "--set", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("raykd: error: sequence_kd.prompts:"), err
    assert len(err.splitlines()) == 1
    assert ray.is_initialized() == ray_before  # stopped before any cluster was started


_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "shakespeare_seqkd.yaml"
STUDENT = "{model_type: gpt2, config: {n_layer: 1, n_embd: 32, n_head: 2, n_positions: 64}}"


@pytest.fixture(scope="module")
def seq_kd(ray_session, lm):
    """Run `raykd seq-kd` in a subprocess on the session's Ray cluster: (summary, console)."""
    import os
    import subprocess
    import sys

    corpus, teacher, root = lm
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    base = ["--config", str(_CONFIG),
            "--set", f"data.path={corpus}", "--set", f"data.tokenizer={teacher}",
            "--set", f"data.block_size={BLOCK}", "--set", f"teacher.checkpoint={teacher}",
            "--set", f"student.args={STUDENT}", "--set", "student.init_from_teacher=false",
            "--set", "sequence_kd.prompt_tokens=4",  # a prompt from every train block
            "--set", "train.batch_size=16", "--set", "train.lr=0.003",
            "--set", "train.num_workers=2", "--set", "train.checkpoint_seconds=null",
            "--set", f"teacher.cache_dir={root / 'e2e-cache'}",
            "--set", f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
            "--set", "tracking.experiment=seqkd"]

    def run(name: str, *extra: str) -> tuple[dict, str]:
        with (root / f"{name}.txt").open("w") as console:
            rc = subprocess.run([sys.executable, "-m", "raykd.cli", "seq-kd", *base, *extra,
                                 "--summary", str(root / f"{name}.json")], cwd=root, env=env,
                                stdout=console, stderr=subprocess.STDOUT,
                                timeout=900).returncode
        log = (root / f"{name}.txt").read_text()
        assert rc == 0, log[-4000:]
        return json.loads((root / f"{name}.json").read_text()), log

    return run


def test_seq_kd_end_to_end(seq_kd, lm):
    """`raykd seq-kd`: the teacher actor generates, the student learns the generated rows
    with cross-entropy alone (sequence-level KD)."""
    from mlflow.tracking import MlflowClient

    summary, log = seq_kd("pure", "--set", "train.epochs=3")
    seq, student = summary["sequences"], summary["student"]
    print(json.dumps({"sequences": {k: seq[k] for k in ("rows", "width", "tokens", "seconds")},
                      "train_loss": [h["train_loss"] for h in student["history"]],
                      "val_loss": [h["val_loss"] for h in student["history"]],
                      "lm": summary["language_model"], "samples": seq["samples"]},
                     indent=1, default=str))
    assert "sequence-level KD dataset built" in log
    assert seq["status"] == "built" and seq["width"] == BLOCK + 1 and seq["rows"] > 100
    assert Path(seq["path"], "sequences.safetensors").is_file()
    assert student["transfer_size"] == seq["rows"]  # the student learned the generated rows
    assert "cache" not in summary["teacher"]  # CE alone: no teacher pass after generating
    # Measured (2026-12-02, 472 rows × 33 tokens, 3 epochs): train loss on the generated rows
    # 4.66 (epoch 1's mean), 3.02, 2.35 nats per token from a fresh student's ~ln(300) = 5.7;
    # test perplexity 28 (teacher 1.83).
    losses = [h["train_loss"] for h in student["history"]]
    assert losses[-1] < losses[0] < math.log(VOCAB)
    assert losses[-1] < 3.2
    assert student["test_perplexity"] == pytest.approx(math.exp(student["test_loss"]), rel=1e-3)
    assert student["val_perplexity"] == pytest.approx(math.exp(student["val_loss"]), rel=1e-6)

    client = MlflowClient(tracking_uri=summary["mlflow"]["tracking_uri"])
    parent = summary["mlflow"]["run_id"]
    children = {r.data.tags["mlflow.runName"]: r for r in client.search_runs(
        [client.get_run(parent).info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent}'")}
    assert set(children) == {"generation", "student"}
    generation = children["generation"]
    assert generation.data.params["sequence_kd.decoding"] == "greedy"
    assert generation.data.metrics["rows"] == seq["rows"]
    assert "samples.md" in [a.path for a in client.list_artifacts(generation.info.run_id)]
    metrics = client.get_run(parent).data.metrics
    assert metrics["student_test_perplexity"] == pytest.approx(student["test_perplexity"])


def test_seq_kd_reuses_the_dataset_and_mixes_the_corpus(seq_kd, lm):
    """A second run with the same generation settings reuses the dataset; mix_original adds the
    corpus's train blocks. token_kd joins: the teacher's per-token cache is built on the
    generated rows — Kim & Rush's word + sequence-level combination."""
    from raykd.data import build_dataset

    pure = lm[2] / "pure.json"
    first = (json.loads(pure.read_text()) if pure.is_file()
             else seq_kd("pure", "--set", "train.epochs=3")[0])
    losses = "[{name: ce}, {name: token_kd}]"
    summary, log = seq_kd("mixed", "--set", "train.epochs=1",
                          "--set", "sequence_kd.mix_original=true",
                          "--set", f"distill.losses={losses}")
    seq, student = summary["sequences"], summary["student"]
    assert "sequence-level KD dataset reused" in log
    assert seq["status"] == "reused" and seq["key"] == first["sequences"]["key"]
    corpus_blocks = len(build_dataset(_config(lm, lm[2]).data, "train"))
    assert student["transfer_size"] == seq["rows"] + corpus_blocks
    assert student["test_perplexity"] < VOCAB
    cache = summary["teacher"]["cache"]
    assert cache["status"] == "built" and cache["per_token"]
    assert cache["num_samples"] == seq["rows"] + corpus_blocks
    last = student["history"][-1]
    assert "loss_token_kd" in last and last["teacher_agreement"] > 0


def test_seq_kd_resume_keeps_the_student_and_adds_the_baseline(seq_kd, lm):
    """`--resume --baseline` on the pure run's config: its finished student is read back (same
    run), only the baseline (the corpus alone, cross-entropy) is trained."""
    pure = lm[2] / "pure.json"
    first = (json.loads(pure.read_text()) if pure.is_file()
             else seq_kd("pure", "--set", "train.epochs=3")[0])
    summary, log = seq_kd("resumed", "--set", "train.epochs=3", "--resume", "--baseline")
    assert "resuming sequence-kd run" in log
    assert summary["resumed"] == ["student"]  # the teacher is a given checkpoint: no fit
    assert summary["mlflow"]["run_id"] == first["mlflow"]["run_id"]
    assert summary["student"]["run_id"] == first["student"]["run_id"]
    assert summary["student"]["test_perplexity"] == pytest.approx(
        first["student"]["test_perplexity"], rel=1e-4)
    from raykd.data import build_dataset

    base = summary["baseline"]
    assert base["run_id"] != first["student"]["run_id"]
    assert base["transfer_size"] == len(build_dataset(_config(lm, lm[2]).data, "train"))
    assert math.log(VOCAB) > base["test_loss"] > 0  # learned: below a uniform guess
