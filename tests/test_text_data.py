"""`data.name: text`: a corpus the test writes, tokenized by a BPE trained on it (kept beside the
cache and reused) or by the teacher's tokenizer, cut into blocks split by position; and one
clear error for each bad input (unknown field, unreadable file, bad block_size, vocabulary
mismatch, missing model folder) before Ray starts."""

from __future__ import annotations

import json

import pytest
import torch

from raykd.config import ConfigError, load_config
from raykd.data import build_dataset, dataset_info
from raykd.data.text import IGNORE, TEST_FRACTION


def cfg_for(corpus, tmp_path, *extra):
    return load_config(None, ["data.name=text", f"data.path={corpus}", "data.block_size=16",
                              "data.vocab_size=300", f"teacher.cache_dir={tmp_path / 'cache'}",
                              *extra])


@pytest.fixture()
def corpus(tmp_path):
    from lm_corpus import write_corpus

    return write_corpus(tmp_path / "corpus.txt", sentences=400)


def test_blocks_split_by_position_with_shifted_labels(corpus, tmp_path):
    cfg = cfg_for(corpus, tmp_path)
    info = dataset_info(cfg.data)
    splits = {s: build_dataset(cfg.data, s) for s in ("train", "val", "test")}
    # the BPE trained on the corpus lives beside the cache, named by corpus and vocabulary
    assert info.tokenizer_file.startswith(str(tmp_path / "cache" / "tokenizers"))
    assert info.vocab_size == 300 and info.input_shape == (16,)
    from raykd.data.tokenizer import load_tokenizer

    tok = load_tokenizer(info.tokenizer_file)
    stream = tok.encode(corpus.read_text()).ids + [info.eos_token_id]
    total = len(stream)
    n_test = int(total * TEST_FRACTION)
    # every real token is a label exactly once; the test split is the stream's last 10%
    assert sum(info.tokens.values()) == total - 3  # each split's first token is no label
    test = splits["test"]
    real = test.labels[test.labels != IGNORE]
    assert real.tolist() == stream[total - n_test + 1:]
    train = splits["train"]
    assert train.inputs[0].tolist() == stream[:16]
    real = train.labels[:, 1:] != IGNORE  # where the next input is a real token
    assert torch.equal(train.labels[:, :-1][real], train.inputs[:, 1:][real])  # next tokens
    assert (train.labels[:-1] != IGNORE).all()  # only the last block is padded
    assert (train.labels[-1] == IGNORE).any()
    idx, x, y = train.get_batch(torch.tensor([0, 1]))
    assert x.dtype == torch.int64 and x.shape == (2, 16) and y.shape == (2, 16)


def test_trained_tokenizer_is_reused(corpus, tmp_path):
    from raykd.data import registry

    cfg = cfg_for(corpus, tmp_path)
    first = dataset_info(cfg.data).tokenizer_file
    from pathlib import Path

    stamp = Path(first).stat().st_mtime_ns
    registry._load.cache_clear()
    assert dataset_info(cfg.data).tokenizer_file == first
    assert Path(first).stat().st_mtime_ns == stamp  # loaded, not trained again


def test_jsonl_and_parquet_with_a_text_field(corpus, tmp_path):
    lines = corpus.read_text().splitlines()
    docs = [" ".join(lines[i:i + 20]) for i in range(0, len(lines), 20)]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d, "n": i}) + "\n" for i, d in enumerate(docs)))
    info = dataset_info(cfg_for(jsonl, tmp_path, "data.text_field=body").data)
    assert info.sizes["train"] > 10
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": docs}), tmp_path / "c.parquet")
    parquet = dataset_info(cfg_for(tmp_path / "c.parquet", tmp_path, "data.text_field=body").data)
    assert parquet.tokens == info.tokens  # same documents, same tokens
    with pytest.raises(ConfigError) as err:
        dataset_info(cfg_for(jsonl, tmp_path, "data.text_field=text").data)
    assert str(err.value) == (f"data.text_field: 'text' is not a field of {jsonl}; its fields: "
                              f"body, n")


def test_unreadable_file_and_bad_block_size(tmp_path, corpus):
    binary = tmp_path / "weights.txt"
    binary.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(ConfigError) as err:
        dataset_info(cfg_for(binary, tmp_path).data)
    assert str(err.value).startswith(f"data.path: cannot read {binary} as UTF-8 text")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        dataset_info(cfg_for(corpus, tmp_path, "data.block_size=100000").data)
    assert str(err.value).startswith("data.block_size: 100000 needs at least 100001 tokens")
    with pytest.raises(ConfigError, match="data.block_size: Input should be greater than or"):
        cfg_for(corpus, tmp_path, "data.block_size=1")
    with pytest.raises(ConfigError, match=r"data.path: file .* does not exist"):
        cfg_for(tmp_path / "nope.txt", tmp_path)
    with pytest.raises(ConfigError, match="data.path: dataset 'text' needs a corpus file"):
        load_config(None, ["data.name=text"])


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    from lm_corpus import write_corpus, write_teacher

    root = tmp_path_factory.mktemp("lmteacher")
    corpus = write_corpus(root / "corpus.txt", sentences=400)
    return write_teacher(root / "teacher", corpus, steps=0), corpus


def _main(args, cli_stderr):
    from raykd.cli import main

    rc = main(["distill", *args])
    return rc, cli_stderr()


LM = ["--set", "data.name=text", "--set", "data.block_size=16", "--set",
      "teacher.name=hf_causal_lm", "--set", "student.name=hf_causal_lm", "--set",
      "student.args={model_type: gpt2, config: {n_layer: 1, n_embd: 32, n_head: 2, "
      "n_positions: 64}}"]


def test_cli_errors_before_ray(teacher_folder, workdir, cli_stderr):
    """Each bad input is one line on stderr and exit 2 from `raykd distill`, Ray never started."""
    import ray

    folder, corpus = teacher_folder
    base = [*LM, "--set", f"data.path={corpus}", "--set", f"data.tokenizer={folder}",
            "--set", f"tracking.uri=sqlite:///{workdir / 'm.db'}"]
    started = ray.is_initialized()
    cases = [
        (["--set", f"teacher.checkpoint={workdir / 'gone'}"],
         f"teacher.checkpoint: folder '{workdir / 'gone'}' does not exist"),
        (["--set", f"teacher.checkpoint={folder}", "--set",
          "student.args.config.vocab_size=512"],
         "student.args.config.vocab_size: the student's vocabulary has 512 ids, the teacher's "
         "300"),
        (["--set", f"teacher.checkpoint={folder}", "--set", "data.block_size=65"],
         "data.block_size: 65 tokens exceed the teacher's 64 positions"),
    ]
    for extra, start in cases:
        rc, err = _main([*base, *extra], cli_stderr)
        assert rc == 2, err
        assert err.startswith(f"raykd: error: {start}"), err
        assert "\n" not in err and "Traceback" not in err, err
    assert ray.is_initialized() == started  # nothing started a cluster


def test_teacher_folder_tokenizer_is_the_default(teacher_folder, tmp_path):
    folder, corpus = teacher_folder
    cfg = load_config(None, ["data.name=text", f"data.path={corpus}", "data.block_size=16",
                             "teacher.name=hf_causal_lm", f"teacher.checkpoint={folder}"])
    assert cfg.data.tokenizer == str(folder)
    assert dataset_info(cfg.data).tokenizer_file == str(folder / "tokenizer.json")
    trained = load_config(None, ["data.name=text", f"data.path={corpus}"])
    assert trained.data.tokenizer is None  # no teacher folder: a BPE is trained on the corpus
