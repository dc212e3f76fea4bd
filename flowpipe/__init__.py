"""flowpipe: Hubble flow analytics. Stream Cilium Hubble flows into Parquet, ask policy questions, draft policies."""

from flowpipe.errors import FlowpipeError
from flowpipe.model import FLOW_SCHEMA, SCHEMA_VERSION

__version__ = "0.1.0"

__all__ = ["FLOW_SCHEMA", "SCHEMA_VERSION", "FlowpipeError", "__version__"]
