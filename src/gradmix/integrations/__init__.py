"""Adapters of gradmix's loop-agnostic core for training frameworks (each imports its framework; ``import gradmix``
imports none of them)."""
