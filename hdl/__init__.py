"""hdl: holistic deep learning — accurate, robust, stable and sparse networks."""

__version__ = "0.1.0"
