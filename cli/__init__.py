"""moonprune's command-line interface (installed as ``moonprune.cli``)."""
