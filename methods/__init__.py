"""Methods register themselves on import; add one import line per new method module."""
from methods import dense  # noqa: F401
from methods import spion  # noqa: F401
from methods import fixed_patterns  # noqa: F401
from methods import attention_pruning  # noqa: F401
from methods import dsti  # noqa: F401
