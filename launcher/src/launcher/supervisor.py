"""Child processes of a local run: started, their output shown line by line under their
name, started again if one exits, stopped in order.

Each child runs in a session of its own, so the terminal's Ctrl-C reaches the launcher
alone and the launcher decides the order: everything else first, then Redis (whose workers
still need it to hand jobs back). On Linux each child also gets SIGTERM if the launcher dies
without stopping it (``PR_SET_PDEATHSIG``), so nothing is left running even after a kill -9.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Sequence
from typing import TextIO

from .errors import ProcessFailed

COLOURS = ["36", "33", "32", "35", "34", "91", "96", "93"]
TAIL_LINES = 40
LINE_LIMIT = 1 << 20  # longer lines are shown in pieces
OUTPUT_WAIT_S = 2.0  # for an exited child's last lines (a grandchild may hold its pipe)


def _die_with_parent() -> Callable[[], None] | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1

    def preexec() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)

    return preexec


class Child:
    def __init__(
        self,
        name: str,
        process: asyncio.subprocess.Process,
        launch: tuple[Sequence[str], dict[str, str], str],
    ) -> None:
        self.name = name
        self.process = process
        self.launch = launch  # its command, environment and directory, to start it again
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.lines = asyncio.Condition()
        self.watched: set[str] = set()
        self.seen: set[str] = set()
        self.output_done: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    async def wait_for_line(self, text: str) -> None:
        """Until a line of output holds ``text``; ProcessFailed if the child exits first."""
        async with self.lines:
            self.watched.add(text)
            if any(text in line for line in self.tail):
                self.seen.add(text)
            while text not in self.seen:
                if self.process.returncode is not None or (
                    self.output_done is not None and self.output_done.done()
                ):
                    raise ProcessFailed(f"{self.name} exited before it was ready")
                await self.lines.wait()


class Supervisor:
    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out
        self.children: list[Child] = []
        self.colour = out.isatty() and not os.environ.get("NO_COLOR")
        self.width = 8
        self.killing = False  # kill_all was called: a child started again dies at once

    def say(self, text: str, name: str = "run") -> None:
        """One line under ``name``, as the children's lines are shown."""
        label = name.ljust(self.width)
        if self.colour:
            index = [c.name for c in self.children].index(name) if name != "run" else -1
            colour = COLOURS[index % len(COLOURS)] if index >= 0 else "1"
            label = f"\033[{colour}m{label}\033[0m"
        self.out.write(f"{label} | {text}\n")
        self.out.flush()

    async def start(
        self, name: str, command: Sequence[str], env: dict[str, str], cwd: str
    ) -> Child:
        child = await self._spawn(name, command, env, cwd)
        self.children.append(child)
        self.width = max(self.width, len(name))
        if self.killing:  # told to kill everything while this one was starting
            _signal(child, signal.SIGKILL)
        return child

    async def restart(self, child: Child) -> Child:
        """``child``, which exited, started again as it was, in its place."""
        _signal(child, signal.SIGKILL)  # what it started goes with it
        if child.output_done is not None:  # its last lines first
            await asyncio.wait({child.output_done}, timeout=OUTPUT_WAIT_S)
        again = await self._spawn(child.name, *child.launch)
        self.children[self.children.index(child)] = again
        if self.killing:  # told to kill everything while this one was starting
            _signal(again, signal.SIGKILL)
        return again

    async def _spawn(
        self, name: str, command: Sequence[str], env: dict[str, str], cwd: str
    ) -> Child:
        process = await asyncio.create_subprocess_exec(
            *command,
            env=env,
            cwd=cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent(),
            limit=LINE_LIMIT,
        )
        child = Child(name, process, (command, env, cwd))
        child.output_done = asyncio.create_task(self._show_output(child))
        return child

    async def _show_output(self, child: Child) -> None:
        stream = child.process.stdout
        assert stream is not None
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line past LINE_LIMIT: show what has come
                raw = await stream.read(LINE_LIMIT)
            if not raw:
                break
            line = raw.decode(errors="replace").rstrip("\r\n")
            self.say(line, child.name)
            async with child.lines:
                child.tail.append(line)
                child.seen.update(text for text in child.watched if text in line)
                child.lines.notify_all()
        await child.process.wait()
        async with child.lines:
            child.lines.notify_all()

    async def first_exit(self) -> Child:
        """The first child to exit."""
        waits = {asyncio.ensure_future(c.process.wait()): c for c in self.children}
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        return waits[done.pop()]

    async def stop(self, children: Sequence[Child], grace_s: float) -> None:
        """SIGTERM to each child's session, then SIGKILL to whatever is left after the grace."""
        running = [c for c in children if c.process.returncode is None]
        for child in running:
            _signal(child, signal.SIGTERM)
        if running:
            _, late = await asyncio.wait(
                [asyncio.ensure_future(c.process.wait()) for c in running], timeout=grace_s
            )
            for wait in late:
                wait.cancel()
        for child in children:
            _signal(child, signal.SIGKILL)  # its session too: nothing it started survives
            await child.process.wait()
            if child.output_done is not None:
                await child.output_done

    def kill_all(self) -> None:
        self.killing = True
        for child in self.children:
            _signal(child, signal.SIGKILL)


def _signal(child: Child, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, sig)
