from .config import DuDeConfig


__all__ = ["DuDeConfig"]
