"""Reporting: paper tables, sweeps and the demo's report. Reads results files and configs, never weights.

from mmret.reporting.tables import load_table_spec, render
from mmret.reporting.sweeps import load_sweep
"""
