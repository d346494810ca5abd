"""Measuring what each position encoding does: length extrapolation, position probes, attention
diagnostics, side-by-side comparison and speed. Not model code: it may import anything, and the
scripts under `scripts/` are thin command-line wrappers around these modules."""
