"""The command-line and config-file reader of train.py, distill.py and sample.py.

Config files (the other files of this folder) are Python files of plain `name = value` lines,
parsed with ast, never executed; --key=value overrides follow. Every key must be a field of the
script's config dataclass or of melt.MeltConfig.
"""

import ast
import inspect
import os
import re
import sys
from dataclasses import MISSING, fields, is_dataclass

from melt import MeltConfig, MeltError

ConfigError = MeltError   # every user mistake: printed as one line, exit status 2


def _field_types(cls):
    return {f.name: f.type for f in fields(cls)}   # real types: this file has no postponed annotations


def coerce(key, value, typ, text=True):
    """The value of --key=value (text=True: a string to read as the field's type) or of a config
    file (text=False: a Python literal, which must already be of the type: "10" is no int)."""
    if text and isinstance(value, str) and typ is not str:
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            if typ is bool and value.lower() in ("true", "false"):
                value = value.lower() == "true"
            else:
                raise ConfigError(f"--{key}={value!r} is not a valid {typ.__name__}") from None
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if typ is bool and value in (0, 1) and not isinstance(value, bool):
        value = bool(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"{key}={value!r} should be a {typ.__name__}")
    return value


def read_config_file(path):
    """`name = literal` lines of a config file, parsed with ast (nothing is executed)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found")
    try:
        body = ast.parse(open(path, encoding="utf-8").read(), path).body
    except (SyntaxError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path!r} is not valid Python: {e}") from None
    out = {}
    for node in body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue   # a docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise ConfigError(f"{path}:{node.lineno}: config files hold only `name = value` lines")
        try:
            out[node.targets[0].id] = ast.literal_eval(node.value)
        except ValueError:
            raise ConfigError(f"{path}:{node.lineno}: the value of {node.targets[0].id} must be a literal") from None
    return out


def options_help(cls, defaults=None, skip=()):
    """`--key=default   comment` for every field of a config dataclass, the comment read from the
    line that declares it (in the class or the class it extends). defaults: {key: value} over the
    fields' own; None shows each key's type instead (a value that comes from elsewhere). skip:
    keys another config takes first."""
    comments = {}
    for klass in reversed(cls.__mro__):
        if is_dataclass(klass):
            comments.update(re.findall(r"^ +(\w+): [^=\n]+=[^#\n]*# *(.*)$", inspect.getsource(klass), re.M))
    lines = []
    for f in [f for f in fields(cls) if f.name not in skip]:
        own = f.default_factory() if f.default is MISSING else f.default
        shown = f.type.__name__.upper() if defaults is None else repr(defaults.get(f.name, own))
        lines.append(f"  --{f.name}={shown}".ljust(36) + f" {comments.get(f.name, '')}".rstrip())
    return "\n".join(lines)


def parse_config(argv, train_cls, model_defaults=None):
    """argv -> (train_cls instance, MeltConfig keys the user set). Config files first, then --key=value.
    --help (or -h): the script's docstring and every key with its default, then exit. model_defaults:
    the model of a run from scratch (train.py's), shown in the help; None: a checkpoint's config."""
    if "--help" in argv or "-h" in argv:
        model = ("the model (MeltConfig) of a run from scratch, vocab_size the dataset's" if model_defaults else
                 "the model (MeltConfig): the loaded checkpoint's config, unless given")
        doc = (sys.modules["__main__"].__doc__ or "").strip()
        print(f"{doc}\n\nconfig files (name = value lines) first, then --key=value:\n{options_help(train_cls, {})}\n\n"
              f"{model}:\n{options_help(MeltConfig, model_defaults, skip=_field_types(train_cls))}")
        sys.exit(0)
    ttypes, mtypes = _field_types(train_cls), _field_types(MeltConfig)
    given = {}   # key -> (value, given as text on the command line)
    for arg in argv:
        if arg.startswith("--"):
            if "=" not in arg:
                raise ConfigError(f"{arg}: write --key=value")
            key, value = arg[2:].split("=", 1)
            given[key] = (value, True)
        else:
            given.update({k: (v, False) for k, v in read_config_file(arg).items()})
    unknown = sorted(set(given) - set(ttypes) - set(mtypes))
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; valid keys: {sorted(set(ttypes) | set(mtypes))}")
    train = {k: coerce(k, v[0], ttypes[k], v[1]) for k, v in given.items() if k in ttypes}
    model = {k: coerce(k, v[0], mtypes[k], v[1]) for k, v in given.items() if k in mtypes and k not in ttypes}
    cfg = train_cls(**train)
    cfg._given = set(train)   # the keys the user set (init_from=resume keeps the saved ones of the rest)
    return cfg, model


def run_cli(main_fn, prog):
    """Run main_fn(argv); a user mistake is one line on stderr and exit status 2 (--debug=True
    anywhere on the command line shows the traceback instead)."""
    argv = [a for a in sys.argv[1:] if a not in ("--debug=True", "--debug")]
    try:
        main_fn(argv)
    except (MeltError, FileNotFoundError, IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        if len(argv) != len(sys.argv) - 1:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)


