"""The command line as people expect it: -v/-q after the command, distinct exit codes, an env
report, provider options, and third-party messages kept out of the normal output."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxforge.cli import build_parser, main
from onnxforge.common.errors import EXIT_BROKEN_PIPE, EXIT_BUDGET, EXIT_USAGE, EXIT_VERIFICATION


def _model(path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_verbosity_flags_before_or_after_the_command():
    parser = build_parser()
    for argv in (["-q", "inspect", "m.onnx"], ["inspect", "m.onnx", "-q"], ["inspect", "-q", "m.onnx"]):
        args = parser.parse_args(argv)
        assert args.quiet is True and args.verbose is False, argv
    assert parser.parse_args(["inspect", "m.onnx", "--verbose"]).verbose is True
    assert parser.parse_args(["inspect", "m.onnx"]).quiet is False


def test_every_option_says_what_it_does():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    missing = [f"{name} {action.option_strings[0]}" for name, command in sub.choices.items() for action in command._actions
               if action.option_strings and action.dest != "help" and not action.help]
    assert not missing, f"options without help: {missing}"


def test_exit_codes_tell_usage_verification_and_budget_apart(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.onnx")]) == EXIT_USAGE
    with pytest.raises(SystemExit) as bad_flag:
        main(["inspect", "--no-such-flag"])
    assert bad_flag.value.code == EXIT_USAGE
    from onnxforge.package import write_package

    folder = write_package(tmp_path / "pkg", _model(tmp_path / "m.onnx"), reference_inputs={"x": np.ones((1, 4), np.float32)},
                           transforms=[], measurements={}, source={}, recommended={}, name="m")
    card = (folder / "README.md").read_text()
    assert "Opsets ai.onnx 18;" in card and "{'" not in card  # JSON and plain words, not Python's dict repr
    assert main(["verify-package", str(folder), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["schema_version"] >= 1 and report["files_checked"] >= 3 and report["max_error"] == 0.0
    (folder / "README.md").write_text("changed")
    assert main(["verify-package", str(folder)]) == EXIT_VERIFICATION
    assert "was changed" in capsys.readouterr().err
    assert EXIT_BUDGET not in (0, EXIT_USAGE, EXIT_VERIFICATION, 1)


def test_a_reader_that_leaves_ends_the_command_quietly(tmp_path):
    """``onnxforge inspect m.onnx | head -1``: the pipe closes while onnxforge writes; the command
    stops with 141, as shell tools do, and no BrokenPipeError traceback reaches the terminal."""
    import subprocess
    import sys

    model = _model(tmp_path / "m.onnx")
    child = subprocess.Popen([sys.executable, "-c", "from onnxforge.cli import main; import sys; sys.exit(main())",
                              "inspect", str(model), "--top-ops", "5"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # the reader is gone before the first line
    _, err = child.communicate(timeout=120)
    assert child.returncode == EXIT_BROKEN_PIPE, err.decode()
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()


def test_env_report_names_versions_providers_and_cpu_flags(capsys):
    assert main(["env", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["schema_version"] >= 1 and report["versions"]["onnxruntime"] and report["versions"]["onnxforge"]
    assert "CPUExecutionProvider" in report["providers"] and report["cores"]["usable"] >= 1
    assert main(["env"]) == 0
    assert "providers" in capsys.readouterr().out


def test_provider_options_reach_the_session_and_malformed_ones_are_refused(tmp_path, capsys, monkeypatch):
    import runtime_bench.harness as harness

    seen = []
    real = harness.resolve_provider

    def spy(name, *a, **kw):
        config = real(name, *a, **kw)
        seen.append(config.extra_options)
        return config

    monkeypatch.setattr(harness, "resolve_provider", spy)
    path = _model(tmp_path / "m.onnx")
    assert main(["-q", "bench", str(path), "--batch", "1", "--min-runs", "3", "--min-seconds", "0", "--warmup", "1",
                 "--provider-option", "some_option=1"]) == 0
    assert seen == [(("some_option", "1"),)]
    assert main(["bench", str(path), "--provider-option", "novalue"]) == EXIT_USAGE
    assert "malformed --provider-option 'novalue'" in capsys.readouterr().err


def test_third_party_logging_stays_out_unless_verbose(capsys):
    from onnxforge.cli import configure_logging

    configure_logging(0)
    logging.getLogger().warning("Failed to infer data type of tensor")  # as ONNX Runtime's shape inference does
    assert "Failed to infer" not in capsys.readouterr().err
    configure_logging(1)
    logging.getLogger().warning("Failed to infer data type of tensor")
    assert "Failed to infer" in capsys.readouterr().err
    configure_logging(0)


def test_progress_bar_draws_on_a_terminal_and_stays_quiet_elsewhere():
    import io

    from onnxforge.progress import ProgressBar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen, log = Terminal(), io.StringIO()
    for stream in (screen, log):
        bar = ProgressBar("bench", stream=stream)
        bar("cpu batch 8", 0.5)
        bar.close()
    assert "bench" in screen.getvalue() and "50%" in screen.getvalue() and "cpu batch 8" in screen.getvalue()
    assert log.getvalue() == ""


def test_recipe_steps_are_numbered_k_of_n(tmp_path, caplog):
    """Each step of a run says where it is: [1/4] export ... [4/4] candidate-int8."""
    from onnxforge.pipeline import run_pipeline
    from tests.recipe_snippets import FP32_AND_INT8
    from tests.tiny_models import MLP_FACTORY_SOURCE

    (tmp_path / "tiny.py").write_text(MLP_FACTORY_SOURCE)
    (tmp_path / "recipe.toml").write_text('[model]\nsource = "tiny.py:build"\n' + FP32_AND_INT8 + "[benchmark]\nenabled = false\n")
    with caplog.at_level(logging.INFO, logger="onnxforge.pipeline"):
        run_pipeline(tmp_path / "recipe.toml", tmp_path / "out")
    numbered = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[")]
    assert numbered == ["[1/4] export", "[2/4] optimize", "[3/4] candidate-fp32", "[4/4] candidate-int8"]
