"""Command-line scripts with the original code's flags (exported from nbs/02a_scripts.ipynb)."""
