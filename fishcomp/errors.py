"""The one exception type that means "the user can fix this": the CLI turns it into one line and exit 2."""


class FishcompError(Exception):
    """Bad input, bad config or a failed check; the message is shown to the user as is."""

    exit_code = 2
