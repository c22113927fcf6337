"""Backends: one file per platform (backend + builder + impl), sharing common.py."""
