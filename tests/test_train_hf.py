"""``colofn train --hf``: HF models under every strategy with ``--check``, checkpoints and resume, --data, errors."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("transformers")

from colofn.cli import main  # noqa: E402
from colofn.nn import hf  # noqa: E402


def _run(capsys, *args):
    code = main(["train", *args, "--steps", "2", "--batch-size", "4", "--warmup", "1"])
    return code, capsys.readouterr()


def test_hf_llama_pp_tp_megatron_sp_checked_then_resumed_under_zero(tmp_path, capsys):
    out = str(tmp_path / "run")
    code, cap = _run(capsys, "--hf", "llama", "--mesh", "pp=2,tp=2", "--sp", "megatron", "--check",
                     "--checkpoint-every", "2", "--out", out)
    assert code == 0, cap.err
    assert "OK: parallel training equals single-device training" in cap.out
    assert "held-out loss" in cap.out
    report = open(os.path.join(out, "report.md")).read()
    assert "hf:llama" in report and "held-out loss" in report
    code = main(["train", "--hf", "llama", "--mesh", "dp=2,tp=2", "--zero", "2", "--check", "--steps", "3",
                 "--batch-size", "4", "--warmup", "1", "--resume", os.path.join(out, "checkpoints"), "--out", out])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert "resumed at step 2" in cap.out and "step    3/3" in cap.out
    assert "OK: parallel training equals single-device training" in cap.out


def test_hf_directory_and_data_file(tmp_path, capsys):
    model = hf.build(hf.config("gpt2", "tiny", n_layer=2, tie_word_embeddings=False), seed=3)
    model.save_pretrained(tmp_path / "model", safe_serialization=True)
    assert not any(f.endswith((".bin", ".pt")) for f in os.listdir(tmp_path / "model"))
    text = tmp_path / "notes.txt"
    text.write_text("the cat sat on the mat. " * 200)
    out = str(tmp_path / "run")
    code, cap = _run(capsys, "--hf", str(tmp_path / "model"), "--data", str(text), "--mesh", "dp=2,tp=2", "--check",
                     "--out", out)
    assert code == 0, cap.err
    assert "GPT2LMHeadModel (136,960 params)" in cap.out and "4,320 train / 480 held-out bytes" in cap.out
    assert "OK: parallel training equals single-device training" in cap.out
    record = json.load(open(os.path.join(out, "record.json")))
    assert 0 < record["eval_loss"] < 10


def test_hf_flag_errors_are_listed_before_any_work(tmp_path, capsys):
    code, cap = _run(capsys, "--hf", "bert", "--data", str(tmp_path / "missing.txt"), "--mesh", "dp=2,sp=2",
                     "--sp", "ring", "--zero", "2", "--out", str(tmp_path))
    assert code == 2
    assert "--hf 'bert' is neither a kind (llama, gpt2) nor a directory" in cap.err
    assert f"--data {tmp_path / 'missing.txt'}: no such file" in cap.err
    assert "--hf supports --sp none or megatron" in cap.err


def test_hf_pp_with_zero_inside_the_stages_is_checked(tmp_path, capsys):
    code, cap = _run(capsys, "--hf", "gpt2", "--mesh", "pp=2,dp=2", "--zero", "2", "--microbatches", "2", "--check",
                     "--out", str(tmp_path / "run"))
    assert code == 0, cap.err
    assert "on Mesh(pp=2, dp=2)" in cap.out and ", ZeRO-2" in cap.out
    assert "OK: parallel training equals single-device training" in cap.out
    code, cap = _run(capsys, "--hf", "gpt2", "--mesh", "pp=2,dp=2", "--zero", "3", "--out", str(tmp_path / "z3"))
    assert code == 2 and "--zero 3 with pp is not supported: ZeRO-3 all-gathers" in cap.err
