"""Entry-point functions behind the CLI (one module per area)."""
