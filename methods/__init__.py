"""Methods register themselves on import; add one import line per new method module."""
from methods import dense  # noqa: F401
