"""Options declared once, as dataclass fields, and everything derived from that one declaration.

An option group is a frozen, keyword-only dataclass; each field is declared with `option(...)`:
its type (from the annotation), default, help, choices and value check live there and nowhere
else. From that declaration this module derives

- the argparse flags of every entry point that takes the group (`add_options`), whose values are
  checked while parsing, so a bad value is one `error:` line and exit 2;
- the typed object from the parsed flags (`build`), whose `__post_init__` checks what involves
  several fields;
- the command line that forwards a group to another entry point (`to_argv`), for the
  orchestrators (`pipelines.retrain` runs `pipelines.preprocess` and `trainer.task`), so that a
  default changed in its one declaration is changed everywhere;
- and the check that an argument no option group knows is one of Beam's own pipeline options
  (`split_beam_args`), never silently ignored.

Why not a library (simple-parsing, tyro, jsonargparse): they do the first two, but forwarding a
group as flags and checking leftovers against Beam's option classes would be ours anyway; the
dataclasses also travel to Beam workers, which then install one dependency fewer.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import typing
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn

_META = "tagbeam_option"


class UsageError(Exception):
    """The user's input or flags are wrong; the message names the flag or file and what to do.
    Entry points print it as one `error:` line and exit 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors, like every other user error of these tools."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # specs must spell flags in full
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")


Check = Callable[[Any], "str | None"]


def option(default: Any = dataclasses.MISSING, *, help: str, flag: str | None = None,  # noqa: A002
           choices: Sequence[Any] | None = None, check: Check | None = None, env: str | None = None,
           aliases: Sequence[str] = (), metavar: str | None = None) -> Any:
    """One option: a dataclass field plus what its flag needs.

    flag: the command-line name without "--" (default: the field name). check: returns why a value
    is not allowed, or None. env: an environment variable that supplies the default when set
    (Vertex AI's AIP_* conventions); without it and without a default the flag is required.
    """
    meta = {_META: {"help": help, "flag": flag, "choices": tuple(choices) if choices else None, "check": check,
                    "env": env, "aliases": tuple(aliases), "metavar": metavar}}
    return dataclasses.field(default=default, metadata=meta)


# --- value checks (return why a value is wrong, or None) ----------------------------------------

def at_least(low: float) -> Check:
    return lambda v: None if v >= low else f"must be >= {low:g}, got {v}"


def positive(v: float) -> str | None:
    return None if v > 0 else f"must be > 0, got {v}"


def fraction(v: float) -> str | None:
    return None if 0 <= v <= 1 else f"must be in [0, 1], got {v}"


def in_range(low: float, high: float, *, high_open: bool = False) -> Check:
    def check(v: float) -> str | None:
        ok = low <= v < high if high_open else low <= v <= high
        return None if ok else f"must be in [{low:g}, {high:g}{')' if high_open else ']'}, got {v}"
    return check


# --- reading declarations -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Declared:
    name: str  # the dataclass field
    flag: str  # without "--"; also the argparse dest and the key in recorded flags
    kind: type  # int, float, str or bool
    optional: bool  # None allowed
    default: Any  # dataclasses.MISSING when required
    help: str
    choices: tuple[Any, ...] | None
    check: Check | None
    env: str | None
    aliases: tuple[str, ...]
    metavar: str | None

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING

    def parse(self, text: str) -> Any:
        """The value of `text`, or ArgumentTypeError saying why not (argparse names the flag)."""
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.kind.__name__}, got {text!r}") from None
        if self.kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        problem = self.check(value) if self.check else None
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value


def declared(cls: type) -> list[Declared]:
    """The options of an option group, in declaration order."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(_META)
        if meta is None:
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with tagbeam.flags.option()")
        kind, optional = hints[f.name], False
        args = typing.get_args(kind)
        if type(None) in args:
            (kind,) = [a for a in args if a is not type(None)]
            optional = True
        if kind not in (int, float, str, bool):
            raise TypeError(f"{cls.__name__}.{f.name}: options are int, float, str or bool (or X | None)")
        found.append(Declared(f.name, meta["flag"] or f.name, kind, optional, f.default, meta["help"],
                              meta["choices"], meta["check"], meta["env"], meta["aliases"], meta["metavar"]))
    return found


def check_fields(options: Any) -> None:
    """Runs every field's declared check (and choices) on an option group built in code, with the
    same rule its flag applies; raises ValueError naming the flag. Call it from __post_init__."""
    for o in declared(type(options)):
        value = getattr(options, o.name)
        if value is None or o.kind is bool:
            continue
        problem = None
        if o.kind is float and not math.isfinite(value):
            problem = f"must be a finite number, got {value}"
        elif o.choices and value not in o.choices:
            problem = f"{value!r} is not one of {', '.join(map(str, o.choices))}"
        elif o.check:
            problem = o.check(value)
        if problem:
            raise ValueError(f"--{o.flag} {problem}")


def _select(cls: type, only: Iterable[str] | None, exclude: Iterable[str]) -> list[Declared]:
    options = declared(cls)
    names = {o.name for o in options}
    wanted = set(only) if only is not None else names
    unknown = (wanted | set(exclude)) - names
    if unknown:
        raise TypeError(f"{cls.__name__} has no option(s) {sorted(unknown)}")
    return [o for o in options if o.name in wanted and o.name not in set(exclude)]


# --- argparse from declarations -----------------------------------------------------------------

def add_options(parser: argparse.ArgumentParser, cls: type, *, title: str | None = None,
                only: Iterable[str] | None = None, exclude: Iterable[str] = (),
                not_required: Iterable[str] = ()) -> None:
    """Adds the flags of option group `cls` (a group titled by its docstring's first line).

    not_required: required options that this entry point may also get elsewhere (an orchestrator
    that needs them only for some of its steps, and says so itself).
    """
    group = parser.add_argument_group(title or (cls.__doc__ or cls.__name__).strip().split("\n")[0].rstrip("."))
    for o in _select(cls, only, exclude):
        names = [f"--{o.flag}", *(f"--{a}" for a in o.aliases)]
        kwargs: dict[str, Any] = {"dest": o.flag, "help": o.help}
        if o.kind is bool:
            if o.default is not False:
                raise TypeError(f"{cls.__name__}.{o.name}: a bool option defaults to False (a flag that turns it on)")
            group.add_argument(*names, action="store_true", **kwargs)
            continue
        default = o.default
        env_value = os.environ.get(o.env) if o.env else None
        if env_value:
            default = o.parse(env_value)
            kwargs["help"] += f" (default: ${o.env})"
        elif o.env:
            kwargs["help"] += f" (required unless ${o.env} is set)"
        if default is dataclasses.MISSING:
            # Checked by `build` when the environment could have supplied it, for a message that says so.
            kwargs["required"] = o.name not in set(not_required) and not o.env
            default = None
        kwargs.update(default=default, type=o.parse, metavar=o.metavar or o.kind.__name__.upper())
        if o.choices:
            kwargs.update(choices=o.choices, metavar=None)
        group.add_argument(*names, **kwargs)


def build(cls: type, namespace: argparse.Namespace, **overrides: Any) -> Any:
    """The option group `cls` from parsed flags; raises UsageError when the group's own checks
    (several fields together) fail."""
    values = {o.name: getattr(namespace, o.flag) for o in declared(cls) if hasattr(namespace, o.flag)}
    values.update(overrides)
    for o in declared(cls):
        if o.env and o.required and values.get(o.name) is None:
            raise UsageError(f"--{o.flag} is required when ${o.env} is not set")
    try:
        return cls(**values)
    except ValueError as err:
        raise UsageError(str(err)) from None


def to_argv(options: Any, *, exclude: Iterable[str] = ()) -> list[str]:
    """The flags that give another entry point the same option group: every option that differs
    from its declared default (the receiver has the same declaration, so the same defaults)."""
    argv: list[str] = []
    for o in declared(type(options)):
        value = getattr(options, o.name)
        if o.name in set(exclude) or value is None or (not o.required and value == o.default):
            continue
        if o.kind is bool:
            argv += [f"--{o.flag}"] if value else []
        else:
            argv += [f"--{o.flag}", repr(value) if o.kind is float else str(value)]
    return argv


def flag_names(*classes: type) -> set[str]:
    return {f"--{name}" for cls in classes for o in declared(cls) for name in (o.flag, *o.aliases)}


# --- Beam's own options -------------------------------------------------------------------------

def _beam_parser() -> argparse.ArgumentParser:
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    # Gathered the way PipelineOptions.get_all_options() does.
    parser = _BeamArgumentParser(allow_abbrev=False)
    for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(parser)
    return parser


def beam_option_strings() -> frozenset[str]:
    return frozenset(s for action in _beam_parser()._actions for s in action.option_strings)


def split_beam_args(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """(arguments that are Beam pipeline options, the rest) - the rest is nobody's option."""
    parser = _beam_parser()
    parser.error = lambda message: (_ for _ in ()).throw(UsageError(message))  # type: ignore[method-assign]
    _, rest = parser.parse_known_args(list(args))
    beam = list(args)
    for token in rest:  # what Beam did not take, in order, taken out of the original sequence
        beam.remove(token)
    return beam, rest


def unknown_error(rest: Sequence[str], entry_point: str) -> UsageError:
    return UsageError(f"unrecognized argument(s) {' '.join(rest)}: neither an option of {entry_point} nor one of "
                      "Beam's pipeline options (flags are spelled in full)")


def parse_with_beam(parser: argparse.ArgumentParser, argv: Sequence[str] | None, entry_point: str
                    ) -> tuple[argparse.Namespace, list[str]]:
    """Parses the entry point's own flags; every other argument must be a Beam pipeline option
    (returned for PipelineOptions), else it is a usage error, exit 2."""
    namespace, unknown = parser.parse_known_args(argv)
    beam, rest = split_beam_args(unknown)
    if rest:
        parser.error(str(unknown_error(rest, entry_point)))
    return namespace, beam


def run_main(run: Callable[[], Any], errors: tuple[type[BaseException], ...] = ()) -> int:
    """Runs an entry point's work: a UsageError (or one of `errors`) is one `error:` line, exit 2."""
    try:
        run()
    except (UsageError, *errors) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
