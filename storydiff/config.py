"""``storydiff.config``: where ``ConsistencyConfig`` lived before the layers had packages; kept so imports
written then (and the README's until 0.6) keep working. The class is ``storydiff.consistency.config``'s."""

from .consistency.config import ConsistencyConfig, InvalidSetting

__all__ = ["ConsistencyConfig", "InvalidSetting"]
