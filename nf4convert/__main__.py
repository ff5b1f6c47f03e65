"""``python -m nf4convert`` runs the command line."""

from .cli import main

main()
