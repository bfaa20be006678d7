"""Experiment configs: one file per experiment, ``get_config(arg) -> ml_collections.ConfigDict``."""
