"""Command-line interface: one Typer app, one thin module per command."""
