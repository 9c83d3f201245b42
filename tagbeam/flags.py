"""Options declared once, as dataclass fields, and everything derived from that one declaration.

An option group is a class decorated with `@group` (a frozen, keyword-only dataclass, registered
in one registry); each field is declared with `option(...)`: its type (from the annotation),
default, help, choices, value check and tags (what else uses it: `tagged`) live there and nowhere
else. From that declaration this module derives

- the argparse flags of every entry point that takes the group (`add_options`), whose values are
  checked while parsing, so a bad value is one `error:` line and exit 2;
- the checks of every object of a group, built from flags (`build`) or in code: each field's
  type and declared check, then the group's own `validate()` for what involves several fields,
  always, as a ValueError naming the flag;
- the entry points' option sets: a job is a dataclass whose fields are option groups
  (`add_job_options`, `build_job`), named, never positional;
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
# Every option group, by qualified name: what docs/options.md and the contract tests iterate.
_REGISTRY: dict[str, type] = {}


class UsageError(Exception):
    """The user's input or flags are wrong; the message names the flag or file and what to do.
    Entry points print it as one `error:` line and exit 2."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Says a flag's default once: not for a required flag or one without a value by default, and
    not when its help already says what the default is (a default computed at run time)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.required or action.default is None or "default" in text:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors, like every other user error of these tools."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # specs must spell flags in full
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(**kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")


Check = Callable[[Any], "str | None"]


def option(default: Any = dataclasses.MISSING, *, help: str, flag: str | None = None,  # noqa: A002
           choices: Sequence[Any] | None = None, check: Check | None = None, env: str | None = None,
           aliases: Sequence[str] = (), metavar: str | None = None, tags: Iterable[str] = ()) -> Any:
    """One option: a dataclass field plus what its flag needs.

    flag: the command-line name without "--" (default: the field name). check: returns why a value
    is not allowed, or None. env: an environment variable that supplies the default when set
    (Vertex AI's AIP_* conventions); without it and without a default the flag is required.
    tags: what else this option is part of (e.g. "the entry point predict takes it"), read back
    with `tagged` instead of a list of field names kept beside the declaration.
    """
    meta = {_META: {"help": help, "flag": flag, "choices": tuple(choices) if choices else None, "check": check,
                    "env": env, "aliases": tuple(aliases), "metavar": metavar, "tags": frozenset(tags)}}
    return dataclasses.field(default=default, metadata=meta)


def group(cls: type) -> type:
    """Declares an option group: a frozen, keyword-only dataclass of `option(...)` fields that checks
    every object made of it - each field's type, choices and check (`check_fields`), then the
    group's own `validate()` if it has one (rules that involve several fields) - and registers it.

    A group defines `validate`, never `__post_init__`, so that no group can skip the field checks.
    """
    if "__post_init__" in cls.__dict__:
        raise TypeError(f"{cls.__name__}: an option group checks several fields in validate(), not __post_init__")

    def __post_init__(self: Any) -> None:
        check_fields(self)
        validate = getattr(self, "validate", None)
        if validate is not None:
            validate()

    cls.__post_init__ = __post_init__  # type: ignore[attr-defined]
    made = dataclasses.dataclass(frozen=True, kw_only=True)(cls)
    declared(made)  # a bad declaration fails at import, not when a flag is first parsed
    _REGISTRY[f"{made.__module__}.{made.__qualname__}"] = made
    return made


def registered() -> list[type]:
    """Every option group declared so far (imported modules only), in declaration order."""
    return list(_REGISTRY.values())


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
    tags: frozenset[str]

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING

    def type_problem(self, value: Any) -> str | None:
        """Why `value` is not of this option's type, or None (None itself is left to the caller)."""
        if self.kind is bool:
            ok = isinstance(value, bool)
        elif self.kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, self.kind) and not isinstance(value, bool)
        return None if ok else f"expected {self.kind.__name__}, got {value!r}"

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
                              meta["choices"], meta["check"], meta["env"], meta["aliases"], meta["metavar"],
                              meta["tags"]))
    return found


def tagged(cls: type, tag: str) -> list[str]:
    """The names of the options of group `cls` declared with `tag`."""
    return [o.name for o in declared(cls) if tag in o.tags]


def check_fields(options: Any) -> None:
    """Runs every field's type, choices and declared check on an option group, with the same rule
    its flag applies; raises ValueError naming the flag. `@group` runs it for every object.

    None passes where the option is optional, and where it is required (no default): an
    orchestrator may leave a required option to the step that needs it (`add_options`'s
    not_required), and that step's parser requires it."""
    for o in declared(type(options)):
        value = getattr(options, o.name)
        if value is None:
            if o.optional or o.required:
                continue
            raise ValueError(f"--{o.flag} must be given a value, got None")
        problem = o.type_problem(value)
        if problem or o.kind is bool:
            pass
        elif o.kind is float and not math.isfinite(value):
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


# --- entry points: a job is a named set of option groups ----------------------------------------

_PART = "tagbeam_part"


@dataclasses.dataclass(frozen=True)
class Part:
    """One option group of an entry point's job, and which of its options the entry point takes."""

    name: str  # the job's field
    group: type
    title: str | None = None
    only_tagged: str | None = None  # only the group's options declared with this tag
    exclude: tuple[str, ...] = ()  # options the entry point sets itself
    not_required: tuple[str, ...] = ()  # see add_options
    to: str | None = None  # the entry point this part is forwarded to (an orchestrator's step)

    @property
    def options(self) -> list[Declared]:
        only = tagged(self.group, self.only_tagged) if self.only_tagged else None
        return _select(self.group, only, self.exclude)


def part(*, title: str | None = None, only_tagged: str | None = None, exclude: Iterable[str] = (),
         not_required: Iterable[str] = (), to: str | None = None) -> Any:
    """A job's field that holds an option group, with what `Part` says about it. A field annotated
    with a registered group and no `part()` takes all of the group's options."""
    return dataclasses.field(metadata={_PART: {"title": title, "only_tagged": only_tagged, "exclude": tuple(exclude),
                                               "not_required": tuple(not_required), "to": to}})


def parts(job: type) -> list[Part]:
    """The option groups of an entry point's job dataclass, in field order."""
    hints = typing.get_type_hints(job)
    groups = set(_REGISTRY.values())
    return [Part(f.name, hints[f.name], **f.metadata.get(_PART, {}))
            for f in dataclasses.fields(job) if hints[f.name] in groups]


def add_job_options(parser: argparse.ArgumentParser, job: type) -> None:
    """The flags of every option group of `job` (see `parts`)."""
    for p in parts(job):
        title = p.title
        if title is None and p.to:
            title = f"{p.to}: {(p.group.__doc__ or '').split(':')[0].strip()}"
        add_options(parser, p.group, title=title, only=[o.name for o in p.options], not_required=p.not_required)


def build_parts(job: type, namespace: argparse.Namespace) -> dict[str, Any]:
    """Every option group of `job` from parsed flags, by field name (UsageError as `build`)."""
    return {p.name: build(p.group, namespace) for p in parts(job)}


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


# --- the option reference (docs/options.md) ---------------------------------------------------

def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _shown_default(o: Declared) -> str:
    if o.required:
        return f"${o.env}" if o.env else "required"
    if o.kind is bool or o.default is None:
        return "off" if o.kind is bool else "-"
    return f"`{o.default:g}`" if o.kind is float else f"`{o.default}`"


def reference(entry_points: dict[str, type], tag_notes: dict[str, str] | None = None) -> str:
    """The option reference of `entry_points` (entry point -> its job dataclass), in Markdown: which
    entry point takes which group, then every group's options with type, default and help (and, for
    an option declared with a tag in `tag_notes`, that note)."""
    groups: dict[type, dict[str, str]] = {}
    for entry_point, job in entry_points.items():
        for p in parts(job):
            taken = [o.name for o in p.options]
            every = [o.name for o in declared(p.group)]
            shown = "all" if taken == every else (
                f"all but {', '.join('--' + o.flag for o in declared(p.group) if o.name not in taken)}"
                if len(taken) > len(every) / 2 else ", ".join(f"--{o.flag}" for o in p.options))
            groups.setdefault(p.group, {})[entry_point] = shown + (f" (forwarded to {p.to})" if p.to else "")
    names = list(entry_points)
    lines = ["| group | module | " + " | ".join(f"`{n}`" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for cls, taken_by in groups.items():
        lines.append(f"| [`{cls.__name__}`](#{cls.__name__.lower()}) | `{cls.__module__}` | "
                     + " | ".join(_cell(taken_by.get(n, "-")) for n in names) + " |")
    for cls in groups:
        title = (cls.__doc__ or "").strip().split("\n")[0]
        lines += ["", f"## {cls.__name__}", "", _cell(title), "", "| flag | type | default | help |", "|---|---|---|---|"]
        for o in declared(cls):
            kind = "one of " + ", ".join(f"`{c}`" for c in o.choices) if o.choices else o.kind.__name__
            flag = ", ".join(f"`--{n}`" for n in (o.flag, *o.aliases))
            notes = "".join(f" ({note})" for tag, note in (tag_notes or {}).items() if tag in o.tags)
            lines.append(f"| {flag} | {kind} | {_cell(_shown_default(o))} | {_cell(o.help + notes)} |")
    return "\n".join(lines) + "\n"


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
