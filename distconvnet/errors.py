"""Typed errors. Library code raises them; only cli.py turns them into one line and an exit code."""


class DistconvnetError(Exception):
    """Any failure we can explain to the user in one line."""

    exit_code = 1


class ConfigError(DistconvnetError):
    """A mistake in a layer-definition or layer-params file, located by file, line and layer."""

    def __init__(self, message, path=None, line=None, layer=None):
        self.path, self.line, self.layer, self.bare_message = path, line, layer, message
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        who = f"layer '{layer}': " if layer is not None else ""
        super().__init__(f"{where}{who}{message}")


class OptionError(DistconvnetError):
    """A bad or conflicting command-line option."""


class DataError(DistconvnetError):
    """Missing, damaged or inconsistent data batches or metadata."""


class CheckpointError(DistconvnetError):
    """A checkpoint that does not exist, is damaged, or does not fit the net."""


class TrainingDiverged(DistconvnetError):
    """A cost became NaN or Inf (the original's `<- error nan or inf!`)."""


def brief(value, limit=40):
    """`value`'s repr, cut to `limit` characters: error lines stay one short line even for a
    4000-digit number or a long list."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
