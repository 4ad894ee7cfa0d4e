"""Shared harness for the stackops experiments: data, evaluation, training helpers."""
