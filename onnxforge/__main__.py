"""``python -m onnxforge`` and the ``onnxforge`` command."""

import sys


def run() -> None:
    """The command line, in a process whose large allocations get huge pages (``onnxforge.hugepages``)."""
    from onnxforge import hugepages

    hugepages.relaunch()
    from onnxforge.cli import main

    sys.exit(main())


if __name__ == "__main__":
    run()
