import subprocess
import sys


def test_runtime_does_not_import_torch():
    """The gateway imports the runtime and must stay free of torch."""
    code = "import sys, services.runtime; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
