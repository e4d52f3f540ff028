"""``python -m onnxforge`` and the ``onnxforge`` command."""

import sys

from onnxforge import hugepages


def run() -> None:
    """The command line, in a process whose large allocations get huge pages (``onnxforge.hugepages``):
    the process re-executes itself first, so the CLI is imported after that, not at module level."""
    hugepages.relaunch()
    from onnxforge.cli import main

    sys.exit(main())


if __name__ == "__main__":
    run()
