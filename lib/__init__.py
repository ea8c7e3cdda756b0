"""Library of the flowers diffusion repo: network (unet), diffusion maths (diffusion), data,
checkpoints and runtime settings. Scripts at the top level wire them together."""

import argparse
import sys


class UserError(Exception):
    """A problem with the user's input or files: the scripts print it as one line and exit 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with every flag's default, except the empty ones (None, False) that say nothing."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


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
