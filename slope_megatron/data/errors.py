"""The one exception the data pipeline raises for problems a user can fix.

It subclasses ValueError so callers that already catch bad-input errors keep working, and
every message names the thing that is wrong and what to do about it.
"""
from ..errors import SlopeError


class DataError(SlopeError, ValueError):
    """Missing/unreadable/empty data, a broken cache or an unusable tokenizer."""
