"""Distilling a decoder: a student with half the layers, initialised from the teacher, trained on
its next-token distributions, against the same student trained on the labels alone."""

from __future__ import annotations

import re

import pytest

from onnxforge.cli import main
from onnxforge.common.errors import UserError
from optimizers.distill.decoder import DecoderDistillSettings, kept_layers, student_from_teacher


def test_kept_layers_spread_from_first_to_last():
    assert kept_layers(12, 6) == [0, 2, 4, 7, 9, 11]
    assert kept_layers(2, 1) == [0] and kept_layers(4, 4) == [0, 1, 2, 3]
    with pytest.raises(UserError, match="more layers"):
        kept_layers(2, 3)


def test_settings_out_of_range_are_one_line_errors():
    for bad in ({"layers": 0}, {"alpha": 1.5}, {"temperature": 0}, {"heldout_share": 0.7}, {"window": 1}):
        with pytest.raises(UserError):
            DecoderDistillSettings(**bad)


def test_a_student_with_every_layer_is_the_teacher(docstring_llama_folder):
    import torch
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(str(docstring_llama_folder), dtype=torch.float32).eval()
    student, kept = student_from_teacher(teacher, teacher.config.num_hidden_layers)
    ids = torch.arange(1, 40).reshape(1, -1)
    with torch.no_grad():
        assert torch.allclose(student.eval()(input_ids=ids).logits, teacher(input_ids=ids).logits, atol=1e-5)
    shallow, kept = student_from_teacher(teacher, 1)
    assert kept == [0] and shallow.config.num_hidden_layers == 1 and len(shallow.model.layers) == 1
    torch.testing.assert_close(shallow.model.layers[0].mlp.up_proj.weight, teacher.model.layers[0].mlp.up_proj.weight)


def test_decoder_flags_are_refused_with_an_encoder_and_the_other_way(docstring_llama_folder, capsys):
    assert main(["distill", "--teacher", str(docstring_llama_folder), "--student", "x.py:build"]) == 2
    assert "do not apply to a decoder teacher" in capsys.readouterr().err
    assert main(["distill", "--teacher", "x.py:build"]) == 2
    assert "--student and --data needed" in capsys.readouterr().err


def test_too_few_texts_is_one_line_that_says_how_texts_are_separated(docstring_llama_folder, tmp_path, capsys):
    text = tmp_path / "one.txt"
    text.write_text("def f():\n    return 1\ndef g():\n    return 2\n", encoding="utf-8")  # no blank line: one text
    assert main(["-q", "distill", "--teacher", str(docstring_llama_folder), "--text", str(text), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "needs at least 10 texts, got 1" in err and "separated by blank lines" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_distilled_half_depth_student_beats_labels_alone_and_exports_with_its_cache(docstring_llama_folder, tmp_path, capsys):
    student = tmp_path / "student"
    code = main(["-q", "distill", "--teacher", str(docstring_llama_folder), "--steps", "200", "--baseline",
                 "--out", str(student), "--export", str(tmp_path / "student.onnx")])
    printed = capsys.readouterr().out
    assert code == 0, printed
    figures = re.search(r"teacher ([\d.]+), student ([\d.]+) \(before training ([\d.]+)\)", printed)
    teacher, distilled, initial = map(float, figures.groups())
    alone = float(re.search(r"labels alone: ([\d.]+)", printed).group(1))
    assert "1 of the teacher's 2 layers" in printed
    assert distilled < initial and alone < initial  # both trained students improve on the copied layers
    assert distilled < alone, printed  # the teacher's distributions teach more than the labels
    assert distilled > teacher * 0.9  # half the depth does not beat the teacher by much on its own data
    assert (tmp_path / "student.onnx").is_file() and "greedy parity with PyTorch proven" in printed
    assert (student / "config.json").is_file() and (student / "tokenizer.json").is_file()
