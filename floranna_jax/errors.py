"""The errors a user sees as one line (``launch.py`` prints ``error: <message>``, exit 2).

ConfigError: a bad config value, data file or path, found before anything is compiled;
the message names the field, file, line or value. RoundError: a round produced something
unusable (non-finite loss, upload or aggregate); the message names the 1-based round, the
client or layer, and the round's state is never checkpointed.
ConversionError: a model file ``convert_gguf`` cannot convert; its command line prints it
as one ``error: ...`` line, exit 2.
WriteError: the workdir could not be written (a full disk, a lost mount) once the run had
started; one line (exit 1) naming the file and the cause; the workdir stays resumable.
"""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message ("" if it has none): libraries often add
    tracebacks or hints on later lines, and the user gets one line."""
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


class ConfigError(ValueError):
    """A bad config value or input file; the message names it and what is valid."""


class RoundError(ValueError):
    """A round produced a non-finite loss, upload or aggregate; nothing was saved."""


class BadValue(ValueError):
    """A component's own check failed for its parameter ``param`` (the name the component
    knows it by, e.g. ``learning_rate``); ``config_check`` turns it into a ConfigError
    naming the config field."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


class ConversionError(ValueError):
    """A model file that cannot be converted (``convert_gguf``): the message names the file
    and what is wrong with it."""


class WriteError(RuntimeError):
    """Writing the workdir failed mid-run: the message names the file, the cause and the
    round the same command resumes from."""
