"""What the scripts share in talking to their user: one-line errors and exit statuses, --help
with defaults, flag checks, and Ctrl-C / SIGTERM during training."""

import argparse
import signal
import sys

from tqdm import tqdm


class UserError(Exception):
    """A problem with the user's input or files: the scripts print it as one line and exit 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with every flag's default, except the empty ones (None, False) that say nothing."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with --help defaults (HelpFormatter), whose errors are one line and exit 2."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, formatter_class=HelpFormatter, **kwargs)

    def error(self, message):
        print(f"error: {message} (--help lists the flags)", file=sys.stderr)
        sys.exit(2)


def check_at_least(args, **lowest):
    """A UserError naming the first flag below its lowest allowed value (None: not given, fine)."""
    for name, low in lowest.items():
        value = getattr(args, name)
        if value is not None and value < low:
            raise UserError(f"--{name.replace('_', '-')} must be >= {low}")


def run_cli(run, args):
    """Run a script's body: a UserError, or a file that cannot be read or written (OSError: no
    permission, disk full), becomes one line on stderr and exit status 2; Ctrl-C one line and 130
    (the shell's status for SIGINT). Files are written atomically, so none is left half-written."""
    try:
        run(args)
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


class StopRequest:
    """Ctrl-C / SIGTERM. Before the first step (loading data): stop at once, nothing to save. Once
    training (arm()): the first finishes the step, saves, exits; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = self.armed = False
        self.signum = None  # the first stop signal, for the exit status (128 + it, as the shell's)
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def arm(self):
        self.armed = True

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.signum = self.signum or signum
        if not self.armed or (self.requested and signum == signal.SIGINT):
            if hasattr(signal, "SIGCHLD"):
                # A SIGTERM to the whole group also kills the image-decoding workers, and PyTorch's
                # loader would report their deaths as an error over this stop: not its concern now.
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write(f"{signal.Signals(signum).name}: stopping after this step, saving last.pt")
