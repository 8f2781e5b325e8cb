"""Comma-separated command-line values (``KEY=VALUE,...``, ``N,N,...``), parsed in one place.

Several flags take ``KEY=VALUE`` lists (``--task-family TASK=FAMILY``, ``--sft-examples FAMILY=N``,
``--limit N[,TASK=N]``, ``--textmas-args``); each used to split its own text, with its own rules about
blanks, missing ``=`` and bad numbers. One parser gives them the same rules and the same kind of error:
it names the flag, the form it expects and the item that broke it, so a typo is fixed from one line.

``add_flags`` is the one way a chain option of the schema (``latent.config.chain_options``) becomes a
command-line flag, for every command that offers it (``ask``, ``memory``, ``leaderboard``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from ..latent.config import ChainOption

T = TypeVar("T")

_KINDS: dict[object, str] = {int: "an integer", float: "a number"}  # builtins' own messages name no flag


def count(text: str, zero: str | None = None) -> int:
    """An integer >= 0: a number of items or examples (``zero``: what 0 means, for the error, e.g. "every item")."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an integer") from None
    if value < 0:
        raise ValueError("must be >= 0" + (f" (0 = {zero})" if zero else ""))
    return value


def _items(text: str) -> list[str]:
    return [x.strip() for x in str(text).split(",") if x.strip()]


def parse_pairs(text: str, what: str, value_type: Callable[[str], T] = str, form: str = "KEY=VALUE",
                bare_key: str | None = None) -> dict[str, T]:
    """``KEY=VALUE,...`` as a dict, each value converted by ``value_type``; blanks around items are ignored.

    ``what`` is the flag as the user typed it (``--sft-examples``) and ``form`` one item's shape
    (``FAMILY=N``): both go into the error, with the item at fault. ``bare_key``: an item without ``=`` is
    the value of that key (``--limit 5,gsm8k=2`` -> ``{"": 5, "gsm8k": 2}`` with ``bare_key=""``); without it,
    such an item is an error. A later item overrides an earlier one with the same key. A value may hold ``=``
    (``base_url=http://h/?a=b``): only the first ``=`` splits.
    """
    out: dict[str, T] = {}
    for item in _items(text):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep:
            if bare_key is None:
                raise ValueError(f"{what} takes {form},..., got {item!r} (no '=')")
            key, value = bare_key, item
        elif not key:
            raise ValueError(f"{what} takes {form},..., got {item!r} (nothing before '=')")
        try:
            out[key] = value_type(value)
        except ValueError as err:
            reason = f"{value!r} is not {_KINDS[value_type]}" if value_type in _KINDS else str(err)
            raise ValueError(f"{what} takes {form},..., got {item!r}: {reason}") from None
    return out


def parse_counts(text: str, what: str) -> list[int]:
    """``N`` or ``N,N,...`` (each an integer): e.g. ``memory --prompt-tokens 200`` or ``120,80,95``."""
    try:
        return [int(x) for x in _items(text)]
    except ValueError:
        raise ValueError(f"{what} takes N or N,N,... (integers), got {text!r}") from None


def flag(name: str) -> str:
    """The command-line spelling of an option: ``latent_steps`` is ``--latent-steps``."""
    return "--" + name.replace("_", "-")


GIVEN = "given_options"  # the namespace attribute ``add_flags(trained=True)`` records the flags given in


class ArgumentAdder(Protocol):
    """A parser or an argument group of one (``parser.add_argument_group(...)``): what ``add_flags`` adds to."""

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action: ...


class _RecordGiven(argparse.Action):
    """Store the value (as ``action="store"``), and record that the flag was given (its default alone does not
    say it)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        given = set(getattr(namespace, GIVEN, None) or ())
        setattr(namespace, GIVEN, given | {self.dest})


def given_options(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The values of the flags ``names`` that were given on the command line (``add_flags(trained=True)``),
    None for the others: a trained chain's saved value applies where the user did not choose one."""
    given = getattr(args, GIVEN, None) or set()
    return {n: getattr(args, n) if n in given else None for n in names}


def add_flags(parser: ArgumentAdder, options: Iterable[ChainOption],
              defaults: Mapping[str, Any] | None = None, notes: Mapping[str, str] | None = None,
              trained: bool = False) -> None:
    """One flag per option, its type, choices and help from the schema; ``defaults``: a command's own
    default for some of them (the leaderboard's CPU-sized chain), shown in the help as the one it uses;
    ``notes``: what the option means in that command, put before the schema's help (the methods it applies to).
    ``trained``: the command loads a trained chain (``--peft``), whose saved value of an option that shapes the
    trace (``agents`` and the schema's ``saved`` ones) applies when the flag is not given: the flags given are
    recorded (``given_options``) and the help says so."""
    defaults, notes = defaults or {}, notes or {}
    for o in options:
        note = f"{notes[o.name]}: " if o.name in notes else ""
        inherit = trained and (o.saved or o.name == "agents")
        shown = " (default: %(default)s, or the --peft adapter's)" if inherit else " (default: %(default)s)"
        parser.add_argument(flag(o.name), dest=o.name, type=o.type if o.type is not bool else o.parse,
                            default=defaults.get(o.name, o.default), choices=o.choices,
                            action=_RecordGiven if trained else "store",
                            help=(note + o.help).replace("%", "%%") + shown)
