"""The query interface every attack goes through."""

from misleader.oracle.base import OUTPUT_MODES, EnsembleOracle, ModelOracle, Oracle, OutputMode, soft_vote
from misleader.oracle.load import describe_target, load_members, load_oracle

__all__ = ["OUTPUT_MODES", "EnsembleOracle", "ModelOracle", "Oracle", "OutputMode", "soft_vote", "describe_target",
           "load_members", "load_oracle"]
