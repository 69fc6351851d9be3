"""``python -m lora_budget`` runs the CLI."""

from .cli import cli

if __name__ == "__main__":
    cli()
