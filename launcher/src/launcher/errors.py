"""What stops a local run before it serves anything."""

from __future__ import annotations


class LaunchError(Exception):
    """Bad input or a missing piece: said in one line, exit status 2."""


class ProcessFailed(Exception):
    """A process of the run exited or never became ready: its own output says why."""
