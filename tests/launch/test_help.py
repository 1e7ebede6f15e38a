"""Every entry point's --help: a config-driven one lists every key of its config with the default and the
field's docstring; a flag-driven one gives every option a help text that shows its default."""

import argparse
import dataclasses
import importlib
import typing

import pytest

from reward.config import HelpFormatter, config_keys, field_docs

CONFIG_CLIS = {  # module: its config dataclass (main() reads it with config_from_cli)
    "reward.train": "TrainConfig",
    "reward.train_generative": "GenerativeConfig",
    "reward.pretrain_backbone": "PretrainConfig",
    "launch.grpo_edit": "RLConfig",
    "launch.pretrain_policy": "PolicyPretrainConfig",
}
FLAG_CLIS = [
    "reward.evaluate",
    "reward.synthesize_critiques",
    "reward.shapeedit.__main__",
    "launch.backbone_probe",
    "launch.bench_reward",
    "launch.bench_reward_actor",
    "launch.bench_rl_step",
    "launch.compare_runs",
    "launch.demo",
    "launch.evaluate_policy",
    "launch.gpu_check",
    "launch.hacking_rates",
    "launch.jrm_shapeedit",
    "launch.nft_vs_grpo",
    "launch.online_rm",
    "launch.policy_binding",
    "launch.policy_pairs",
    "launch.serve_judge",
]


def dataclass_fields(cls, prefix=""):
    """(dotted key, field) of every field of `cls`, walking nested dataclasses and lists of them."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield prefix + f.name, cls, f
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from dataclass_fields(kind, f"{prefix}{f.name}.")
        elif typing.get_origin(kind) is list and dataclasses.is_dataclass(typing.get_args(kind)[0]):
            yield from dataclass_fields(typing.get_args(kind)[0], f"{prefix}{f.name}[].")


@pytest.mark.parametrize("module", sorted(CONFIG_CLIS))
def test_config_help_lists_every_key_with_default_and_doc(module, capsys):
    mod = importlib.import_module(module)
    cls = getattr(mod, CONFIG_CLIS[module])
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    summary, usage = mod.__doc__.strip().split("\n\n")[:2]
    assert summary in out and usage in out
    lines = out.splitlines()
    for key, owner, f in dataclass_fields(cls):
        doc = field_docs(owner).get(f.name)
        assert doc, f"{owner.__name__}.{f.name} ({module} key {key}) has no docstring: write one line under the field"
        at = next(
            (
                i
                for i, line in enumerate(lines)
                if line.startswith((f"  {key} = ", f"  {key} (required)")) or line == f"  {key}:"
            ),
            None,
        )
        assert at is not None, f"{module} --help does not list {key} with its default"
        assert doc.split()[0] in lines[at + 1], f"{key}: its doc does not follow: {lines[at + 1]!r}"


def test_dict_valued_fields_show_their_default_keys(capsys):
    from reward.train import TrainConfig, main

    with pytest.raises(SystemExit):
        main(["-h"])
    out = capsys.readouterr().out
    assert all(f"  trainer.{k} = " in out for k in TrainConfig().trainer)
    assert [k.key for k in config_keys(TrainConfig) if k.key.startswith("trainer.")] == [
        f"trainer.{k}" for k in TrainConfig().trainer
    ]


def test_a_field_without_docstring_is_found():
    @dataclasses.dataclass
    class Half:
        documented: int = 1
        """One line."""
        bare: int = 2

    assert field_docs(Half) == {"documented": "One line."}
    assert [k.doc for k in config_keys(Half)] == ["One line.", ""]


class Parsed(Exception):
    pass


@pytest.mark.parametrize("module", FLAG_CLIS)
def test_every_option_has_help_with_its_default(module, monkeypatch):
    parsers = []

    def capture(self, *args, **kwargs):
        parsers.append(self)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(Parsed):
        importlib.import_module(module).main([])
    todo = list(parsers)
    while todo:
        parser = todo.pop()
        assert parser.formatter_class is HelpFormatter, f"{module}: use reward.config.HelpFormatter"
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += action.choices.values()
                continue
            if isinstance(action, argparse._HelpAction):
                continue
            name = "/".join(action.option_strings) or action.dest
            assert action.help, f"{module} {name}: no help text"
            text = formatter._get_help_string(action)
            if action.option_strings and not action.required:
                assert "default" in text, f"{module} {name}: the help does not say the default: {text!r}"
