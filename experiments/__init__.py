"""A package only so that the study scripts share studies.py; nothing in the library imports it."""
