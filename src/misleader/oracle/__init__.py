"""The query interface every attack goes through."""

from misleader.oracle import backends  # noqa: F401  (registers the model and ensemble backend steps)
from misleader.oracle.base import (OUTPUT_MODES, Accountant, EnsembleOracle, ModelOracle, Oracle, OutputMode,
                                   SealedOracle, soft_vote)
from misleader.oracle.load import describe_target, load_members, load_oracle, open_accounted, public_meta

__all__ = ["OUTPUT_MODES", "Accountant", "EnsembleOracle", "ModelOracle", "Oracle", "OutputMode", "SealedOracle",
           "soft_vote", "describe_target", "load_members", "load_oracle", "open_accounted", "public_meta"]
