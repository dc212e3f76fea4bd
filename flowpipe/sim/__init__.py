"""The built-in cluster simulator: deterministic Hubble flows with injected faults and their ground truth."""

from flowpipe.sim.faults import FAULT_NAMES, FAULTS, FaultTruth, GroundTruth, parse_faults
from flowpipe.sim.policies import PolicySet
from flowpipe.sim.simulator import DEFAULT_START, Simulator, SimulatorConfig

__all__ = [
    "DEFAULT_START",
    "FAULTS",
    "FAULT_NAMES",
    "FaultTruth",
    "GroundTruth",
    "PolicySet",
    "Simulator",
    "SimulatorConfig",
    "parse_faults",
]
