"""Command-line options built from option dataclasses, merged with an optional YAML config file.

Every field of every dataclass of a subcommand becomes `--field-name` (underscores -> dashes), with
its type, its default and its `metadata["help"]` in `--help`; booleans get `--name / --no-name`.
Fields typed `int | None`, `float | None` or `str | None` are None when off: `none` or `null` on the
command line, `null` (or `none`) in YAML, and `--help` shows such a default as `none`; fields typed
`list[float] | None` take several values (`--reward-weights 1 0.5`, or `1,0.5`; a YAML list).
TRL's option names work as aliases (`--per-device-train-batch-size` = `--batch-size`; the table is
`fastrlhf.trl_compat`), and so does TRL's underscore spelling (`--per_device_train_batch_size`).
Precedence: the dataclass defaults < the `--config file.yaml` values < the command line.
Unknown options, badly typed values and values the dataclass validation rejects end the program
with a message that names the option (argparse exit status 2), before any model is loaded.

    parser = build_parser({"sft": Command("supervised fine-tuning", (ModelOptions, SFTConfig))})
    command, options = parse_args(parser, argv)   # options: {dataclass: instance}
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, Sequence

from fastrlhf.options import option_name


@dataclass
class Command:
    """One subcommand: its one-line help, description and the option dataclasses it takes."""

    help: str
    option_classes: tuple[type, ...]
    description: str = ""
    epilog: str = ""


class CliError(ValueError):
    """A bad option value found after parsing (reported like an argparse error)."""


# what an option typed `X | None` reads as None, on the command line and in YAML (any case)
NONE_WORDS = ("none", "null")
_VALUE_TYPES = (int, float, str)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    raise TypeError(f"option field {f.name!r} has no default")


def _fields(option_classes: Sequence[type]) -> list[tuple[type, dataclasses.Field, type]]:
    """(class, field, resolved type) for every field; a name may appear in only one class."""
    out, seen = [], {}
    for cls in option_classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in seen:
                raise TypeError(f"option {f.name!r} is defined by both {seen[f.name].__name__} and {cls.__name__}")
            seen[f.name] = cls
            out.append((cls, f, hints[f.name]))
    return out


def option_kind(annotation: Any, name: str) -> tuple[type, bool]:
    """(value type, whether None is allowed) of an option field annotated bool, int, float, str,
    int / float / str `| None`, or `list[float] | None` (value type `list`: a list of floats)."""
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        values = [a for a in args if a is not type(None)]
        if len(args) == 2 and len(values) == 1 and (values[0] in _VALUE_TYPES or values[0] == list[float]):
            annotation, optional = values[0], True
    if annotation == list[float]:
        return list, optional
    if annotation is bool or annotation in _VALUE_TYPES:
        return annotation, optional
    raise TypeError(f"option {name!r}: unsupported type {annotation!r} "
                    "(use bool, int, float, str, int / float / str | None, or list[float] | None)")


def float_list(value: Any) -> list[float]:
    """[floats] from a list of numbers or a comma-separated string (ValueError otherwise)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"expected a list of numbers, got {value!r}")
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, float, str)):
            raise ValueError(f"expected a list of numbers, got {value!r}")
        out.append(float(item))
    return out


class _FloatListAction(argparse.Action):
    """`--name 1 0.5`, `--name 1,0.5` -> [1.0, 0.5]; `--name none` -> None."""

    def __call__(self, parser, namespace, values, option_string=None):
        if len(values) == 1 and _means_none(values[0]):
            setattr(namespace, self.dest, None)
            return
        try:
            setattr(namespace, self.dest, [x for v in values for x in float_list(v)])
        except ValueError:
            parser.error(f"argument {option_string}: expected numbers, got {' '.join(values)!r}")


def _means_none(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in NONE_WORDS)


def _converter(kind: type, optional: bool):
    """str -> value for int/float/str options (argparse names the option on failure)."""
    def convert(text: str):
        if optional and _means_none(text):
            return None
        return kind(text)
    convert.__name__ = kind.__name__  # argparse: "invalid int value: 'x'"
    return convert


def _format_default(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "":
        return '""'
    return str(value)


def option_strings(cls: type, name: str) -> list[str]:
    """`--field-name` and the TRL aliases of field `name` of option class `cls`."""
    from fastrlhf.trl_compat import option_aliases

    return [option_name(name)] + [option_name(alias) for alias in option_aliases(cls).get(name, [])]


def add_options(parser: argparse.ArgumentParser, option_classes: Sequence[type]) -> None:
    """One argparse group per dataclass. Defaults are SUPPRESSed, so the parsed namespace holds only
    what the user typed (that is what lets the YAML values sit between defaults and the command line)."""
    groups: dict[type, Any] = {}
    for cls, f, annotation in _fields(option_classes):
        kind, optional = option_kind(annotation, f.name)
        if cls not in groups:
            doc = (cls.__doc__ or "").strip()
            if doc.startswith(cls.__name__ + "("):  # the signature dataclass writes when there is no docstring
                doc = ""
            groups[cls] = parser.add_argument_group(cls.__name__, doc.splitlines()[0] if doc else None)
        default = _field_default(f)
        text = f.metadata.get("help", "")
        text = f"{text} (default: {_format_default(default)})".replace("%", "%%")
        # TRL's names are separate, hidden arguments with the same dest, so that an error names the
        # option the user typed; --help lists them after the default
        names = option_strings(cls, f.name)
        if len(names) > 1:
            text += f" [TRL: {', '.join(names[1:])}]"
        for i, name in enumerate(names):
            shown = text if i == 0 else argparse.SUPPRESS
            if kind is bool:
                groups[cls].add_argument(name, dest=f.name, action=argparse.BooleanOptionalAction,
                                         default=argparse.SUPPRESS, help=shown)
            elif kind is list:
                groups[cls].add_argument(name, dest=f.name, nargs="+", action=_FloatListAction,
                                         default=argparse.SUPPRESS, metavar="FLOAT", help=shown)
            else:
                metavar = {int: "INT", float: "FLOAT", str: "STR"}[kind] + ("|none" if optional else "")
                flag = {"nargs": "?", "const": f.metadata["flag"]} if "flag" in f.metadata else {}
                groups[cls].add_argument(name, dest=f.name, type=_converter(kind, optional),
                                         default=argparse.SUPPRESS, metavar=metavar, help=shown, **flag)


def build_parser(commands: dict[str, Command], *, prog: str = "python -m fastrlhf.train",
                 description: str = "", epilog: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(commands) + "}")
    for name, command in commands.items():
        p = sub.add_parser(name, help=command.help, description=command.description or command.help,
                           usage=f"{prog} {name} [-h] [--config FILE.yaml] [--option VALUE ...]",
                           epilog=command.epilog, allow_abbrev=False,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", metavar="FILE.yaml", default=None,
                       help="YAML file of options (keys as the option names, with - or _); "
                            "command-line options override it")
        add_options(p, command.option_classes)
        p.set_defaults(_command=command)
    return parser


def _yaml_value(annotation: Any, value: Any, key: str, source: str) -> Any:
    """Check / convert one YAML value to the option's type (YAML reads 1e-4 as a string)."""
    where = f"{source}: option {key!r}"
    kind, optional = option_kind(annotation, key)
    if optional and _means_none(value):
        return None
    if kind is list:
        try:
            return float_list(value)
        except ValueError:
            raise CliError(f"{where}: expected a list of numbers, got {value!r}") from None
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise CliError(f"{where}: expected true or false, got {value!r}")
    if kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise CliError(f"{where}: expected a string, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise CliError(f"{where}: expected {kind.__name__}, got {value!r}")
    try:
        if kind is int and isinstance(value, float):
            if not value.is_integer():
                raise ValueError
            return int(value)
        return kind(value)
    except ValueError:
        raise CliError(f"{where}: expected {kind.__name__}, got {value!r}") from None


def load_yaml_options(path: str, option_classes: Sequence[type]) -> dict[str, Any]:
    """{field name: value} from a YAML mapping; unknown keys and bad values raise CliError."""
    import yaml

    if not os.path.isfile(path):
        raise CliError(f"--config: file {path!r} does not exist")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as error:
        raise CliError(f"--config {path}: not valid YAML ({error})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CliError(f"--config {path}: expected a mapping of option: value, got {type(data).__name__}")
    kinds = {f.name: kind for _, f, kind in _fields(option_classes)}
    aliases = _aliases(option_classes)
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        name = aliases.get(name, name)
        if name not in kinds:
            raise CliError(f"{path}: unknown option {key!r}{_suggest(name, [*kinds, *aliases])}")
        if name in values:
            raise CliError(f"{path}: option {key!r} is given twice (once under its TRL name)")
        values[name] = _yaml_value(kinds[name], value, str(key), path)
    return values


def _aliases(option_classes: Sequence[type]) -> dict[str, str]:
    """{TRL name: field name} of the options of these classes."""
    from fastrlhf.trl_compat import option_aliases

    return {alias: name for cls in option_classes for name, names in option_aliases(cls).items() for alias in names}


def _suggest(name: str, known) -> str:
    """" (did you mean --x?)" for the closest known option name (field names and TRL aliases alike)."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {option_name(close[0])}?)" if close else ""


def _dashes(argv: list[str]) -> list[str]:
    """TRL's `--per_device_train_batch_size 4` spelling -> `--per-device-train-batch-size 4` (option
    names only; values are left alone)."""
    out = []
    for arg in argv:
        if arg.startswith("--") and "_" in arg.split("=", 1)[0]:
            name, sep, value = arg.partition("=")
            arg = name.replace("_", "-") + sep + value
        out.append(arg)
    return out


def make_options(option_classes: Sequence[type], values: dict[str, Any]) -> dict[type, Any]:
    """Instantiate each dataclass from `values` (missing fields keep their defaults). A ValueError
    from a dataclass's own validation becomes a CliError naming the option."""
    options = {}
    for cls in option_classes:
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            options[cls] = cls(**{k: v for k, v in values.items() if k in names})
        except ValueError as error:
            raise CliError(_name_options(str(error), names)) from None
    return options


def _name_options(message: str, names) -> str:
    """Prefix a validation message with the option it is about (the first field name it mentions)."""
    for name in sorted(names, key=len, reverse=True):
        if message.startswith(name) or f" {name} " in f" {message} ":
            return f"{option_name(name)}: {message}"
    return message


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
               default_command: str | None = None) -> tuple[str, dict[type, Any]]:
    """(command, {option class: instance}). Exits with status 2 and a message on any bad option.

    With `default_command`, an argv without a subcommand (empty, or starting with an option other
    than -h/--help) runs that command.
    """
    argv = list(argv) if argv is not None else None
    if argv is None:
        import sys

        argv = sys.argv[1:]
    commands = _subcommands(parser)
    argv = _dashes(argv)
    if default_command and (not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help"))):
        argv = [default_command, *argv]
    namespace, unknown = parser.parse_known_args(argv)
    if namespace.command is None:
        parser.error(f"choose a subcommand: {', '.join(commands)}")
    command: Command = namespace._command
    subparser = commands[namespace.command]
    if unknown:
        options = [o for o in unknown if o.startswith("-")]
        if not options:
            subparser.error(f"unexpected argument {unknown[0]!r} (options are written --name value)")
        known = [f.name for _, f, _ in _fields(command.option_classes)] + ["config"] + list(_aliases(command.option_classes))
        name = options[0].split("=")[0]
        subparser.error(f"unknown option {name}{_suggest(name.lstrip('-').replace('-', '_'), known)}; "
                        f"see `{subparser.prog} --help`")
    given = {k: v for k, v in vars(namespace).items() if k not in ("command", "config", "_command")}
    try:
        values = load_yaml_options(namespace.config, command.option_classes) if namespace.config else {}
        values.update(given)
        return namespace.command, make_options(command.option_classes, values)
    except CliError as error:
        subparser.error(str(error))
        raise  # unreachable: error() exits


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}
