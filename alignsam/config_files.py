"""Layered config files: a task config names the file it builds on with a top-level ``base_config``.

    # conf/scenes/shadow.yaml
    base_config: _base.yaml        # relative to this file; conf/scenes/_base.yaml
    model:
      task: shadow
      ...

jsonargparse has no include, but it merges successive ``--config`` files: each file sets only the
keys it names (a dataclass group such as ``model.env`` or a class's ``init_args`` key by key; any
other value, a list or a mapping-typed option such as ``model.matcher``, is replaced whole), and
a later file wins. So :func:`expand_base_configs` rewrites the command line before the parser
sees it: ``--config conf/scenes/shadow.yaml`` becomes

    --config conf/_base.yaml --config conf/scenes/_base.yaml --config conf/scenes/shadow.yaml

(bases first, deepest first), and :func:`add_base_config_argument` lets the parser accept the key
itself. ``train.py`` and ``evaluate.py`` do both (:mod:`alignsam.cli`); docs/configs.md describes
the layout of ``conf/``.

OmegaConf interpolations (``${model.task}``) are resolved file by file (the parser's ``omegaconf``
mode), so an interpolation must sit in a file that also sets the key it reads.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Set

import yaml

from alignsam.errors import ConfigError

BASE_CONFIG_KEY = "base_config"
# What --base_config means; the argument itself is hidden (see add_base_config_argument).
BASE_CONFIG_HELP = "loaded before this file by train.py/evaluate.py"
CONFIG_FLAGS = ("--config", "-c")


def add_base_config_argument(parser) -> None:
    """Let ``parser`` (a jsonargparse / LightningArgumentParser) accept a config's ``base_config`` key.

    The value is read by :func:`expand_base_configs` before parsing, never by the parser. The
    argument is hidden from ``--help`` because jsonargparse leaves hidden arguments out of every
    dump: shown, it would appear in ``--print_config`` and in each run's ``config.yaml`` as
    ``base_config: _base.yaml`` (relative to conf/, not to the run), and ``evaluate.py``, which
    reads that file back, would look for ``<run>/_base.yaml``.
    """
    parser.add_argument("--" + BASE_CONFIG_KEY, type=Optional[str], default=None, help=argparse.SUPPRESS)


def expand_base_configs(argv: List[str]) -> List[str]:
    """``argv`` with each ``--config X`` / ``--config=X`` / ``-c X`` / ``-c=X`` preceded by X's bases.

    The chain of ``base_config`` keys is followed from X (each relative to the file naming it) and
    the bases are inserted as ``--config <base>``, the deepest first, just before X. A file already
    loaded earlier in ``argv`` (as a config or a base) is not loaded again, so expanding twice
    changes nothing. A value that is not a file (a YAML string, a missing path) is left to the
    parser, which reports it.

    Raises:
        ConfigError: (key ``base_config``) a base file that does not exist, a chain that comes
            back to a file already in it, or a value that is not a path; the message names the
            config file.
    """
    out: List[str] = []
    loaded: Set[Path] = set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        value = None
        if arg in CONFIG_FLAGS and i + 1 < len(argv):
            value, taken = argv[i + 1], [arg, argv[i + 1]]
            i += 2
        elif any(arg.startswith(flag + "=") for flag in CONFIG_FLAGS):
            value, taken = arg.split("=", 1)[1], [arg]
            i += 1
        else:
            out.append(arg)
            i += 1
            continue
        if os.path.isfile(value):
            for base in base_chain(value):
                if _identity(base) not in loaded:
                    loaded.add(_identity(base))
                    out += ["--config", base]
            loaded.add(_identity(value))
        out += taken
    return out


def base_chain(config: str) -> List[str]:
    """The bases of config file ``config``, deepest first (``config`` itself not included).

    Each path is the naming file's directory joined with its ``base_config`` value (normalised,
    so relative stays relative).
    """
    chain: List[str] = []
    seen = [config]
    current = config
    while True:
        base = _base_config_of(current)
        if base is None:
            break
        path = os.path.normpath(os.path.join(os.path.dirname(current), base))
        if not os.path.isfile(path):
            raise ConfigError(BASE_CONFIG_KEY, f"in {current}: {base!r} names {path}, which is not a file "
                                               f"(a base_config path is relative to the file that names it)")
        if _identity(path) in {_identity(s) for s in seen}:
            cycle = " -> ".join([*seen, path])
            raise ConfigError(BASE_CONFIG_KEY, f"in {current}: {base!r} makes a cycle ({cycle}); "
                                               f"a base must not build on the file that names it")
        seen.append(path)
        chain.append(path)
        current = path
    return chain[::-1]


def load_config(config, resolve: bool = True) -> Dict[str, Any]:
    """The mapping a config file and its bases make together, without a parser: each file's YAML
    (its OmegaConf interpolations resolved within that file when ``resolve``, as the parser does),
    merged base first; mappings merge key by key, any other value is replaced. ``base_config``
    itself is left out.

    For the data section this is what the parser builds (tests build a data module from it). It
    differs where the parser replaces a mapping whole (``model.matcher``, a dict-typed option) and
    it holds no defaults: :func:`expand_base_configs` with ``--print_config`` gives the real thing.
    """
    merged: Dict[str, Any] = {}
    for path in [*base_chain(str(config)), str(config)]:
        merged = _merge(merged, _read(path, resolve))
    merged.pop(BASE_CONFIG_KEY, None)
    return merged


# -- helpers ----------------------------------------------------------------------------------

def _identity(path: str) -> Path:
    return Path(path).resolve()


def _base_config_of(path: str) -> Optional[str]:
    """The ``base_config`` value of config file ``path``, or None. A file the YAML reader refuses
    (or that is no mapping) has none here; the parser reports its own errors on it."""
    try:
        content = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(content, dict) or content.get(BASE_CONFIG_KEY) is None:
        return None
    value = content[BASE_CONFIG_KEY]
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(BASE_CONFIG_KEY, f"in {path}: {value!r} is not a path; give the file this one "
                                           f"builds on, relative to it (e.g. base_config: _base.yaml)")
    return value


def _read(path: str, resolve: bool) -> Dict[str, Any]:
    content = yaml.safe_load(Path(path).read_text()) or {}
    if resolve and isinstance(content, dict):
        from omegaconf import OmegaConf

        content = OmegaConf.to_container(OmegaConf.create(content), resolve=True)
    return content


def _merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged
