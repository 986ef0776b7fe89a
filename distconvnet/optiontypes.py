"""The value types of the command line's options (options.py): parse(text) -> value, or
ValueError; text(value) -> str, as the startup listing prints it; holds(value) for a value read
from a checkpoint."""

import re


class ValueProblem(ValueError):
    """A bad value whose own explanation beats "expected X, got 'y'"."""


class ValueType:
    """A string; the other types refine parse and text."""
    name, expected = "string", "a string"

    def parse(self, text):
        return text

    def text(self, value):
        return str(value)

    def holds(self, value):
        """Whether `value` (e.g. read from a checkpoint) is one this type parses to."""
        return isinstance(value, str)


class IntType(ValueType):
    name, expected = "int", "an integer"

    def holds(self, value):
        return type(value) is int

    def parse(self, text):
        if not re.fullmatch(r"\s*[+-]?\d+\s*", text):
            raise ValueError()
        return int(text)


class FloatType(ValueType):
    name, expected = "float", "a number"

    def holds(self, value):
        return type(value) in (int, float)

    def parse(self, text):
        return float(text)

    def text(self, value):
        return "%.6g" % value


class BoolType(ValueType):
    """0/1 only, kept as the int the original stored (anything else is an error)."""
    name, expected = "0/1", "0 or 1"

    def holds(self, value):
        return type(value) is int and value in (0, 1)

    def parse(self, text):
        if text.strip() not in ("0", "1"):
            raise ValueError()
        return int(text)


class ChoiceType(ValueType):
    def __init__(self, *choices):
        self.choices = choices
        self.name = "|".join(choices)
        self.expected = "one of " + ", ".join(choices)

    def parse(self, text):
        if text not in self.choices:
            raise ValueError()
        return text

    def holds(self, value):
        return value in self.choices


class RangeType(ValueType):
    """`N` or `N-M` inclusive, as the original; our extension: comma lists such as `0-3,7`.
    The value is the list of batch numbers in the order written, at most MAX_BATCHES long (a
    data set of more batch files than that is beyond any file system's comfort; a typo such as
    1-1000000000 would otherwise fill the memory)."""
    name, expected = "int[-int]", "N, N-M or a comma list such as 0-3,7"
    MAX_BATCHES = 1_000_000

    def parse(self, text):
        numbers = []
        for part in text.split(","):
            match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
            if not match:
                raise ValueError()
            first = int(match.group(1))
            last = int(match.group(2)) if match.group(2) is not None else first
            if last < first:
                raise ValueProblem(f"{part.strip()} is an empty range")
            if len(numbers) + last - first + 1 > self.MAX_BATCHES:
                raise ValueProblem(f"{text.strip()} has more than {self.MAX_BATCHES:,} batches")
            numbers.extend(range(first, last + 1))
        seen = set()
        for n in numbers:
            if n in seen:
                raise ValueProblem(f"batch {n} is listed twice in {text!r}")
            seen.add(n)
        return numbers

    def holds(self, value):
        return isinstance(value, list) and 0 < len(value) <= self.MAX_BATCHES and \
            all(type(n) is int and n >= 0 for n in value)

    def text(self, value):
        """`a-b` for one run (a single batch prints `6-6`, as the original did), else runs."""
        runs = []
        for n in value:
            if runs and n == runs[-1][1] + 1:
                runs[-1][1] = n
            else:
                runs.append([n, n])
        if len(runs) == 1:
            return "%d-%d" % tuple(runs[0])
        return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


class ListType(ValueType):
    """Comma-separated values of one type; for strings, an empty text is the empty list."""

    def __init__(self, item):
        self.item = item
        self.name = item.name + ",..."
        self.expected = f"a comma-separated list of {item.name}s"

    def parse(self, text):
        if text == "":
            if self.item is STRING:
                return []
            raise ValueError()
        return [self.item.parse(part) for part in text.split(",")]

    def text(self, value):
        return ",".join(self.item.text(v) for v in value)

    def holds(self, value):
        return isinstance(value, list) and all(self.item.holds(v) for v in value)


INT, FLOAT, BOOL, STRING, RANGE = IntType(), FloatType(), BoolType(), ValueType(), RangeType()
