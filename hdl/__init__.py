"""hdl: holistic deep learning — accurate, robust, stable and sparse networks."""

from hdl.naming import register_resolvers as _register_resolvers

__version__ = "0.1.0"

_register_resolvers()  # ${hdl_stem:...}, ${hdl_job_dir:...} of conf/ (hdl/naming.py)
