"""Library of the flowers diffusion repo: network (unet), diffusion maths (diffusion), data,
checkpoints and runtime settings. Scripts at the top level wire them together."""


class UserError(Exception):
    """A problem with the user's input or files: the scripts print it as one line and exit 2."""
