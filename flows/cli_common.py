"""What every `deepfield` command module shares: the stderr console and the one-line error exit."""
from __future__ import annotations

import typer
from rich.console import Console

console = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    """Print `error: message` and exit with `code` (2: bad input or configuration)."""
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)
