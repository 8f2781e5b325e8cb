"""One schema for the chain's options (``latent.config.chain_options``): every front end is generated from it.

A dummy option added to the schema (a ``LatentConfig`` subclass) must reach lm-eval's model_args (and its typo
message), the ``diffmas-eval ask`` flags, TRL's ``DiffMASArguments`` and README's option reference, with no front
end edited; the leaderboard's and ``memory``'s chain flags are the schema's; README's reference is what the code
generates; and a chain saved as ``trainers/sft.py`` saves it still loads to the same ``LatentConfig``.
"""

import argparse
import dataclasses
import json
import shutil
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from diffmas_eval import DEFAULT_MODEL
from diffmas_eval.commands import cli
from diffmas_eval.commands.cli import add_chain_args, chain_of
from diffmas_eval.harness.diffmas_lm import OPTIONS, DiffMASLM, model_options
from diffmas_eval.latent.config import LatentConfig, chain_options, option
from diffmas_eval.latent.persist import CONFIG_FILE, load_chain_config, save_chain_config
from diffmas_eval.training.sft import DiffMASArguments, diffmas_arguments, parser


@dataclass
class DummyConfig(LatentConfig):
    dummy_opt: str = option("a", "a | b (an option only this test knows)", choices=("a", "b"))


def test_every_choice_is_named_in_its_help():
    for o in chain_options():
        assert o.help and all(c in o.help for c in o.choices or ()), o.name


def test_the_front_ends_offer_the_schema_with_its_defaults():
    lm_eval = [o.name for o in chain_options(front="lm_eval")]
    assert lm_eval == ["agents", "latent_steps", "realign", "trace", "topology", "max_trace_tokens",
                       "enable_thinking", "latent_dtype"]
    assert set(lm_eval) <= set(OPTIONS) and list(OPTIONS)[:2] == ["pretrained", "peft"]
    assert DEFAULT_MODEL in OPTIONS["pretrained"]
    sft = {f.name: f.default for f in dataclasses.fields(DiffMASArguments)}
    defaults = LatentConfig()
    assert sft == {"agents": len(defaults.roles), "latent_steps": 10, "realign": "ridge", "trace": "concat",
                   "topology": "sequential", "stage1_grad": "full", "max_trace_tokens": None,
                   "checkpoint_final": False, "train_realign": False}
    assert all(sft[k] == getattr(defaults, k) for k in sft if k not in ("agents", "train_realign"))
    p = argparse.ArgumentParser()
    add_chain_args(p)
    args = p.parse_args([])
    assert (args.model, args.agents, args.latent_steps, args.realign, args.trace, args.topology,
            args.max_trace_tokens) == (DEFAULT_MODEL, 4, 10, "ridge", "concat", "sequential", None)


def test_a_new_option_reaches_lm_eval(tiny_path, monkeypatch):
    assert "dummy_opt" not in OPTIONS
    assert model_options(DummyConfig)["dummy_opt"] == "a | b (an option only this test knows) (default a)"
    monkeypatch.setattr(DiffMASLM, "config_class", DummyConfig)
    line = f"pretrained={tiny_path},device=cpu,dtype=float32,agents=2,latent_steps=1"
    lm = DiffMASLM.create_from_arg_string(f"{line},dummy_opt=b")
    assert isinstance(lm.chain.config, DummyConfig) and lm.chain.config.dummy_opt == "b"
    assert DiffMASLM.create_from_arg_string(line).chain.config.dummy_opt == "a"
    with pytest.raises(ValueError, match=r"dummy_opt='c' is not valid; choose one of a, b"):
        DiffMASLM.create_from_arg_string(f"{line},dummy_opt=c")
    with pytest.raises(ValueError, match=r"(?s)unknown diffmas model_args \['dummy_otp'\].*\n  dummy_opt: a \| b"):
        DiffMASLM.create_from_arg_string(f"{line},dummy_otp=b")


def test_a_new_option_reaches_the_ask_flags(monkeypatch):
    p = argparse.ArgumentParser()
    add_chain_args(p, DummyConfig)
    args = p.parse_args(["--dummy-opt", "b", "--latent-steps", "3", "--agents", "2"])
    monkeypatch.setattr(cli, "build_trained", lambda trained, model, **kw: trained.config)
    config = chain_of(args, DummyConfig)
    assert isinstance(config, DummyConfig) and (config.dummy_opt, config.latent_steps, config.roles) == (
        "b", 3, ["planner", "solver"])
    assert p.parse_args([]).dummy_opt == "a"
    assert "an option only this test knows" in p.format_help()
    with pytest.raises(SystemExit):
        p.parse_args(["--dummy-opt", "c"])  # argparse: invalid choice


def test_a_new_option_reaches_trl(tmp_path):
    arguments = diffmas_arguments(DummyConfig)
    assert "dummy_opt" not in {f.name for f in dataclasses.fields(DiffMASArguments)}
    p = parser(arguments)
    *_, dm = p.parse_args_and_config(["--output_dir", str(tmp_path), "--dummy_opt", "b", "--agents", "3",
                                      "--latent_steps", "2", "--train_realign"])
    config = dm.to_config()
    assert isinstance(config, DummyConfig) and (config.dummy_opt, config.latent_steps, len(config.roles)) == (
        "b", 2, 3)
    assert dm.train_realign is True
    assert "an option only this test knows" in p.format_help()
    with pytest.raises(SystemExit):
        p.parse_args_and_config(["--output_dir", str(tmp_path), "--dummy_opt", "c"])


def test_checkpoint_final_is_a_training_flag(tmp_path):
    """``--checkpoint_final`` reaches the trainer's chain (its equivalence: test_chain.py); lm-eval never offers it."""
    *_, dm = parser(DiffMASArguments).parse_args_and_config(["--output_dir", str(tmp_path), "--checkpoint_final"])
    assert dm.to_config().checkpoint_final is True
    *_, dm = parser(DiffMASArguments).parse_args_and_config(["--output_dir", str(tmp_path)])
    assert dm.to_config().checkpoint_final is False
    assert "checkpoint_final" not in OPTIONS


def saved(tmp_path, config: LatentConfig):
    """``diffmas.json`` exactly as training writes it (``save_chain_config``), with its recipe."""
    chain = SimpleNamespace(realigner=SimpleNamespace(weight=torch.zeros(2, 2)))  # the realignment not trained
    save_chain_config(tmp_path, config, chain, training={"learning_rate": 5e-5, "lora_r": 8})
    return json.loads((tmp_path / CONFIG_FILE).read_text())


def test_a_saved_chain_loads_to_the_same_config(tmp_path):
    config = LatentConfig.from_dict({"agents": 3, "latent_steps": 2, "realign": "identity", "trace": "stitch",
                                     "stage1_grad": "none", "max_trace_tokens": 99})
    data = saved(tmp_path, config)
    assert data["training"] == {"learning_rate": 5e-5, "lora_r": 8} and data["trained_realign"] is False
    options, realign = load_chain_config(tmp_path)
    assert LatentConfig(**options) == config and realign is None
    old = {k: v for k, v in data.items() if k != "realign_target"}  # saved before realign_target existed
    (tmp_path / CONFIG_FILE).write_text(json.dumps(old))
    options, _ = load_chain_config(tmp_path)
    assert LatentConfig(**options) == dataclasses.replace(config, realign_target="weight_rows")


def test_diffmas_applies_what_was_trained_and_explicit_options_win(tiny_path, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_path, model)
    trained = LatentConfig.from_dict({"agents": 3, "latent_steps": 2, "realign": "identity", "trace": "stitch",
                                      "stage1_grad": "none", "max_trace_tokens": 999})
    saved(model, trained)
    args = dict(pretrained=str(model), device="cpu", dtype="float32")
    got = DiffMASLM(**args).chain.config
    # the trace the adapter learned to read is rebuilt; run-time limits and the training-only mode are not inherited
    assert got == dataclasses.replace(trained, stage1_grad="full", max_trace_tokens=None)
    got = DiffMASLM(**args, latent_steps=1, topology="hierarchical", trace="concat").chain.config
    assert (got.latent_steps, got.trace, got.topology, got.realign) == (1, "concat", "hierarchical", "identity")
    assert len(got.roles) == 3 and got.roles != trained.roles  # the saved agent count, the new topology's roles


def test_leaderboard_and_memory_flags_are_the_schemas(capsys):
    from diffmas_eval.commands.cli import main
    from diffmas_eval.latent.config import AGENTS_HELP
    from diffmas_eval.leaderboard import add_leaderboard_parser
    from diffmas_eval.leaderboard.grid.settings import Settings

    p = argparse.ArgumentParser()
    add_leaderboard_parser(p.add_subparsers())
    args = p.parse_args(["leaderboard"])
    assert (args.agents, args.latent_steps) == (Settings().agents, Settings().latent_steps)  # its CPU-sized chain
    assert p.parse_args(["leaderboard", "--latent-steps", "7"]).latent_steps == 7
    with pytest.raises(SystemExit):
        main(["memory", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert AGENTS_HELP in help_text and "latent thoughts per upstream agent (default: 10)" in help_text


def test_the_docs_option_reference_is_the_schemas():
    from pathlib import Path

    from diffmas_eval.commands.readme import section_of
    from diffmas_eval.commands.reference import OPTIONS_COMMAND, OPTIONS_PAGE, options_reference

    section = section_of((Path(__file__).resolve().parents[1] / OPTIONS_PAGE).read_text(), "options")
    assert section.strip() == options_reference().strip(), f"stale: {OPTIONS_COMMAND}"
    row = next(line for line in options_reference(DummyConfig).splitlines() if line.startswith("| `dummy_opt`"))
    assert all(s in row for s in ("`dummy_opt=`", "`--dummy-opt`", "`--dummy_opt`", "an option only this test knows"))


def test_a_generated_section_is_replaced_in_place_and_a_missing_one_is_named(tmp_path):
    from diffmas_eval.commands.readme import replace_section

    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- x:start (generated by `cmd`; do not edit) -->\nold\n<!-- x:end -->\nb\n")
    assert replace_section(readme, "x", "new") and not replace_section(readme, "x", "new")
    assert readme.read_text() == "a\n<!-- x:start (generated by `cmd`; do not edit) -->\nnew\n<!-- x:end -->\nb\n"
    with pytest.raises(ValueError, match=r"(?s)no y markers.*<!-- y:start \(generated by `c`; do not edit\) -->"):
        replace_section(readme, "y", "new", "c")


def test_a_marker_without_its_end_is_named_not_a_crash(tmp_path):
    from diffmas_eval.commands.readme import replace_section

    readme = tmp_path / "README.md"
    for text in ("<!-- x:end -->\n<!-- x:start -->\n", "<!-- x:start\n<!-- x:end"):
        readme.write_text(text)
        with pytest.raises(ValueError, match="no x markers"):
            replace_section(readme, "x", "new")
