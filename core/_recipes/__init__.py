"""Recipes and planning: the recipe types and their parsing, plugin options, the per-layer resolver and ``Plan``."""
