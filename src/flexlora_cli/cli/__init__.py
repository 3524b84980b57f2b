"""The CLI room: typer commands that parse, call the library, and print."""
