"""Schemes: each is a function from a validated config to a summary; the CLI and jobs/ call them."""
