# Makes the flat top-level modules (topd.py, sample.py, ...) importable from tests/ without installing anything.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
