from .calibration import Calibration, calibrate
from .config import CorDAConfig


__all__ = ["Calibration", "CorDAConfig", "calibrate"]
