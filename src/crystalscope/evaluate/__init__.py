"""Evaluate a trained run on labelled images: report, intervals, plots."""
