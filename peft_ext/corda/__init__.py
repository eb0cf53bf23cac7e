from .at_injection import install
from .calibration import Calibration, calibrate
from .calibration_data import CalibrationData
from .config import CorDAConfig


install()  # get_peft_model calibrates a CorDAConfig that names its data (peft_ext.corda.at_injection)

__all__ = ["Calibration", "CalibrationData", "CorDAConfig", "calibrate"]
