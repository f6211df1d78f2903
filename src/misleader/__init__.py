"""misleader: defending ML APIs against model extraction (MISLEADER, arXiv 2506.02362)."""

from misleader.errors import MisleaderError, QueryBudgetExceeded

__version__ = "0.1.0"

__all__ = ["connect", "load_oracle", "QueryBudgetExceeded", "MisleaderError", "__version__"]


def load_oracle(path, *, output="probs", budget=None, device="cpu"):  # noqa: ANN001 - thin re-export
    """Open a victim folder or a defense folder as an :class:`~misleader.oracle.Oracle`.

    See :func:`misleader.oracle.load.load_oracle`.
    """
    from misleader.oracle.load import load_oracle as _load

    return _load(path, output=output, budget=budget, device=device)


def connect(url, *, api_key=None, output=None, budget=None):  # noqa: ANN001 - thin re-export
    """An :class:`~misleader.oracle.Oracle` over a running ``misleader serve`` (see :mod:`misleader.serving.client`)."""
    from misleader.serving.client import connect as _connect

    return _connect(url, api_key=api_key, output=output, budget=budget)
