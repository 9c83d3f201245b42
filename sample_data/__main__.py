"""`python -m sample_data --output DIR`: builds the embedded default datasets (see the package docstring)."""
import sys

from sample_data import main
from tagbeam import console

console.quiet_native_logs()
sys.exit(main())
