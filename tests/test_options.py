"""The one ``KEY=VALUE,...`` parser behind --limit, --sft-examples, --task-family and --textmas-args."""

import argparse

import pytest

from diffmas_eval.commands.options import count, parse_counts, parse_pairs
from diffmas_eval.leaderboard.cli import _limits, settings_of
from diffmas_eval.leaderboard.grid.settings import Settings


def test_pairs_strip_blanks_split_at_the_first_equals_and_convert():
    assert parse_pairs(" a=1, b = 2 ,,", "--x", int) == {"a": 1, "b": 2}
    assert parse_pairs("", "--x") == {}
    assert parse_pairs("backend=openai,base_url=http://h:8/v1?a=b", "--textmas-args") == {
        "backend": "openai", "base_url": "http://h:8/v1?a=b"}
    assert parse_pairs("a=1,a=2", "--x", int) == {"a": 2}  # the later item wins, as before
    assert parse_pairs("5,gsm8k=2", "--limit", int, bare_key="") == {"": 5, "gsm8k": 2}


@pytest.mark.parametrize("text,value_type,form,message", [
    ("math", str, "FAMILY=N", "--x takes FAMILY=N,..., got 'math' (no '=')"),
    ("=4", str, "FAMILY=N", "--x takes FAMILY=N,..., got '=4' (nothing before '=')"),
    ("math=four", int, "FAMILY=N", "--x takes FAMILY=N,..., got 'math=four': 'four' is not an integer"),
    ("t=0.x", float, "T=X", "--x takes T=X,..., got 't=0.x': '0.x' is not a number"),
    ("math=-1", count, "FAMILY=N", "--x takes FAMILY=N,..., got 'math=-1': must be >= 0"),
])
def test_pair_errors_name_the_flag_the_form_and_the_item(text, value_type, form, message):
    with pytest.raises(ValueError) as err:
        parse_pairs(text, "--x", value_type, form=form)
    assert str(err.value) == message


def test_counts():
    assert parse_counts("200", "--prompt-tokens") == [200] and parse_counts("5, 6,", "--p") == [5, 6]
    with pytest.raises(ValueError, match=r"--prompt-tokens takes N or N,N,... \(integers\), got '5,x'"):
        parse_counts("5,x", "--prompt-tokens")
    assert count("0") == 0
    with pytest.raises(ValueError, match=r"must be >= 0 \(0 = every item\)"):
        count("-2", zero="every item")


def test_leaderboard_flags_parse_through_it():
    assert _limits("3") == (3, {}) and _limits("0,gsm8k=5") == (0, {"gsm8k": 5})
    default = _limits("")[0]
    assert _limits("gsm8k=5") == (default, {"gsm8k": 5})
    with pytest.raises(ValueError, match=r"--limit takes N or TASK=N,..., got 'gsm8k=-1': must be >= 0 "
                                         r"\(0 = every item\)"):
        _limits("2,gsm8k=-1")
    with pytest.raises(ValueError, match=r"--limit takes N or TASK=N,..., got 'x': 'x' is not an integer"):
        _limits("x")



def _leaderboard_args(*argv):
    from diffmas_eval.leaderboard import add_leaderboard_parser

    sub = argparse.ArgumentParser().add_subparsers()
    add_leaderboard_parser(sub)
    return sub.choices["leaderboard"].parse_args(list(argv))


def test_leaderboard_settings_parse_through_it(tmp_path, capsys):
    s = settings_of(_leaderboard_args("--sft-examples", "math=4, code=2", "--task-family", "my_task=math",
                                      "--textmas-args", "backend=openai,timeout=9"))
    assert s.sft_examples == {"math": 4, "code": 2} and s.families == {"my_task": "math"}
    assert s.textmas_args == "backend=openai,timeout=9"  # kept as typed: the cells' hashes hold the text
    for flag, value, message in [("--sft-examples", "math=x", "--sft-examples takes FAMILY=N,..., got 'math=x'"),
                                 ("--task-family", "my_task", "--task-family takes TASK=FAMILY,..., got 'my_task'"),
                                 ("--textmas-args", "backend", "--textmas-args takes KEY=VALUE,..., got 'backend'")]:
        with pytest.raises(ValueError, match=message):
            settings_of(_leaderboard_args(flag, value))

    from diffmas_eval.commands.cli import main

    # through the command: one line, exit 2, before anything is trained or scored
    assert main(["leaderboard", "--sft-examples", "math", "--output", str(tmp_path / "lb.csv")]) == 2
    assert "diffmas-eval: error: --sft-examples takes FAMILY=N,..., got 'math' (no '=')" in capsys.readouterr().err
    assert not (tmp_path / "lb.csv").exists()


def test_the_leaderboard_is_a_function_its_flags_describe(tmp_path, monkeypatch):
    """``run_leaderboard(Settings, RunOptions, output)`` is what the command calls: the parser's defaults are the
    dataclasses' own, and bad input fails in the function itself, before anything is trained or scored."""
    from diffmas_eval.leaderboard import RunOptions, Settings, run_leaderboard
    from diffmas_eval.leaderboard.cli import run_options_of

    monkeypatch.delenv("DIFFMAS_DATA_DIR", raising=False)
    assert run_options_of(_leaderboard_args()) == RunOptions() and settings_of(_leaderboard_args()) == Settings()
    out = tmp_path / "lb.csv"
    with pytest.raises(ValueError, match=r"unknown methods nope; choose from single"):
        run_leaderboard(Settings(), RunOptions(methods="single,nope"), out)
    with pytest.raises(ValueError, match=r"--jobs must be >= 1, got 0"):
        run_leaderboard(Settings(), RunOptions(jobs=0), out)
    assert not out.parent.joinpath("runs").exists()


def test_train_budget_names_a_family_steps_and_batch(tmp_path, capsys):
    """``--train-budget FAMILY=STEPSxBATCH``: the families it names get their own budget, the rest keep
    ``--train-steps`` x ``--train-batch-size``; a malformed budget or an unknown family fails before any work."""
    s = settings_of(_leaderboard_args("--train-budget", "math=8x2", "--train-steps", "3"))
    assert s.budget("math") == (8, 2) and s.budget("commonsense") == (3, 1) and s.budget("code") == (3, 1)
    assert settings_of(_leaderboard_args()).budget("commonsense") == _default_commonsense_budget()
    assert settings_of(_leaderboard_args()).budget("math") == (Settings().train_steps, Settings().train_batch_size)
    assert settings_of(_leaderboard_args("--train-budget", "")).train_budgets == {}
    # steps or a batch chosen for every family, without --train-budget: every family's, the default budget aside
    for flags in (("--train-steps", "2"), ("--train-batch-size", "2")):
        s = settings_of(_leaderboard_args(*flags))
        assert s.budget("commonsense") == s.budget("math") != _default_commonsense_budget()
    for value, message in [("math=8", "'8' is not STEPSxBATCH with both >= 1"),
                           ("math=0x4", "'0x4' is not STEPSxBATCH with both >= 1"),
                           ("maths=8x2", "unknown family 'maths'; choose from code, commonsense, math")]:
        with pytest.raises(ValueError, match=message):
            settings_of(_leaderboard_args("--train-budget", value))


def _default_commonsense_budget():
    from diffmas_eval.leaderboard.grid.settings import OFFLINE_BUDGETS

    return OFFLINE_BUDGETS["commonsense"]
