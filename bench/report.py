"""One markdown table per run, printed and recorded in docs/benchmarks.md with its command."""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .processes import ROOT

DOCS = ROOT / "docs" / "benchmarks.md"


COMPARISON = ("metric", "direct relay", "Streamgate", "Streamgate vs direct", "target (issue 4)")


@dataclass
class Table:
    """A markdown table: the comparison's columns unless ``header`` names others; figures
    right-aligned, the first and last columns (names, remarks) left-aligned."""

    title: str
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    header: tuple[str, ...] = COMPARISON

    def add(
        self,
        metric: str,
        direct: str = "—",
        streamgate: str = "—",
        delta: str = "",
        target: str = "",
    ) -> None:
        self.rows.append([metric, direct, streamgate, delta, target])

    def add_cells(self, *cells: str) -> None:
        self.rows.append(list(cells))

    def markdown(self) -> str:
        align = ["---", *["---:"] * (len(self.header) - 2), "---"]
        lines = ["| " + " | ".join(self.header) + " |", "|" + "|".join(align) + "|"]
        for cells in self.rows:
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        text = "\n".join(lines)
        if self.notes:
            text += "\n\n" + "\n".join(f"- {note}" for note in self.notes)
        return text


def ms(seconds: float | None, digits: int = 1) -> str:
    return "—" if seconds is None else f"{seconds * 1000:.{digits}f} ms"


def num(value: float | None, fmt: str = "{:,.0f}", unit: str = "") -> str:
    return "—" if value is None else fmt.format(value) + unit


def diff_ms(streamgate: float | None, direct: float | None) -> str:
    if streamgate is None or direct is None:
        return ""
    return f"{(streamgate - direct) * 1000:+.1f} ms"


def ratio(streamgate: float | None, direct: float | None) -> str:
    if streamgate is None or direct is None or direct == 0:
        return ""
    return f"{streamgate / direct:.2f}x"


def verdict(ok: bool | None, target: str) -> str:
    if ok is None:
        return target
    return f"{target}: {'met' if ok else '**missed**'}"


def machine() -> str:
    """Where the figures were taken: they mean little without it."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return (
        f"{os.cpu_count()} CPUs (nproc){f' {model}' if model else ''}{mem}, "
        f"Linux {platform.release()}, Python {platform.python_version()}"
    )


def revision() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head}{' with uncommitted changes' if dirty else ''}" if head else "unknown"


def command_line() -> str:
    return " ".join(["uv run python -m bench", shlex.join(sys.argv[1:])]).strip()


def load_average() -> str:
    """The machine's load when the run began: other work on it skews every figure."""
    try:
        return " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def cpu_reference() -> str:
    """How fast one core runs Python here (best of three): µs figures from two machines,
    or from one VM on two days, compare only through it."""
    best = min(_time_reference_loop() for _ in range(3))
    return f"{best * 1000:.0f} ms"


def _time_reference_loop() -> float:
    started = time.process_time()
    sum(range(10**7))
    return time.process_time() - started


def section(
    key: str,
    tables: list[Table],
    started: datetime.datetime,
    seconds: float,
    load: str,
    reference: str,
) -> str:
    when = started.strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        f"<!-- bench:{key}:start -->",
        f"### `{key}`",
        "",
        f"- command: `{command_line()}`",
        f"- machine: {machine()}",
        f"- date: {when}; revision {revision()}; the run took {seconds:.0f} s",
        f"- load average (1 / 5 / 15 min) when it began: {load}",
        f"- CPU reference: `sum(range(10**7))` takes {reference} of CPU on one core (best"
        " of 3, before the run); CPU figures scale with it",
        "",
    ]
    for table in tables:
        parts += [f"#### {table.title}", "", table.markdown(), ""]
    parts.append(f"<!-- bench:{key}:end -->")
    return "\n".join(parts)


def record(key: str, text: str, path: Path = DOCS) -> None:
    """Replace this run kind's section in docs/benchmarks.md, or append it."""
    doc = path.read_text() if path.exists() else "# Benchmarks\n\n## Results\n"
    pattern = re.compile(
        rf"<!-- bench:{re.escape(key)}:start -->.*?<!-- bench:{re.escape(key)}:end -->", re.S
    )
    if pattern.search(doc):
        doc = pattern.sub(lambda _: text, doc)
    else:
        doc = doc.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(doc)
