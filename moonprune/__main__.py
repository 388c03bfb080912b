"""``python -m moonprune`` runs the command-line interface."""

from moonprune.cli.app import main

if __name__ == "__main__":
    main()
