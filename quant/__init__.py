"""Turning float weights into INT4 and back: the packed format, the quantizers, checkpoint layouts."""

__all__: list[str] = []
