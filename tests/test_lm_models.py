"""Hugging Face causal LMs as raykd models: built from a config dict or a save_pretrained folder,
hooked by HF module paths, initialised from a deeper teacher, checkpointed with tied weights,
and the one-line errors for a missing model and mismatched vocabularies. Nothing downloaded."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from raykd.config import ConfigError, ModelConfig, load_config
from raykd.models import FeatureHooks, build_model, init_student_from_teacher

INFO = SimpleNamespace(input_shape=(16,), num_classes=300, vocab_size=300, eos_token_id=0)


def gpt2(layers: int = 2, **extra) -> ModelConfig:
    config = {"n_layer": layers, "n_embd": 32, "n_head": 2, "n_positions": 64, **extra}
    return ModelConfig(name="hf_causal_lm", args={"model_type": "gpt2", "config": config})


def test_built_from_config_emits_token_logits_and_hooks_hf_paths():
    torch.manual_seed(0)
    model = build_model(gpt2(), INFO)
    assert model.config.vocab_size == 300  # from the tokenizer, not GPT-2's 50257
    ids = torch.randint(0, 300, (2, 16))
    with FeatureHooks(model, ["transformer.h.1", "transformer.wte"], "student") as hooks:
        logits = model(ids)
    assert logits.shape == (2, 16, 300)
    assert hooks.features["transformer.h.1"].shape == (2, 16, 32)
    assert hooks.features["transformer.wte"].shape == (2, 16, 32)
    with pytest.raises(ConfigError, match="student: module path 'transformer.h.7'"):
        FeatureHooks(model, ["transformer.h.7"], "student")


def test_pretrained_folder_round_trip_and_generation(tmp_path):
    from raykd.models.hf import plain_forward

    torch.manual_seed(0)
    model = build_model(gpt2(), INFO)
    model.save_pretrained(tmp_path / "m")
    again = build_model(ModelConfig(name="hf_causal_lm",
                                    args={"pretrained": str(tmp_path / "m")}), INFO)
    ids = torch.randint(0, 300, (2, 16))
    assert torch.allclose(model.eval()(ids), again.eval()(ids), atol=1e-6)
    with plain_forward(again):  # the logits hook lifted: HF's generate works
        out = again.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
    assert again(ids).shape == (2, 16, 300)  # and is back afterwards


def test_missing_pretrained_folder_is_one_config_error(tmp_path):
    args = {"pretrained": str(tmp_path / "nope")}
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(name="hf_causal_lm", args=args), INFO, field="student")
    assert str(err.value).startswith("student.args: pretrained=")
    assert "save_pretrained folder" in str(err.value) and "\n" not in str(err.value)


def test_init_from_teacher_copies_embeddings_and_every_other_block():
    torch.manual_seed(0)
    teacher, student = build_model(gpt2(4), INFO), build_model(gpt2(2), INFO)
    copied = init_student_from_teacher(student, teacher)
    s, t = student.state_dict(), teacher.state_dict()
    assert torch.equal(s["transformer.wte.weight"], t["transformer.wte.weight"])
    assert torch.equal(s["transformer.h.0.attn.c_attn.weight"],
                       t["transformer.h.0.attn.c_attn.weight"])
    assert torch.equal(s["transformer.h.1.mlp.c_fc.weight"], t["transformer.h.2.mlp.c_fc.weight"])
    assert not torch.equal(s["transformer.h.1.mlp.c_fc.weight"],
                           t["transformer.h.1.mlp.c_fc.weight"])
    assert "transformer.ln_f.weight" in copied
    other = build_model(ModelConfig(name="hf_causal_lm", args={
        "model_type": "llama", "config": {"num_hidden_layers": 1, "hidden_size": 32,
                                          "intermediate_size": 64, "num_attention_heads": 2}}),
        INFO)
    with pytest.raises(ConfigError, match="student.init_from_teacher"):
        init_student_from_teacher(other, teacher)


def test_raykd_checkpoint_of_tied_weights_loads_back(tmp_path):
    from raykd.train.checkpoint import load_model, save_checkpoint

    torch.manual_seed(0)
    model = build_model(gpt2(), INFO)
    path = save_checkpoint(model, {"name": "hf_causal_lm", "args": gpt2().args}, INFO,
                           tmp_path / "ck")
    again = load_model(path, None, INFO, field="student")
    ids = torch.randint(0, 300, (2, 16))
    assert torch.allclose(model.eval()(ids), again(ids), atol=1e-6)
    # still tied: the output head is the input embedding
    assert again.lm_head.weight.data_ptr() == again.transformer.wte.weight.data_ptr()


def test_teacher_checkpoint_folder_errors(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n" * 50)
    base = ["data.name=text", f"data.path={corpus}", "teacher.name=hf_causal_lm"]
    with pytest.raises(ConfigError) as err:
        load_config(None, [*base, f"teacher.checkpoint={tmp_path / 'missing'}"])
    assert str(err.value).startswith(f"teacher.checkpoint: folder '{tmp_path / 'missing'}'")
    assert "does not exist" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"teacher.checkpoint: folder .* holds no config.json"):
        load_config(None, [*base, f"teacher.checkpoint={tmp_path / 'empty'}"])


def test_hidden_state_and_attention_losses_on_hf_paths():
    """distilbert_cos, tinybert_hidden/_emb/_attn reach HF hidden states and attention
    probabilities by module path, masked on padding; the same loss module the loop builds."""
    from raykd.config import DistillConfig
    from raykd.losses import DistillLoss
    from raykd.models.hooks import probe_shapes

    torch.manual_seed(0)
    teacher, student = build_model(gpt2(2), INFO).eval(), build_model(gpt2(1, n_embd=16), INFO)
    s_paths = ["transformer.h.0", "transformer.drop", "transformer.h.0.attn:attention"]
    t_paths = ["transformer.h.1", "transformer.drop", "transformer.h.1.attn:attention"]
    distill = DistillConfig(losses=[
        {"name": "distilbert_cos", "student_layers": [s_paths[0]], "teacher_layers": [t_paths[0]]},
        {"name": "tinybert_hidden", "student_layers": [s_paths[0]],
         "teacher_layers": [t_paths[0]]},
        {"name": "tinybert_emb", "student_layers": [s_paths[1]], "teacher_layers": [t_paths[1]]},
        {"name": "tinybert_attn", "student_layers": [s_paths[2]], "teacher_layers": [t_paths[2]]},
    ])
    ids = torch.randint(0, 300, (2, 16))
    s_shapes = probe_shapes(student, s_paths, ids, "student")
    t_shapes = probe_shapes(teacher, t_paths, ids, "teacher")
    assert s_shapes[s_paths[2]] == (2, 2, 16, 16)  # [B, heads, L, L]
    loss = DistillLoss(distill, s_shapes, t_shapes)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 10:] = False
    with FeatureHooks(student, s_paths, "student") as sh, FeatureHooks(teacher, t_paths,
                                                                       "teacher") as th:
        logits = student(ids)
        with torch.no_grad():
            teacher(ids)
    total, parts = loss(logits, None, None, sh.features, th.features, mask=mask)
    assert set(parts) == {"distilbert_cos", "tinybert_hidden", "tinybert_emb", "tinybert_attn"}
    assert all(v > 0 for v in parts.values())
    total.backward()
    assert student.transformer.h[0].attn.c_attn.weight.grad.abs().sum() > 0
    sdpa = build_model(ModelConfig(name="hf_causal_lm", args={
        **gpt2().args, "attn_implementation": "sdpa"}), INFO)
    with pytest.raises(ConfigError, match="returned no attention probabilities"):
        probe_shapes(sdpa, ["transformer.h.0.attn:attention"], ids, "student")


def test_tune_space_over_temperature_beta_and_weights_of_the_lm_config(tmp_path):
    """`raykd tune` validates a search over T, the term weights and GKD's β on the language
    model config (the search itself runs the same offline path as `raykd distill`)."""
    from pathlib import Path

    from raykd.schemes.tune import check_tune_config

    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n" * 50)
    config = Path(__file__).resolve().parents[1] / "configs" / "shakespeare_lm.yaml"
    space = {"tune.space": {"distill.losses.1.params.temperature": {"grid": [1, 2]},
                            "distill.losses.0.weight": {"uniform": [0.1, 0.9]}},
             "tune.metric": "val_perplexity", "tune.mode": "min"}
    cfg = load_config(config, {"data.path": str(corpus), **space})
    dims = check_tune_config(cfg)
    assert {d.key for d in dims} == set(space["tune.space"])


def test_tune_space_over_gkd_beta(tmp_path):
    from pathlib import Path

    from raykd.losses import LOSSES
    from raykd.schemes.tune import check_tune_config

    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n" * 50)
    config = Path(__file__).resolve().parents[1] / "configs" / "shakespeare_lm.yaml"
    assert "token_gkd" in LOSSES
    gkd = load_config(config, {"data.path": str(corpus), "distill.losses.1.name": "token_gkd",
                               "tune.space": {"distill.losses.1.params.beta":
                                              {"uniform": [0.1, 0.9]}}})
    assert [d.key for d in check_tune_config(gkd)] == ["distill.losses.1.params.beta"]
