"""`python -m flowpipe` runs the command line."""

from flowpipe.cli import cli

if __name__ == "__main__":
    cli()
