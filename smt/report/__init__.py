"""Figures and HTML pages for the stage reports and ``reports/index.html``."""
