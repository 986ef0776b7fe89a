"""The INI reader for layer-definition and layer-params files.

It reads files the way cuda-convnet2's ConfigParser did (sections in file order, keys
case-insensitive, section names case-sensitive, `#`/`;` comment lines) and remembers the line of
every section and key, so that errors can name them. It knows nothing about layer types.
"""

import configparser
import math
import os
import re

from .errors import ConfigError, brief

REQUIRED = object()
_SECTION_RE = re.compile(r"^\[(?P<name>[^]]+)\]")
_KEY_RE = re.compile(r"^(?P<key>[^\s=:][^=:]*?)\s*[=:]")
_MAX_DIGITS = 18           # an integer key beyond 10^18 sizes nothing torch can allocate
_TRUE = {"1", "yes", "true", "on"}
_FALSE = {"0", "no", "false", "off"}


class Section:
    """One `[name]` section: its raw values, where they are, and typed getters that fail clearly."""

    def __init__(self, name, path, line, values, key_lines):
        self.name, self.path, self.line = name, path, line
        self._values = values
        self._key_lines = key_lines
        self._used = set()

    def __contains__(self, key):
        return key.lower() in self._values

    def keys(self):
        return list(self._values)

    def error(self, message, key=None):
        line = self._key_lines.get(key.lower(), self.line) if key else self.line
        return ConfigError(message, self.path, line, self.name)

    def raw(self, key, default=REQUIRED):
        # Keys match case-insensitively; an error names the key as the layer's docs spell it.
        folded = key.lower()
        self._used.add(folded)
        if folded in self._values:
            return self._values[folded]
        if default is REQUIRED:
            raise self.error(f"missing required key '{key}'")
        return default

    def _convert(self, key, text, conv, what):
        text = text.strip()
        digits = text.lstrip("+-")
        if conv is int and digits.isdigit() and len(digits.lstrip("0")) > _MAX_DIGITS:
            raise self.error(f"{key}={brief(text)}: expected {what} below 10^{_MAX_DIGITS}",
                             key)
        try:
            value = conv(text)
        except (TypeError, ValueError, OverflowError):
            raise self.error(f"{key}={brief(text)}: expected {what}", key) from None
        if conv is float and not math.isfinite(value):
            raise self.error(f"{key}={brief(text)}: expected a finite number", key)
        return value

    def str(self, key, default=REQUIRED):
        value = self.raw(key, default)
        return value.strip() if isinstance(value, str) else value

    def int(self, key, default=REQUIRED):
        value = self.raw(key, default)
        return self._convert(key, value, int, "an integer") if isinstance(value, str) else value

    def float(self, key, default=REQUIRED):
        value = self.raw(key, default)
        return self._convert(key, value, float, "a number") if isinstance(value, str) else value

    def bool(self, key, default=REQUIRED):
        value = self.raw(key, default)
        return self._convert(key, value, _to_bool, "a boolean (0/1, true/false)") \
            if isinstance(value, str) else value

    def list(self, key, count, conv=str, default=REQUIRED, what="a value"):
        """A comma list with one value per input; a single value is broadcast to all `count`."""
        value = self.raw(key, default)
        if not isinstance(value, str):
            return list(value) if isinstance(value, (list, tuple)) else [value] * count
        items = [self._convert(key, item, conv, what) for item in value.split(",")]
        if len(items) == 1 and count > 1:
            items = items * count
        if len(items) != count:
            wanted = "1 value" if count == 1 else f"1 or {count} comma-separated values " \
                "(one per input)"
            raise self.error(f"{key}={value!r}: expected {wanted}, got {len(items)}", key)
        return items

    def derive(self, name, values, key):
        """A synthetic section (e.g. the implicit `<layer>_neuron`) located at `key`'s line."""
        line = self._key_lines.get(key.lower(), self.line)
        return Section(name, self.path, line, dict(values), {k: line for k in values})

    def unused_keys(self):
        return [k for k in self._values if k not in self._used]

    def __repr__(self):
        return f"Section({self.name!r}, {self.path}:{self.line})"


def _to_bool(text):
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise ValueError(text)


class CfgFile:
    """An ordered collection of sections read from one file."""

    def __init__(self, path, sections):
        self.path = path
        self.sections = sections
        self._by_name = {s.name: s for s in sections}

    def __contains__(self, name):
        return name in self._by_name

    def get(self, name):
        return self._by_name.get(name)


def read_text(path):
    if not os.path.isfile(path):
        raise ConfigError("file does not exist", path)
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def read_cfg(path, text=None):
    """Parse one cfg file (or its `text`, e.g. from a checkpoint, labelled with `path`).

    Syntax errors become ConfigError with the file and line.
    """
    if text is None:
        text = read_text(path)
    stray = _stray_indented_line(text)
    if stray is not None:
        number, line = stray
        raise ConfigError(f"indented line {line.strip()!r} continues no value (only the "
                          f"continuation lines of a value may be indented)", path, number)
    parser = configparser.RawConfigParser(
        comment_prefixes=("#", ";"), inline_comment_prefixes=None, strict=True,
        empty_lines_in_values=False, interpolation=None, default_section="\0no-default\0")
    try:
        parser.read_string(text, source=path)
    except configparser.MissingSectionHeaderError as e:
        raise ConfigError(f"expected a section header like [layername], got {e.line.strip()!r}",
                          path, e.lineno) from None
    except configparser.DuplicateSectionError as e:
        raise ConfigError(f"section [{e.section}] is defined twice", path, e.lineno) from None
    except configparser.DuplicateOptionError as e:
        raise ConfigError(f"key '{e.option}' is given twice", path, e.lineno, e.section) from None
    except configparser.ParsingError as e:
        lineno, line = e.errors[0]
        raise ConfigError(f"cannot parse {line.strip()!r} (expected key=value)",
                          path, lineno) from None
    section_lines, key_lines = _locate(text)
    sections = [Section(name, path, section_lines[name], dict(parser.items(name)),
                        key_lines[name]) for name in parser.sections()]
    return CfgFile(path, sections)


def _stray_indented_line(text):
    """(number, line) of the first indented line that is not the continuation of a value, or
    None. The original's Python 2 ConfigParser refused such lines; Python 3's reads them as if
    they were not indented. A blank or comment line ends a value, as configparser has it here."""
    in_value = False
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";")):
            in_value = False
        elif line[0].isspace():
            if not in_value:
                return number, line
        else:
            in_value = not _SECTION_RE.match(line)
    return None


def _locate(text):
    """Line numbers of sections and keys (configparser does not keep them)."""
    section_lines, key_lines, current = {}, {}, None
    for number, line in enumerate(text.splitlines(), start=1):
        m = _SECTION_RE.match(line)
        if m:
            current = m.group("name")
            section_lines[current] = number
            key_lines[current] = {}
            continue
        m = _KEY_RE.match(line)
        if current is not None and m and not line.lstrip().startswith(("#", ";")):
            key_lines[current].setdefault(m.group("key").strip().lower(), number)
    return section_lines, key_lines
