"""Whole-model workflows that are not one pass: SmoothQuant W8A8 and the mixed-precision search."""
