"""asectl: defect classification of AOI drill-position cards.

Each pipeline stage is a plain library function in ``asectl.stages``; the ``asectl`` command is a thin
layer over them.
"""

__version__ = "0.1.0"
