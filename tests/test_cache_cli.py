"""`raykd cache build|inspect|verify` in-process (``raykd.cli.main`` returns the exit code), with a
real teacher actor behind ``build``: fresh, corrupt and truncated caches as the CLI reports them."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from raykd.cli import main


def _teacher(path: Path) -> Path:
    from raykd.config import load_config
    from raykd.data import build_dataset
    from raykd.models import build_model
    from raykd.train.checkpoint import save_checkpoint

    spec = {"name": "mlp", "args": {"hidden_sizes": [32]}}
    cfg = load_config(None, {"teacher.args": spec["args"]})
    info = build_dataset(cfg.data, "train").info
    torch.manual_seed(0)
    return save_checkpoint(build_model(cfg.teacher, info, field="teacher"), spec, info, path)


def _json_out(capsys) -> dict:
    """The JSON object the command printed (Ray may interleave actor log lines)."""
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("{")
    end = lines.index("}", start)
    return json.loads("\n".join(lines[start:end + 1]))


def test_build_inspect_verify_corrupt_truncate(ray_session, workdir, mlflow_uri, capsys):
    ckpt = _teacher(workdir / "teacher.safetensors")
    root = workdir / "caches"
    build = ["cache", "build", "--set", f"teacher.checkpoint={ckpt}",
             "--set", f"teacher.cache_dir={root}", "--set", f"tracking.uri={mlflow_uri}"]

    assert main(build) == 0
    built = _json_out(capsys)
    assert built["status"] == "built" and built["forward_samples"] == built["num_samples"]
    folder = Path(built["path"])
    assert folder.parent == root and (folder / "manifest.json").is_file()

    assert main(["cache", "inspect", str(folder)]) == 0
    shown = _json_out(capsys)
    assert shown["key"] == folder.name and shown["state"].startswith("fresh")
    assert shown["spec"]["teacher_fingerprint"] == built["fingerprint"]
    assert shown["spec"]["split"] == "train" and "digits" in shown["spec"]["dataset_identity"]
    assert shown["bytes_per_sample"] == 20 and shown["encoding"] == "dense"  # 10 × float16
    assert set(shown["arrays"]) == {"logits"}

    assert main(["cache", "verify", str(folder)]) == 0
    assert "fresh" in capsys.readouterr().out
    assert main(["cache", "verify", str(root)]) == 0  # the cache directory: every cache in it
    capsys.readouterr()

    logits = folder / "logits.npy"
    data = bytearray(logits.read_bytes())
    data[-3] ^= 0xFF  # one flipped byte in the payload
    logits.write_bytes(bytes(data))
    assert main(["cache", "verify", str(folder)]) == 1
    assert "corrupt" in capsys.readouterr().out

    assert main(build) == 0  # the actor detects it, reports it and rebuilds
    repaired = _json_out(capsys)
    assert repaired["status"] == "rebuilt" and repaired["previous"] == "corrupt"
    assert repaired["forward_samples"] == repaired["num_samples"]
    assert main(["cache", "verify", str(folder)]) == 0
    capsys.readouterr()

    with open(logits, "r+b") as fh:  # cut short, as by a full disk or a killed copy
        fh.truncate(logits.stat().st_size - 100)
    assert main(["cache", "verify", str(folder)]) == 1
    assert "truncated" in capsys.readouterr().out
    assert main(build) == 0
    again = _json_out(capsys)
    assert again["status"] == "rebuilt" and again["previous"] == "truncated"
    assert main(["cache", "verify", str(folder)]) == 0


def test_bad_paths_are_one_line_errors(workdir, capsys):
    assert main(["cache", "verify", str(workdir / "nowhere")]) == 2
    assert "not a raykd cache" in capsys.readouterr().err
    assert main(["cache", "inspect"]) == 2  # no PATH: the config's teacher.cache_dir, empty
    assert "/.raykd/cache is not a raykd cache" in capsys.readouterr().err
    assert main(["cache", "build"]) == 2  # no teacher checkpoint to cache
    assert "teacher.checkpoint" in capsys.readouterr().err
